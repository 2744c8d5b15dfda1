"""A preset's template + the model's tokenizer -> the `FormatSpec` a bundle carries (stepscore.runtime.bundle).

Text templates (stepscore.export.presets.TextTemplate) are cut at their placeholders. Chat templates are
rendered once, here, with sentinel strings in place of the problem and the steps; the rendering is cut
into segments, so the runtime never runs a template engine and never searches ids for tags. Either way
the bundle's format description is written from the spec itself (`describe`), so it always says what
the formatter produces.

This module reads the tokenizer (stepscore.export.tokenizer) and the preset records; neither calls back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from stepscore.errors import ExportError
from stepscore.export.presets import ChatLayout, ChatTemplate, ExportOptions, Preset, TextTemplate
from stepscore.export.tokenizer import TokenizerInfo
from stepscore.runtime.bundle import FormatSpec, Read, Segment, Strip


@dataclass(frozen=True)
class Choices:
    """The values a format is built with: the preset's defaults, overridden by the user's options."""

    system_prompt: str  # "" = none
    separator: str | None
    tag: str | None
    candidates: tuple[str, str] | None
    chat: bool  # render the tokenizer's chat template (else the template's text fallback)


def choices(preset: Preset, tok: TokenizerInfo, opts: ExportOptions, separator: str | None) -> Choices:
    """`separator` is the step separator already resolved (option, saved training arguments or default)."""
    system = opts.system_prompt if opts.system_prompt is not None else preset.system_prompt
    return Choices(
        system_prompt=system or "",
        separator=separator,
        tag=opts.tag or preset.tag,
        candidates=opts.candidates or preset.candidates,
        chat=isinstance(preset.template, ChatTemplate) and opts.chat_template and bool(tok.chat_template),
    )


def format_for(preset: Preset, tok: TokenizerInfo, chosen: Choices) -> tuple[FormatSpec, int | None]:
    """The preset's FormatSpec for this tokenizer, and the id of the token each step's score is read at
    (None where the read token is not fixed, e.g. the token before an assistant turn)."""
    template = preset.template
    if isinstance(template, ChatTemplate) and chosen.chat:
        spec, tag_id = _chat_format(template.layout, tok, chosen)
    else:
        text = template if isinstance(template, TextTemplate) else template.fallback
        if text is None:
            raise ExportError(f"the {preset.name} format needs the tokenizer's chat template, and this one has none")
        spec, tag_id = _text_format(text, tok, chosen)
    return replace(spec, description=describe(spec, tok.tok.id_to_token)), tag_id


# --- text templates ------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(bos|encode_bos|problem|step|solution|system|separator|tag|tag_id|separator_ids|break)\}")


def _text_format(template: TextTemplate, tok: TokenizerInfo, chosen: Choices) -> tuple[FormatSpec, int | None]:
    read_ids: list[int] = []

    def parse(text: str) -> list[Segment]:
        out: list[Segment] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            out.extend(split_literal(tok, text[pos : match.start()]))
            out.extend(_placeholder(match.group(1), tok, chosen, read_ids))
            pos = match.end()
        out.extend(split_literal(tok, text[pos:]))
        return _tag_takes_leading_text(_segments(_merge_text(out)))

    prompt, step, between = parse(template.prompt), parse(template.step), parse(template.between)
    for i, seg in enumerate(step):  # a text tag must be one token after ordinary step text: checked here, once
        if seg.read is not None and seg.text is not None and seg.read.expect is None:
            tag_id = _text_tag_id(tok, seg.text)
            step[i] = Segment(text=seg.text, read=Read(0, expect=tag_id))
            read_ids.append(tag_id)
    join = chosen.separator if "{solution}" in template.step else None
    spec = FormatSpec(prompt=tuple(prompt), step=tuple(step), separator=tuple(between), join_steps=join)
    return spec, read_ids[-1] if read_ids else None


def _placeholder(name: str, tok: TokenizerInfo, chosen: Choices, read_ids: list[int]) -> list[Segment]:
    if name == "bos":
        bos = tok.special("bos_token")
        tid = tok.token_id(bos) if bos else None
        return [Segment(ids=(tid,))] if tid is not None else []
    if name == "encode_bos":
        return [Segment(ids=(tok.bos_id,))] if tok.bos_id is not None else []
    if name == "problem":
        return [Segment(field="problem")]
    if name == "step":
        return [Segment(field="step")]
    if name == "solution":
        return [Segment(field="step", read=Read(0))]
    if name == "system":
        return split_literal(tok, chosen.system_prompt)
    if name == "break":
        return [Segment(brk=True)]
    if name == "separator":
        return split_literal(tok, _need(chosen.separator, "step separator"))
    if name == "separator_ids":
        sep = _need(chosen.separator, "step separator")
        ids = tuple(tok.encode(sep))
        if not ids:
            raise ExportError(f"step separator {sep!r} tokenizes to nothing; pass another --step-separator")
        read_ids.append(ids[-1])
        return [Segment(ids=ids, read=Read(0))]
    tag = _need(chosen.tag, "step tag")
    if name == "tag_id":
        tid = tok.single_token(tag, "step tag", "pass --tag with a single-token tag")
        read_ids.append(tid)
        return [Segment(ids=(tid,), read=Read(0))]
    return [Segment(text=tag, read=Read(0))]  # {tag}: its id is checked in context by _text_format


def _need(value: str | None, what: str) -> str:
    if value is None:
        raise ExportError(f"internal: this format's template uses a {what} but its preset defines none")
    return value


def _tag_takes_leading_text(items: list[Segment]) -> list[Segment]:
    """`... {step} {tag}`: the literal text just before a text tag is part of the tag (Math-Shepherd's tag is
    the one token " ки", space included); the read stays at the tag's last character."""
    out: list[Segment] = []
    for seg in items:
        prev = out[-1] if out else None
        if seg.text is not None and seg.read is not None and prev is not None and prev.text is not None and prev.read is None:
            out[-1] = Segment(text=prev.text + seg.text, read=seg.read)
        else:
            out.append(seg)
    return out


