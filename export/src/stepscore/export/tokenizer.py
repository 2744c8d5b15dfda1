"""The model's tokenizer as export sees it: tokenizer.json, its config, and its chat template.

The bundle always carries a `tokenizer.json`, loaded at run time with the Rust `tokenizers` library
directly: transformers 5's `AutoTokenizer` can rebuild a tokenizer's pipeline and give different ids
than the model's own tokenizer.json (performance.md), so we never go through it for ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from stepscore.errors import ExportError

log = logging.getLogger(__name__)


@dataclass
class TokenizerInfo:
    """Facts about a model's tokenizer (ids, special tokens, the chat template rendered to text). Formats are
    built from these facts by stepscore.export.formats; this class knows nothing about formats."""

    json_path: Path
    tok: Tokenizer  # special tokens recognised (for trusted template text)
    plain: Tokenizer  # special tokens are plain text (for user text)
    config: Mapping[str, Any]
    chat_template: str | None
    bos_id: int | None  # the id the model's own tokenizer prepends, if any
    added: list[tuple[str, int]]  # added tokens (content, id), longest first

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """User-text encoding: no special tokens matched, none added."""
        return list(self.plain.encode(text, add_special_tokens=False).ids)

    def single_token(self, text: str, what: str, hint: str) -> int:
        ids = self.encode(text)
        if len(ids) != 1:
            raise ExportError(f"{what} {text!r} is {len(ids)} tokens {ids} in this tokenizer, not one; {hint}")
        return ids[0]

    def token_id(self, content: str) -> int | None:
        tid = self.tok.token_to_id(content)
        return None if tid is None else int(tid)

    def special(self, key: str) -> str | None:
        """A special token's text from tokenizer_config.json (`bos_token`, `eos_token`, ...)."""
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The chat template applied as transformers applies it (tokenize=False, no generation prompt)."""
        if not self.chat_template:
            raise ExportError("this model's tokenizer has no chat template; pass --no-chat-template")
        import transformers

        fast_cls: Any = transformers.PreTrainedTokenizerFast
        fast = fast_cls(
            tokenizer_object=self.tok,
            bos_token=self.special("bos_token"),
            eos_token=self.special("eos_token"),
            chat_template=self.chat_template,
        )
        rendered = fast.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=False)
        assert isinstance(rendered, str)
        return rendered


def load_tokenizer(model_dir: Path, override: Path | None = None) -> TokenizerInfo:
    """Find and load the tokenizer of a model folder (or `override`: a folder or a tokenizer.json)."""
    folder = model_dir
    if override is not None and not override.exists():
        raise ExportError(f"--tokenizer {override}: no such file or folder")
    if override is not None:
        folder = override.parent if override.is_file() else override
    json_path = override if override is not None and override.is_file() else folder / "tokenizer.json"
    if not json_path.is_file():
        json_path = _convert(folder)
    try:
        tok = Tokenizer.from_file(str(json_path))
        plain = Tokenizer.from_file(str(json_path))
        spec = json.loads(json_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExportError(f"{json_path}: cannot read ({exc.strerror})") from exc
    except Exception as exc:  # the tokenizers library raises its own exception type for a corrupt file
        raise ExportError(f"{json_path}: not a tokenizer.json the tokenizers library can read ({exc})") from exc
    plain.encode_special_tokens = True
    config: dict[str, Any] = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{config_path}: not readable JSON ({exc})") from exc
    template = config.get("chat_template")
    for candidate in ("chat_template.jinja",):
        if template is None and (folder / candidate).is_file():
            template = (folder / candidate).read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    with_special = tok.encode("a", add_special_tokens=True).ids
    without = tok.encode("a", add_special_tokens=False).ids
    bos_id = with_special[0] if len(with_special) == len(without) + 1 and with_special[1:] == without else None
    added = sorted(
        ((t["content"], int(t["id"])) for t in spec.get("added_tokens", []) if t.get("content")),
        key=lambda item: -len(item[0]),
    )
    return TokenizerInfo(json_path, tok, plain, config, template, bos_id, added)


def _convert(folder: Path) -> Path:
    """A folder with only a slow tokenizer: convert it once with transformers, and say so."""
    if not any((folder / name).is_file() for name in ("tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise ExportError(
            f"{folder}: no tokenizer found (tokenizer.json, tokenizer.model or vocab.json); "
            "pass --tokenizer PATH to a folder or tokenizer.json"
        )
    try:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as exc:
        raise ExportError(f"{folder}: could not load its tokenizer ({exc}); pass --tokenizer PATH") from exc
    backend = getattr(fast, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{folder}: tokenizer has no fast (tokenizer.json) form; pass --tokenizer PATH")
    out = Path(folder) / ".stepscore-tokenizer.json"
    try:
        backend.save(str(out))
    except OSError:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="stepscore-tok-")) / "tokenizer.json"
        backend.save(str(out))
    log.warning(
        "%s has no tokenizer.json: converted its slow tokenizer with transformers; check the ids against "
        "the model's reference tokenizer (transformers 5 can differ from sentencepiece)",
        folder,
    )
    return out
