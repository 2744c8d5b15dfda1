"""Tiny random-init PRMs of every family, with small tokenizers trained on the spot.

Each builder writes a Hugging Face-style folder (config.json, safetensors, tokenizer.json,
tokenizer_config.json) that `stepscore export` reads exactly like a real checkpoint of that family.
No downloads: the tokenizers are trained in milliseconds from the corpus below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = [
    "Sue lives in a fun neighborhood. The neighbors placed 18 pink plastic flamingos out on the yard.",
    "Compute the sum of the first four squares: 1 + 4 + 9 + 16 = 30. The answer is 30.",
    "Step 1: 2 + 2 = 4 ки\nStep 2: 4 * 3 = 12 ки\nStep 3: the answer is 12 ки",
    "Une voiture roule à 60 km/h pendant 2 h 30. Quelle distance parcourt-elle ? 150 km.",
    "We add the squares: $1 + 4 = 5$. Then $5 + 9 = 14$. Finally $14 + 16 = 30$. So + and - signs.",
    "On Saturday they take back one third of the flamingos, 18 / 3 = 6, and paint them white.",
    "Let x be the number. Then 3x + 5 = 20, so x = 5. Check: 3 * 5 + 5 = 20. ✓ \\boxed{5}",
] * 3

QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# kinds saved through transformers' own classes: kind -> (model class, config class, config overrides)
HF_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "trl": ("Qwen2ForTokenClassification", "Qwen2Config", {"num_labels": 2}),
    "qwen3-trl": ("Qwen3ForTokenClassification", "Qwen3Config", {"num_labels": 2, "head_dim": 16}),
    "math-shepherd": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 256}),
    "rlhflow": ("LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": False}),
    "orm": ("LlamaForSequenceClassification", "LlamaConfig", {"num_labels": 1}),
}

KINDS = ("qwen-prm", "trl", "math-shepherd", "rlhflow", "skywork", "orm", "qwen3-trl")


def _train_tokenizer(kind: str, folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "spm":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        # Newlines stay their own tokens, as in sentencepiece vocabularies (byte fallback <0x0A>).
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("\n", behavior="isolated"),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            ]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        specials = ["<unk>", "<s>", "</s>"]
        alphabet = sorted(set("".join(CORPUS)) | set("\n"))
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
        tok.train_from_iterator(CORPUS, trainer)
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if kind == "llama3":
            specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
            config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
        else:
            specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
            config = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": QWEN_TEMPLATE}
        trainer = trainers.BpeTrainer(
            vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(CORPUS, trainer)
        if kind == "llama3":
            bos = tok.token_to_id("<|begin_of_text|>")
            tok.post_processor = processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
            )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return int(tok.get_vocab_size(with_added_tokens=True))


def _config(cls_name: str, vocab: int, hidden: int = 32, **extra: Any) -> Any:
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        # head size 16 (hidden 32): onnxruntime's GroupQueryAttention, in the plain-row graph, wants a
        # multiple of 16; two query heads per K/V head keeps grouped attention covered
        num_attention_heads=max(1, hidden // 16),
        num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=512,
        initializer_range=0.1,
        rms_norm_eps=1e-6,
    )
    common.update(extra)
    return getattr(transformers, cls_name)(**common)


def _save_state(folder: Path, tensors: dict[str, Any], config: Any, architecture: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    cfg = config.to_dict()
    cfg["architectures"] = [architecture]
    (folder / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")


def build(kind: str, folder: Path, seed: int = 0, tokenizer_dir: Path | None = None, hidden: int = 32) -> Path:
    """Write a tiny model of `kind` (one of KINDS) into `folder` and return it.

    With `tokenizer_dir`, the model gets that (real) tokenizer and an embedding table of its size,
    instead of a small tokenizer trained here.
    """
    import shutil

    import torch
    import transformers

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, folder / name)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    else:
        tok_kind = {"math-shepherd": "spm", "rlhflow": "llama3"}.get(kind, "qwen")
        vocab = _train_tokenizer(tok_kind, folder) + 7  # embedding tables are often larger than the vocab

    if kind in ("qwen-prm", "skywork"):
        config = _config("Qwen2Config", vocab, hidden)
        body = transformers.Qwen2Model(config)
        state = {f"model.{k}": v for k, v in body.state_dict().items()}
        h = config.hidden_size
        if kind == "qwen-prm":
            state.update(
                {
                    "score.0.weight": torch.randn(h, h) * 0.3,
                    "score.0.bias": torch.randn(h) * 0.1,
                    "score.2.weight": torch.randn(2, h) * 0.3,
                    "score.2.bias": torch.randn(2) * 0.1,
                }
            )
            _save_state(folder, state, config, "Qwen2ForProcessRewardModel")
        else:
            state.update(
                {
                    "v_head.summary.weight": torch.randn(1, h) * 0.3,
                    "v_head.summary.bias": torch.randn(1) * 0.1,
                    "lm_head.weight": torch.randn(vocab, h) * 0.02,
                }
            )
            _save_state(folder, state, config, "Qwen2ForPrmModel")
        return folder
    if kind not in HF_MODELS:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model_cls, config_cls, extra = HF_MODELS[kind]
    model = getattr(transformers, model_cls)(_config(config_cls, vocab, hidden, **extra))
    model.save_pretrained(str(folder))
    return folder