def _text_tag_id(tok: TokenizerInfo, tag_text: str) -> int:
    """The single token a text tag becomes after ordinary step text (checked in context)."""
    probe = "Step 1: 2 + 2 = 4."
    enc = tok.plain.encode(probe + tag_text, add_special_tokens=False)
    end_of_tag = len(probe) + len(tag_text)
    covering = [t for t, (lo, hi) in zip(enc.ids, enc.offsets, strict=True) if hi > len(probe) and lo < end_of_tag]
    if len(covering) != 1:
        raise ExportError(
            f"tag {tag_text.strip()!r} is {len(covering)} tokens after step text in this tokenizer, not one; "
            "pass --tag with a single-token tag"
        )
    return int(covering[0])


# --- chat templates ------------------------------------------------------------------------------

_SENTINEL = re.compile("\ue000([A-Z][0-9]?)\ue001")


def _s(name: str) -> str:
    return f"\ue000{name}\ue001"


Item = Segment | str  # a segment, or the name of a step sentinel ("S1", ...)
MessagesFn = Callable[[str, Sequence[str], str], list[dict[str, str]]]


def _messages(layout: ChatLayout, system: str) -> MessagesFn:
    """messages(problem, steps, read_text) for a chat layout (see ChatTemplate)."""
    head = [{"role": "system", "content": system}] if system else []

    def assistant_steps(p: str, steps: Sequence[str], r: str) -> list[dict[str, str]]:
        return [*head, {"role": "user", "content": p}, {"role": "assistant", "content": "".join(s + r for s in steps)}]

    def turn_per_step(p: str, steps: Sequence[str], r: str) -> list[dict[str, str]]:
        msgs = list(head)
        for k, step in enumerate(steps):
            msgs.append({"role": "user", "content": f"{p} {step}" if k == 0 else step})
            msgs.append({"role": "assistant", "content": r})
        return msgs

    def whole_solution(p: str, steps: Sequence[str], r: str) -> list[dict[str, str]]:
        return [*head, {"role": "user", "content": p}, {"role": "assistant", "content": steps[0]}]

    return {"assistant_steps": assistant_steps, "turn_per_step": turn_per_step, "whole_solution": whole_solution}[layout]


