"""Train the default model: a tiny Qwen2 process reward model for multi-step arithmetic, on the CPU.

    python -m stepscore.runtime.default_model.train --out runtime/default_model/checkpoint

The checkpoint has the layout of Qwen2.5-Math-PRM (Qwen2 body, `score.0`/`score.2` head, `<extra_0>`
after every step in a chat template), its own character-level tokenizer, and a `stepscore.json` with
its export options; `stepscore export` reads it like any other PRM. The formatting used for training is
the runtime's own formatter, so training and serving see the same ids. Needs torch (the export extra).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stepscore.runtime.bundle import FormatSpec
from stepscore.runtime.default_model.arith import STEP_RE, Chain, Problem, apply, make_problem, sample_chain
from stepscore.runtime.default_model.evaluate import best_of_n, held_out, step_quality
from stepscore.runtime.formatting import Formatter
from stepscore.runtime.types import ScoreRequest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>", "<unk>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
EXPORT_OPTIONS = {"preset": "qwen-prm", "system_prompt": ""}
ARCH = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 384}
MAX_POSITIONS = 512

# (token ids, labelled positions, labels): the tags carry step labels, step characters dense labels
Example = tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.int64]]


def write_tokenizer(folder: Path) -> None:
    """A character-level tokenizer: printable ASCII and newline, each one token, plus specials."""
    from tokenizers import Tokenizer, decoders, models

    chars = list(string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.BPEDecoder()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    (folder / "stepscore.json").write_text(json.dumps(EXPORT_OPTIONS, indent=1) + "\n", encoding="utf-8")


def format_spec(folder: Path) -> tuple[FormatSpec, int]:
    """The format `stepscore export` will derive for this checkpoint (same code path)."""
    from stepscore.export.families import format_for
    from stepscore.export.presets import PRESETS, ExportOptions
    from stepscore.export.tokenizer import load_tokenizer
    from stepscore.runtime.bundle import HeadSpec

    tok = load_tokenizer(folder)
    spec, _ = format_for(PRESETS["qwen-prm"], tok, ExportOptions(**EXPORT_OPTIONS), HeadSpec("token_cls", "softmax1", 2))
    return spec, tok.vocab_size


def token_labels(problem: Problem, chain: Chain) -> list[list[bool]]:
    """Per character of every step: is the chain so far still the start of a right solution?

    The tag after a step carries the step's label (the PRM target). Labelling every character as well
    gives the body dense supervision of where a chain goes wrong (a wrong digit is wrong the moment it
    appears); tag labels alone train the verifier many times slower.
    """
    out, ok, carried = [], True, problem.start
    for k, step in enumerate(chain.steps):
        if ok and k < len(problem.ops):
            op, b = problem.ops[k]
            right = f"{carried}{op}{b}={apply(carried, op, b)}"
        else:
            right = ""
        chars = []
        for j in range(len(step)):
            ok = ok and step[: j + 1] == right[: j + 1]
            chars.append(ok)
        ok = ok and step == right
        out.append(chars)
        m = STEP_RE.match(step)
        carried = int(m.group(4)) if m else carried
    return out


def make_examples(formatter: Formatter, rng: random.Random, n: int, p_error: float = 0.6) -> list[Example]:
    out = []
    while len(out) < n:
        problem = make_problem(rng)
        chain = sample_chain(problem, rng, p_error, trap=rng.randrange(1 << 30))
        item = formatter.format_request(ScoreRequest(problem.text, [chain.steps]))[0]
        positions: list[int] = []
        labels: list[bool] = []
        for read, step, chars, tag_label in zip(
            item.reads, chain.steps, token_labels(problem, chain), chain.labels, strict=True
        ):
            # one character is one token here: step k is the len(step) tokens before its tag
            positions += [*range(int(read) - len(step), int(read)), int(read)]
            labels += [*chars, tag_label]
        out.append((item.ids, np.array(positions, np.int64), np.array(labels, np.int64)))
    return out


def _lm_end(positions: npt.NDArray[np.int64], labels: npt.NDArray[np.int64]) -> int:
    """Next-token targets run up to the last token that is still right: an auxiliary language-model
    loss on right steps teaches the body the arithmetic the verifier must check."""
    wrong = np.flatnonzero(labels == 0)
    return int(positions[wrong[0]]) - 1 if wrong.size else int(positions[-1])


class Model:
    """Qwen2 body + the Qwen PRM head (Linear-ReLU-Linear -> 2), in torch."""

    def __init__(self, vocab: int, seed: int, arch: dict[str, int] | None = None) -> None:
        import torch
        from transformers import Qwen2Config, Qwen2Model

        torch.manual_seed(seed)
        self.config = Qwen2Config(
            vocab_size=vocab, max_position_embeddings=MAX_POSITIONS, rope_theta=10000.0, **(arch or ARCH)
        )
        self.body = Qwen2Model(self.config)
        h = self.config.hidden_size
        self.head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))
        self.params = list(self.body.parameters()) + list(self.head.parameters())

    def hidden(self, ids: Any, mask: Any) -> Any:
        return self.body(input_ids=ids, attention_mask=mask).last_hidden_state

    def train(self, mode: bool) -> None:
        self.body.train(mode)
        self.head.train(mode)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {f"model.{k}": v.contiguous() for k, v in self.body.state_dict().items()}
        state.update({f"score.{k}": v.contiguous() for k, v in self.head.state_dict().items()})
        save_file(state, str(folder / "model.safetensors"))
        config = self.config.to_dict()
        config["architectures"] = ["Qwen2ForProcessRewardModel"]
        config["torch_dtype"] = "float32"
        (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def collate(batch: Sequence[Example]) -> tuple[Any, ...]:
    import torch

    width = max(len(ids) for ids, _, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    lm_targets = torch.full((len(batch), width), -100, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    labels: list[int] = []
    for r, (seq, positions, lab) in enumerate(batch):
        t = torch.as_tensor(seq.astype(np.int64))
        ids[r, : len(seq)] = t
        mask[r, : len(seq)] = 1
        end = _lm_end(positions, lab)
        lm_targets[r, :end] = t[1 : end + 1]
        rows += [r] * len(positions)
        cols += positions.tolist()
        labels += lab.tolist()
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels), lm_targets


def train(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    lm_weight: float = 1.0,
    arch: dict[str, int] | None = None,
    log_every: int = 100,
) -> Model:
    import torch

    write_tokenizer(out)
    spec, vocab = format_spec(out)
    formatter = Formatter(spec, out / "tokenizer.json", vocab, MAX_POSITIONS)
    model = Model(vocab, seed, arch)
    opt = torch.optim.AdamW(model.params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    rng = random.Random(seed)
    started = time.perf_counter()
    model.train(True)
    for step in range(1, steps + 1):
        ids, mask, rows, cols, labels, lm_targets = collate(make_examples(formatter, rng, batch_size))
        hidden = model.hidden(ids, mask)
        step_loss = torch.nn.functional.cross_entropy(model.head(hidden[rows, cols]), labels)
        # the auxiliary next-token loss goes through the embedding matrix (not exported)
        lm_logits = hidden @ model.body.embed_tokens.weight.T
        lm_loss = torch.nn.functional.cross_entropy(
            lm_logits.reshape(-1, lm_logits.shape[-1]), lm_targets.reshape(-1), ignore_index=-100
        )
        loss = step_loss + lm_weight * lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(
                f"step {step:5d}/{steps}  verifier loss {step_loss.item():.4f}  lm loss {lm_loss.item():.4f}  "
                f"{time.perf_counter() - started:6.1f}s",
                flush=True,
            )
    model.train(False)
    model.save(out)
    return model


def torch_scorer(model: Model, formatter: Formatter) -> Any:
    import torch

    def score(data: Sequence[tuple[Problem, Sequence[Chain]]]) -> list[list[npt.NDArray[np.float64]]]:
        out = []
        with torch.no_grad():
            for problem, chains in data:
                items = formatter.format_request(ScoreRequest(problem.text, [c.steps for c in chains]))
                batch = [(i.ids, i.reads.astype(np.int64), np.ones(len(i.reads), np.int64)) for i in items]
                ids, mask, rows, cols, *_ = collate(batch)
                probs = torch.softmax(model.head(model.hidden(ids, mask)[rows, cols]), -1)[:, 1].double().numpy()
                out.append(list(np.split(probs, np.cumsum([len(i.reads) for i in items])[:-1])))
        return out

    return score


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-weight", type=float, default=1.0, help="weight of the auxiliary next-token loss")
    p.add_argument("--hidden", type=int, default=ARCH["hidden_size"])
    p.add_argument("--layers", type=int, default=ARCH["num_hidden_layers"])
    args = p.parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    arch = {**ARCH, "hidden_size": args.hidden, "num_hidden_layers": args.layers, "intermediate_size": 3 * args.hidden}
    model = train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.lm_weight, arch)
    trained = time.perf_counter() - started
    spec, vocab = format_spec(args.out)
    scorer = torch_scorer(model, Formatter(spec, args.out / "tokenizer.json", vocab, MAX_POSITIONS))
    quality = step_quality(held_out(seed=12345, problems=300, per_problem=4), scorer)
    bon = best_of_n(held_out(seed=777, problems=300, per_problem=8), scorer)
    print(
        f"trained in {trained:.0f}s; held out: step AUROC {quality.step_auroc:.4f}, "
        f"first-error accuracy {quality.first_error_accuracy:.3f} ({quality.chains} chains)"
    )
    print(
        f"best-of-{bon.n} over {bon.problems} problems: PRM min {bon.prm_min:.3f}, majority vote {bon.majority:.3f}, "
        f"random {bon.random_pick:.3f} (oracle {bon.oracle:.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
