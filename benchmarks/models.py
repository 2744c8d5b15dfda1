"""Random-weight PRMs in the Qwen2.5-Math-PRM layout (or, with `architecture="llama-lm"`, the RLHFlow one:
a Llama causal LM), for the benchmark scripts (CPU suite, export scale, GPU script, integrations). Speed does
not depend on what a model learned, so no download is needed.

Needs torch, transformers and safetensors (the export extra).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
}  # fmt: skip


def bundle_is_current(bundle: Path) -> bool:
    """Whether a benchmark bundle cached in benchmarks/.cache was written by an export like this version's:
    every graph named, and the cached graph's attention op recorded (bundles before that field carry the
    slower MultiHeadAttention cached graph and are exported again)."""
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return False
    graph = json.loads(manifest.read_text()).get("graph", {})
    return bool(graph.get("plain_file") and graph.get("cached_file") and graph.get("cached_attention"))


def write_random_prm(
    folder: Path,
    shape: dict[str, int],
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    seed: int = 0,
    tokenizer: Path | None = None,
    system_prompt: str | None = "",
    architecture: str = "qwen2-prm",
) -> None:
    """Write a checkpoint (config.json, model.safetensors, tokenizer) into `folder`, unless one is there.

    `tokenizer`: a folder holding tokenizer.json(.gz) and tokenizer_config.json (a real tokenizer, read by
    path); None trains a small one. `system_prompt`: written to stepscore.json for export (None: none, so
    the tokenizer's chat template decides). `architecture`: "qwen2-prm" (Qwen2ForProcessRewardModel, a
    two-class head) or "llama-lm" (LlamaForCausalLM, scored by its logits at two candidate tokens, as RLHFlow's
    PRMs are).
    """
    import torch
    from transformers import Qwen2Config, Qwen2Model

    if architecture not in ("qwen2-prm", "llama-lm"):
        raise ValueError(f"architecture {architecture!r} is not qwen2-prm or llama-lm")
    if (folder / "model.safetensors").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from tests.helpers.tiny_models import _train_tokenizer

        _train_tokenizer("qwen", folder)
    else:
        packed = tokenizer / "tokenizer.json.gz"
        if packed.is_file():
            with gzip.open(packed, "rb") as fin, (folder / "tokenizer.json").open("wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copy(tokenizer / "tokenizer.json", folder / "tokenizer.json")
        shutil.copy(tokenizer / "tokenizer_config.json", folder / "tokenizer_config.json")
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    settings: dict[str, Any] = {"max_position_embeddings": 4096, "rope_theta": 10000.0, **shape}
    if architecture == "llama-lm":
        _write_llama_lm(folder, settings, torch_dtype, device, system_prompt)
        return
    config = Qwen2Config(**settings)
    with torch.device(device):
        body = Qwen2Model(config).to(torch_dtype)
    h = config.hidden_size
    state = {f"model.{k}": v.detach().contiguous().cpu() for k, v in body.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    state |= {
        "score.0.weight": (torch.randn(h, h, generator=gen) * 0.02).to(torch_dtype),
        "score.0.bias": torch.zeros(h, dtype=torch_dtype),
        "score.2.weight": (torch.randn(2, h, generator=gen) * 0.02).to(torch_dtype),
        "score.2.bias": torch.zeros(2, dtype=torch_dtype),
    }
    _write_checkpoint(folder, state, config.to_dict(), "Qwen2ForProcessRewardModel", system_prompt)


def _write_llama_lm(folder: Path, settings: dict[str, Any], torch_dtype: Any, device: str, system_prompt: str | None) -> None:
    """The RLHFlow layout: a whole LlamaForCausalLM (its own lm_head, untied as in Llama 3.1 8B)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**settings, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch_dtype)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _write_checkpoint(folder, state, config.to_dict(), "LlamaForCausalLM", system_prompt)


def _write_checkpoint(
    folder: Path, state: dict[str, Any], cfg: dict[str, Any], architecture: str, system_prompt: str | None
) -> None:
    """Weights, config.json naming the architecture, and stepscore.json with the system prompt (when given)."""
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": [architecture]}))
    if system_prompt is not None:
        (folder / "stepscore.json").write_text(json.dumps({"system_prompt": system_prompt}))