def _chat_format(layout: ChatLayout, tok: TokenizerInfo, chosen: Choices) -> tuple[FormatSpec, int | None]:
    messages = _messages(layout, chosen.system_prompt)
    if layout == "assistant_steps":
        tag = _need(chosen.tag, "step tag")
        tag_id = tok.token_id(tag)
        if tag_id is None:
            raise ExportError(f"tag {tag!r} is not a token of this tokenizer; pass --tag with the model's step tag")
        return chat_steps_format(tok, messages, Segment(ids=(tag_id,), read=Read(0))), tag_id
    if layout == "turn_per_step":
        if chosen.candidates is None:
            raise ExportError("internal: a turn-per-step format reads before a candidate token, and none is defined")
        good = chosen.candidates[0]
        good_id = tok.single_token(good, "candidate", "pass --candidates with single-token strings")
        # the score is read at the token before the assistant's good token (the model predicts it there)
        return chat_steps_format(tok, messages, Segment(text=good, read=Read(offset=-1, expect=good_id))), None
    return chat_response_format(tok, messages, chosen.separator or ""), None


def split_literal(tok: TokenizerInfo, text: str) -> list[Segment]:
    """Template text -> text segments and ids segments (the tokenizer's added tokens become ids)."""
    if not text:
        return []
    if not tok.added:
        return [Segment(text=text)]
    pattern = "|".join(re.escape(content) for content, _ in tok.added)
    ids_by_content = dict(tok.added)
    out: list[Segment] = []
    pos = 0
    for match in re.finditer(pattern, text):
        if match.start() > pos:
            out.append(Segment(text=text[pos : match.start()]))
        out.append(Segment(ids=(ids_by_content[match.group(0)],)))
        pos = match.end()
    if pos < len(text):
        out.append(Segment(text=text[pos:]))
    return out


def _parse(rendered: str, tok: TokenizerInfo, read: Segment | None) -> list[Item]:
    items: list[Item] = []
    pos = 0
    for match in _SENTINEL.finditer(rendered):
        items.extend(split_literal(tok, rendered[pos : match.start()]))
        name = match.group(1)
        if name == "P":
            items.append(Segment(field="problem"))
        elif name == "R":
            if read is None:
                raise ExportError("internal: read sentinel without a read segment")
            items.append(read)
        else:
            items.append(name)
        pos = match.end()
    items.extend(split_literal(tok, rendered[pos:]))
    if any(isinstance(i, Segment) and i.text and ("\ue000" in i.text or "\ue001" in i.text) for i in items):
        raise ExportError("the chat template rewrites message contents; stepscore cannot derive its format")
    return _merge_text(items)


def _merge_text(items: Sequence[Item]) -> list[Item]:
    out: list[Item] = []
    for item in items:
        prev = out[-1] if out else None
        if (
            isinstance(item, Segment)
            and isinstance(prev, Segment)
            and item.text is not None
            and prev.text is not None
            and item.read is None
            and prev.read is None
        ):
            out[-1] = Segment(text=prev.text + item.text)
        else:
            out.append(item)
    return out


def _strips(tok: TokenizerInfo, messages: MessagesFn, read_text: str, n: int) -> tuple[Strip, Strip, Strip]:
    """Which whitespace the template strips from the problem, the first step and later steps."""
    steps = [f" {_s(f'S{k}')} " for k in range(1, n + 1)]
    padded = tok.render_chat(messages(f" {_s('P')} ", steps, read_text))

    def strip(name: str) -> Strip:
        return Strip(left=f" {_s(name)}" not in padded, right=f"{_s(name)} " not in padded)

    return strip("P"), strip("S1"), strip("S2") if n > 1 else strip("S1")


def chat_steps_format(tok: TokenizerInfo, messages: MessagesFn, read: Segment) -> FormatSpec:
    """Formats whose steps repeat a unit holding a read marker (qwen-prm, rlhflow)."""
    rendered = tok.render_chat(messages(_s("P"), [_s("S1"), _s("S2"), _s("S3")], _s("R")))
    items = _parse(rendered, tok, read)
    try:
        i1, i2, i3 = (items.index(f"S{k}") for k in (1, 2, 3))
    except ValueError as exc:
        raise ExportError("the chat template drops message contents; cannot derive the format") from exc
    prompt, unit, unit2, tail = items[:i1], items[i1 + 1 : i2], items[i2 + 1 : i3], items[i3 + 1 :]
    if unit != unit2:
        raise ExportError("the chat template renders successive steps differently; cannot derive one step unit")
    marks = [j for j, s in enumerate(unit) if isinstance(s, Segment) and s.read is not None]
    if len(marks) != 1:
        raise ExportError(f"expected one step tag between steps, found {len(marks)}")
    r = marks[0]
    if tail[: r + 1] != unit[: r + 1]:
        raise ExportError("the chat template renders the last step differently from the others")
    strip_p, strip_first, strip_step = _strips(tok, messages, _s("R"), 3)
    return FormatSpec(
        prompt=tuple(_segments(prompt)),
        step=(Segment(field="step"), *_segments(unit[: r + 1])),
        separator=tuple(_segments(unit[r + 1 :])),
        strip_problem=strip_p,
        strip_first_step=strip_first,
        strip_step=strip_step,
    )


def chat_response_format(tok: TokenizerInfo, messages: MessagesFn, join: str) -> FormatSpec:
    """Outcome models: the whole solution as one assistant message, scored at the last token."""
    items = _parse(tok.render_chat(messages(_s("P"), [_s("S1")], "")), tok, None)
    i1 = items.index("S1")
    prompt, tail = _segments(items[:i1]), _segments(items[i1 + 1 :])
    if tail:
        last = tail[-1]
        tail[-1] = Segment(text=last.text, ids=last.ids, read=Read(0))
        step = (Segment(field="step"), *tail)
    else:
        step = (Segment(field="step", read=Read(0)),)
    strip_p, strip_first, _ = _strips(tok, messages, "", 1)
    return FormatSpec(
        prompt=tuple(prompt),
        step=step,
        strip_problem=strip_p,
        strip_first_step=strip_first,
        strip_step=strip_first,
        join_steps=join,
    )


def _segments(items: Sequence[Item]) -> list[Segment]:
    out: list[Segment] = []
    for item in items:
        if not isinstance(item, Segment):
            raise ExportError(f"the chat template places step {item} where only template text was expected")
        out.append(item)
    return out


# --- description ---------------------------------------------------------------------------------

_LONG_TEXT = 60  # characters of template text shown before the rest is summarised by its length


def describe(spec: FormatSpec, token_text: Callable[[int], str | None] = lambda _: None) -> str:
    """What the formatter builds from this spec, written from the spec itself (so it cannot disagree):
    quoted text is template text, [ids] are inserted token ids (with their text where `token_text` knows
    it), `problem` and `step` the user's text, `|` a tokenization boundary, and (score read ...) the token
    each step's score is read at."""
    step_name = "solution" if spec.join_steps is not None else "step"

    def render(segments: Sequence[Segment]) -> str:
        return _render(segments, step_name, token_text)

    parts = [f"prompt: {render(spec.prompt) or 'nothing'}", f"each {step_name}: {render(spec.step)}"]
    if spec.join_steps is not None:
        parts.insert(1, f"solution = the steps joined by {json.dumps(spec.join_steps, ensure_ascii=False)}")
    elif spec.separator:
        parts.append(f"between steps: {render(spec.separator)}")
    stripped = [
        name
        for name, strip in (("problem", spec.strip_problem), ("first step", spec.strip_first_step), ("steps", spec.strip_step))
        if strip.left or strip.right
    ]
    if stripped:
        parts.append(f"whitespace stripped from: {', '.join(dict.fromkeys(stripped))}")
    return "; ".join(parts)


def _render(segments: Sequence[Segment], step_name: str, token_text: Callable[[int], str | None]) -> str:
    out: list[str] = []
    for seg in segments:
        if seg.brk:
            out.append("|")
            continue
        if seg.field is not None:
            text = "problem" if seg.field == "problem" else step_name
        elif seg.ids is not None:
            named = [(i, token_text(i)) for i in seg.ids]
            text = "[" + ", ".join(f"{i} {json.dumps(t, ensure_ascii=False)}" if t else str(i) for i, t in named) + "]"
        else:
            raw = seg.text or ""
            quoted = json.dumps(raw, ensure_ascii=False)
            text = quoted if len(raw) <= _LONG_TEXT else f"{json.dumps(raw[:24], ensure_ascii=False)}…({len(raw)} chars)"
        if seg.read is not None:
            where = "score read at the token before it" if seg.read.offset == -1 else "score read here"
            if seg.read.offset not in (0, -1):
                where = f"score read {seg.read.offset:+d} tokens from here"
            expect = f", id {seg.read.expect}" if seg.read.expect is not None else ""
            text += f" ({where}{expect})"
        out.append(text)
    joined = ""
    for text in out:
        if text == "|":
            joined += " |"
        elif joined and not joined.endswith("|"):
            joined += " + " + text
        else:
            joined += (" " if joined else "") + text
    return joined
