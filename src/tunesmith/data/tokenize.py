"""Chat template + label masks: THE label-masking contract of tunesmith.

Everything downstream (batches, every training method, evaluation's loss suite) relies
on what is written here and nowhere else.

Labels
------
``labels[t] == -100`` means token ``t`` adds nothing to the loss; otherwise
``labels[t] == input_ids[t]``. Labels are *unshifted*: the model's loss predicts
``labels[t]`` from tokens ``< t`` (transformers shifts by one inside the loss).

Which tokens train (SFT, ``train_on``):
  "assistant" (default)  every assistant message of the conversation: its content AND
      whatever the template emits after it to close the turn — ``<|im_end|>\\n``
      (ChatML, Qwen), ``<|eot_id|>`` (Llama-3), ``<end_of_turn>\\n`` (Gemma), ``</s>``
      (Mistral) — because the model must learn to stop. The role header / generation
      prompt before it (``<|im_start|>assistant\\n``) does not train: at inference the
      prompt supplies it. System, user and tool tokens (tool *results*) are -100.
  "last"  only the last assistant message trains.
  "all"   every token trains, prompt included (padding never does: batches.py).
Text records ``{"text"}``: every token trains, and the tokenizer's EOS is appended.
Unpaired (KTO) records: prompt + completion messages; the completion's assistant
messages train. Preference records: the same, once for chosen and once for rejected.
Prompt-only records (GRPO): prompt ids ending with the generation prompt, no labels.

How the assistant spans are found
---------------------------------
Not from ``{% generation %}`` markers (stock templates lack them). The conversation is
rendered prefix by prefix with ``apply_chat_template(tokenize=False)``; for assistant
message ``i``: ``start = len(render(messages[:i], add_generation_prompt=True))`` and
``end = len(render(messages[:i+1]))``. Both renders must be prefixes of the full
render, else ``TunesmithError``: such a template rewrites earlier turns once later ones
exist (e.g. Qwen3 strips ``<think>`` from old turns, Mistral v0.3 moves the system
prompt to the last user turn) and no per-turn mask is well defined. The full text is
then tokenized once (``add_special_tokens=False``: the template already has BOS where
the model wants it) with offsets, and a token trains when its first character lies in
a span. A token that straddles a span's start stays -100 (rare: tokenizers split at
special tokens and newlines, which is where templates put turn boundaries).

Tools: ``tools=`` is passed to the template when it mentions ``tools``; otherwise the
tool list is appended to the system message (created if absent) as JSON lines inside
``# Tools\\n\\n<tools>...</tools>``. Assistant ``tool_calls`` are passed to templates
that render them (``"tool_calls"`` in the source: Qwen2.5, Llama-3.1), with string
arguments parsed to dicts; for the others they are written into the content as
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` (one block per call,
after any text), so they train like any assistant text. Tool-role messages go through
the template as they are (a template that rejects them raises ``TunesmithError``).

Special tokens inside content (``special_tokens_in_content``)
--------------------------------------------------------------
A tokenizer reads its special tokens (``<|im_end|>``, ``<|eot_id|>``, ``</s>``…) wherever
they appear in text, so a response holding ``<|im_end|>\n<|im_start|>user\n…`` would
train a fake user turn inside the assistant span. ``"error"`` (default) refuses such a
record with ``SpecialTokenError`` naming the field (``messages.1.content``) and the token.
``"text"`` keeps them as plain text: while the template renders, each occurrence in the
record's strings is a same-length run of a private-use character (so every character
position, and with it the assistant spans above, stays the same); the rendered text then
gets the tokens back and is encoded piece by piece, the template's own text with
special-token parsing and the record's occurrences without it. The contract above holds
unchanged: only the ids inside those pieces differ (ordinary text tokens). Records
without special tokens tokenize identically under both settings.

Truncation (``max_length``, in tokens)
--------------------------------------
SFT and text: cut from the right; ``truncated=True``; ``n_trained`` counts what is
left. If every trained token would be cut, ``on_overflow="error"`` (default) raises
``TunesmithError`` and ``"drop"`` returns ``None`` so the trainer can count and report.
Preference, unpaired and prompt-only: prompt tokens go first, cut from the LEFT (the
oldest turns), keeping BOS when the prompt starts with it and at least the generation
prompt tokens (1 token for templates whose generation prompt is implicit, Mistral);
then responses are cut from the right. Chosen and rejected always share the same
prompt tokens (the prompt is tokenized on its own and responses appended), and a pair
whose trained response tokens would all be cut is refused the same way.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError

from tunesmith.data.schema import Message, Record, kind_of
from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last", "all")
ON_OVERFLOW = ("error", "drop")
SPECIAL_TOKENS_IN_CONTENT = ("error", "text")


class SpecialTokenError(TunesmithError):
    """A record's text holds a special token; ``field`` is its dotted path in the record."""

    def __init__(self, field: str, token: str):
        self.field, self.token = field, token
        self.reason = (f"contains the special token `{token}`, which the tokenizer would read as a control token "
                       "(e.g. a fake turn boundary); remove it, or set `data.special_tokens_in_content: text` to "
                       "keep it as plain text")
        super().__init__(f"{field}: {self.reason} (`tunesmith data check FILE --model MODEL` lists every record "
                         "that has one)")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # -100 = no loss; else == input_ids[t] (unshifted)
    n_tokens: int  # length before truncation
    n_trained: int  # trained tokens after truncation
    n_trained_full: int  # trained tokens before truncation
    truncated: bool


@dataclass
class PreferenceExample:
    chosen: TokenizedExample
    rejected: TokenizedExample
    prompt_len: int  # the first prompt_len ids of chosen and rejected are the same prompt


@dataclass
class UnpairedExample:
    completion: TokenizedExample  # prompt + completion, only the completion trains
    prompt_len: int  # the first prompt_len ids are the (possibly left-truncated) prompt
    desirable: bool


# -- rendering -----------------------------------------------------------------------


def _template_text(tokenizer) -> str:
    """The Jinja text of the tokenizer's chat template ('' when it has none)."""
    t = tokenizer.chat_template
    if isinstance(t, dict):  # a few tokenizers ship {"default": ..., "tool_use": ...}
        t = t.get("default") or next(iter(t.values()), "")
    return t or ""


def renders_tool_calls(tokenizer) -> bool:
    """Whether the template itself renders assistant ``tool_calls`` (Qwen2.5, Llama-3.1 do)."""
    return "tool_calls" in _template_text(tokenizer)


def accepts_tools(tokenizer) -> bool:
    """Whether the template renders a ``tools=`` list (it mentions ``tools``)."""
    return "tools" in _template_text(tokenizer)


def _arguments(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return args
    return args


def _call(call: dict) -> dict:
    fn = call.get("function", call)
    return {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}))}


def _prepare(messages: list[Message], tools: list[dict] | None, tokenizer) -> tuple[list[Message], Any]:
    """Messages and tools as this template can render them (see "Tools" above)."""
    native_calls = renders_tool_calls(tokenizer)
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        calls = m.pop("tool_calls", None)
        if calls and native_calls:
            m["tool_calls"] = [{"type": "function", "function": _call(c)} for c in calls]
        elif calls:
            blocks = "\n".join(f"<tool_call>\n{json.dumps(_call(c))}\n</tool_call>" for c in calls)
            m["content"] = f"{m['content']}\n{blocks}" if m["content"] else blocks
        out.append(m)
    if tools and not accepts_tools(tokenizer):
        block = "# Tools\n\n<tools>\n" + "\n".join(json.dumps(t) for t in tools) + "\n</tools>"
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}"
        else:
            out.insert(0, {"role": "system", "content": block})
        tools = None
    return out, (tools or None)


# -- special tokens inside content ------------------------------------------------------


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The strings this tokenizer reads as special tokens wherever they appear, longest first."""
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    found |= set(getattr(tokenizer, "all_special_tokens", ()))
    return tuple(sorted((t for t in found if t and not t.isspace()), key=lambda t: (-len(t), t)))


@functools.lru_cache(maxsize=32)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")  # (?!) never matches


def _strings(obj: Any, path: str):
    """(dotted path, string) of every string value in obj; dict keys are names, not text."""
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{path}.{i}")


def find_special_token(record: Record, tokenizer) -> tuple[str, str] | None:
    """(field, token) of the first special token in the record's text (``meta`` is never rendered)."""
    find = _pattern(special_tokens(tokenizer))
    for key, value in record.items():
        if key == "meta":
            continue
        for path, text in _strings(value, key):
            m = find.search(text)
            if m:
                return path, m.group()
    return None


class _AsText:
    """Keeps the special tokens of a record's strings as plain text (see the module docstring)."""

    BASE = 0xF0000  # Supplementary Private Use Area-A: no tokenizer or template gives it meaning

    def __init__(self, tokenizer):
        self.tokens = special_tokens(tokenizer)
        self.char = {t: chr(self.BASE + j) for j, t in enumerate(self.tokens)}
        self.token = {c: t for t, c in self.char.items()}
        self.find = _pattern(self.tokens)
        self.runs = re.compile("[" + "".join(self.token) + "]+")
        self.special_ids = set(tokenizer.all_special_ids)

    def mark(self, obj: Any) -> Any:
        if isinstance(obj, str):
            if self.runs.search(obj):
                raise TunesmithError(f"a record's text holds the private-use character "
                                     f"U+{ord(self.runs.search(obj).group()[0]):X}, which "
                                     "`special_tokens_in_content: text` reserves; remove it")
            return self.find.sub(lambda m: self.char[m.group()] * len(m.group()), obj)
        if isinstance(obj, dict):
            return {k: self.mark(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.mark(v) for v in obj]
        return obj

    def restore(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """(text with the tokens back, [(start, end)] of the pieces that stay plain text)."""
        out, ranges, pos = [], [], 0
        for m in self.runs.finditer(text):
            out.append(text[pos:m.start()])
            for c, group in itertools.groupby(m.group()):
                n, tok = len(list(group)), self.token[c]
                if n % len(tok):
                    raise TunesmithError(f"the chat template cut the special token `{tok}` written in a record's "
                                         "text, so it cannot be kept as plain text; remove it from the data")
                out.append(tok * (n // len(tok)))
            ranges.append((m.start(), m.end()))
            pos = m.end()
        out.append(text[pos:])
        return "".join(out), ranges

    def encode(self, tokenizer, piece: str, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """One piece of the text without special-token parsing, as the tokens it holds."""
        ids, offsets = _encode_piece(tokenizer, piece, first, as_text=True)
        if self.special_ids & set(ids):
            raise TunesmithError(f"this tokenizer makes a special token from the plain text {piece!r}, so it "
                                 "cannot be kept as text; remove it from the data")
        return ids, offsets


def _as_text(record: Record, tokenizer, special_tokens_in_content: str) -> _AsText | None:
    """None when the record holds no special token; refused under "error"; else the keeper."""
    if special_tokens_in_content not in SPECIAL_TOKENS_IN_CONTENT:
        raise TunesmithError(f"special_tokens_in_content must be one of {SPECIAL_TOKENS_IN_CONTENT}, not "
                             f"{special_tokens_in_content!r}")
    hit = find_special_token(record, tokenizer)
    if hit is None:
        return None
    if special_tokens_in_content == "error":
        raise SpecialTokenError(*hit)
    return _AsText(tokenizer)


def _render(tokenizer, messages: list[Message], tools, generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise TunesmithError("the tokenizer has no chat template; call models.templates.ensure_chat_template first")
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (TemplateError, ValueError) as e:
        roles = [m["role"] for m in messages]
        raise TunesmithError(f"the chat template cannot render a conversation with roles {roles}: {e}") from e


def _check_prefix(full: str, part: str, what: str) -> None:
    if not full.startswith(part):
        at = next((k for k, (a, b) in enumerate(zip(full, part)) if a != b), min(len(full), len(part)))
        raise TunesmithError(
            f"the chat template is not prefix-stable: {what} is not a prefix of the whole "
            f"conversation (they differ at character {at}: {part[at:at + 40]!r} vs "
            f"{full[at:at + 40]!r}), so assistant turns cannot be masked; this template "
            "rewrites earlier turns when later ones exist — use a model whose template does not, "
            "or flatten the conversation into one prompt and response"
        )


def _spans(tokenizer, messages: list[Message], tools, first: int = 0, last_only: bool = False):
    """(full text, [(start, end)] character spans of assistant messages with index >= first)."""
    full = _render(tokenizer, messages, tools, False)
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
    if last_only:
        idx = idx[-1:]
    spans = []
    for i in idx:
        before = _render(tokenizer, messages[:i], tools, True)
        upto = _render(tokenizer, messages[: i + 1], tools, False)
        _check_prefix(full, before, f"the render of messages[:{i}] with the generation prompt")
        _check_prefix(full, upto, f"the render of messages[:{i + 1}]")
        spans.append((len(before), len(upto)))
    return full, spans


def _encode_piece(tokenizer, piece: str, first: bool, as_text: bool = False):
    split = {"split_special_tokens": True} if as_text else {}

    def enc(text):
        e = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, **split)
        return list(e["input_ids"]), list(e["offset_mapping"])

    if first:
        return enc(piece)
    # A piece cut from the middle is encoded after a newline that is then dropped, so that a
    # SentencePiece tokenizer adds no word-start marker at the cut (transformers' encode_marked_chat).
    nl, _ = enc("\n")
    ids, offsets = enc("\n" + piece)
    if ids[:len(nl)] == nl and all(s >= 1 for s, _ in offsets[len(nl):]):
        return ids[len(nl):], [(s - 1, e - 1) for s, e in offsets[len(nl):]]
    return enc(piece)


def _encode(tokenizer, text: str, shift: int = 0, keep: _AsText | None = None
            ) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets (+ shift); with ``keep``, ``text`` is marked (see _AsText)."""
    if keep is None:
        ids, offsets = _encode_piece(tokenizer, text, first=True)
        return ids, [(s + shift, e + shift) for s, e in offsets]
    text, ranges = keep.restore(text)
    bounds = sorted({0, len(text), *(x for r in ranges for x in r)})
    plain = set(ranges)
    ids, offsets = [], []
    for a, b in zip(bounds, bounds[1:]):
        piece = text[a:b]
        p_ids, p_offs = keep.encode(tokenizer, piece, a == 0) if (a, b) in plain else \
            _encode_piece(tokenizer, piece, a == 0)
        ids += p_ids
        offsets += [(s + a + shift, e + a + shift) for s, e in p_offs]
    return ids, offsets


def _labels(ids: list[int], offsets, spans) -> list[int]:
    return [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX for t, (s, _) in zip(ids, offsets)]


def _n_trained(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


def _overflow(on_overflow: str, n_tokens: int, max_length: int, n_trained: int) -> None:
    if on_overflow == "error":
        raise TunesmithError(
            f"a record of {n_tokens} tokens has all {n_trained} trained tokens beyond "
            f"max_length={max_length}; raise max_length or drop such records (on_overflow='drop')"
        )


def _check_options(train_on: str, on_overflow: str) -> None:
    if train_on not in TRAIN_ON:
        raise TunesmithError(f"train_on must be one of {TRAIN_ON}, not {train_on!r}")
    if on_overflow not in ON_OVERFLOW:
        raise TunesmithError(f"on_overflow must be one of {ON_OVERFLOW}, not {on_overflow!r}")


# -- SFT and text: truncate from the right ----------------------------------------------


def _right_truncate(ids, labels, max_length, on_overflow) -> TokenizedExample | None:
    n, full = len(ids), _n_trained(labels)
    truncated = bool(max_length) and n > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    trained = _n_trained(labels)
    if full and not trained:
        _overflow(on_overflow, n, max_length, full)
        return None
    return TokenizedExample(ids, labels, n, trained, full, truncated)


def tokenize_messages(
    messages: list[Message],
    tokenizer,
    *,
    tools: list[dict] | None = None,
    max_length: int | None = None,
    train_on: str = "assistant",
    on_overflow: str = "error",
    special_tokens_in_content: str = "error",
) -> TokenizedExample | None:
    """One conversation → ids and labels (see the module docstring for the contract)."""
    _check_options(train_on, on_overflow)
    keep = _as_text({"messages": messages, "tools": tools}, tokenizer, special_tokens_in_content)
    msgs, tools = _prepare(messages, tools, tokenizer)
    if keep is not None:
        msgs, tools = keep.mark(msgs), keep.mark(tools)
    if train_on == "all":
        full = _render(tokenizer, msgs, tools, False)
        ids, _ = _encode(tokenizer, full, keep=keep)
        labels = list(ids)
    else:
        full, spans = _spans(tokenizer, msgs, tools, last_only=train_on == "last")
        if not spans:
            raise TunesmithError("a conversation has no assistant message to train on")
        ids, offsets = _encode(tokenizer, full, keep=keep)
        labels = _labels(ids, offsets, spans)
    return _right_truncate(ids, labels, max_length, on_overflow)


def tokenize_text(text: str, tokenizer, *, max_length=None, on_overflow="error",
                  special_tokens_in_content: str = "error") -> TokenizedExample | None:
    """Language modelling: the tokenizer's own special tokens (BOS if it adds one) + EOS."""
    as_text = _as_text({"text": text}, tokenizer, special_tokens_in_content) is not None
    split = {"split_special_tokens": True} if as_text else {}
    ids = list(tokenizer(text, add_special_tokens=True, **split)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return _right_truncate(ids, list(ids), max_length, on_overflow)


# -- prompt + responses: truncate the prompt from the left first -----------------------


def _prompt_ids(tokenizer, prompt: list[Message], tools, keep: _AsText | None = None
                ) -> tuple[str, list[int], int]:
    """(prompt text with generation prompt, its ids, tokens to keep at least when cut)."""
    text = _render(tokenizer, prompt, tools, True)
    ids, offsets = _encode(tokenizer, text, keep=keep)
    bare = _render(tokenizer, prompt, tools, False)
    # Mistral's generation prompt is implicit (bare == text): keep at least 1 token then.
    n_gen = sum(s >= len(bare) for s, _ in offsets) if text.startswith(bare) else 0
    has_bos = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    return text, ids, max(n_gen, 1) + has_bos


def _left_truncate(ids: list[int], keep: int, bos_id) -> list[int]:
    """The last ``keep`` ids, with ids[0] kept in front when it is BOS."""
    if keep >= len(ids):
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - (keep - 1):] if keep > 1 else ids[:1]
    return ids[len(ids) - keep:] if keep > 0 else []


def _prepared(messages, tools, tokenizer, keep: _AsText | None):
    msgs, tools = _prepare(messages, tools, tokenizer)
    return (msgs, tools) if keep is None else (keep.mark(msgs), keep.mark(tools))


def _prompt_responses(prompt, responses, tokenizer, tools, max_length, on_overflow, keep=None):
    """Shared prompt ids + one TokenizedExample per response (None when refused)."""
    msgs_p, tools_p = _prepared(prompt, tools, tokenizer, keep)
    text, p_ids, keep_min = _prompt_ids(tokenizer, msgs_p, tools_p, keep)
    parts = []
    for resp in responses:
        msgs, tools_r = _prepared(list(prompt) + list(resp), tools, tokenizer, keep)
        first = len(msgs) - len(resp)  # _prepare may insert a system message at the front
        full, spans = _spans(tokenizer, msgs, tools_r, first=first)
        _check_prefix(full, text, "the render of the prompt with the generation prompt")
        ids, offsets = _encode(tokenizer, full[len(text):], shift=len(text), keep=keep)
        labels = _labels(ids, offsets, spans)
        if not _n_trained(labels):
            raise TunesmithError("a response has no assistant message to train on")
        parts.append((ids, labels))
    longest = max(len(ids) for ids, _ in parts)
    kept = p_ids
    if max_length and len(p_ids) + longest > max_length:
        kept = _left_truncate(p_ids, max(max_length - longest, keep_min), tokenizer.bos_token_id)
    examples = []
    for ids, labels in parts:
        ex = _right_truncate(kept + ids, [IGNORE_INDEX] * len(kept) + labels, max_length, on_overflow)
        if ex is None:
            return kept, None
        ex.n_tokens = len(p_ids) + len(ids)
        ex.truncated = ex.truncated or len(kept) < len(p_ids)
        examples.append(ex)
    return kept, examples


def tokenize_preference(
    record: Record, tokenizer, *, max_length: int | None = None, on_overflow: str = "error",
    special_tokens_in_content: str = "error",
) -> PreferenceExample | None:
    """A preference record → chosen and rejected sharing the same prompt tokens."""
    _check_options("assistant", on_overflow)
    keep = _as_text(record, tokenizer, special_tokens_in_content)
    kept, exs = _prompt_responses(
        record["prompt"], [record["chosen"], record["rejected"]], tokenizer, record.get("tools"),
        max_length, on_overflow, keep,
    )
    if exs is None:
        return None
    return PreferenceExample(chosen=exs[0], rejected=exs[1], prompt_len=len(kept))


def tokenize_unpaired(
    record: Record, tokenizer, *, max_length: int | None = None, on_overflow: str = "error",
    special_tokens_in_content: str = "error",
) -> UnpairedExample | None:
    """An "unpaired" record (prompt, completion, label) → its example and prompt length,
    for KTO (which pairs prompts with other records' completions for its KL estimate)."""
    _check_options("assistant", on_overflow)
    keep = _as_text(record, tokenizer, special_tokens_in_content)
    kept, exs = _prompt_responses(record["prompt"], [record["completion"]], tokenizer, record.get("tools"),
                                  max_length, on_overflow, keep)
    if exs is None:
        return None
    return UnpairedExample(completion=exs[0], prompt_len=len(kept), desirable=bool(record["label"]))


def tokenize_prompt(messages: list[Message], tokenizer, *, tools: list[dict] | None = None) -> list[int]:
    """Prompt ids ending with the generation prompt, for generation and GRPO."""
    msgs, tools = _prepare(messages, tools, tokenizer)
    return _encode(tokenizer, _render(tokenizer, msgs, tools, True))[0]


def tokenize_record(
    record: Record,
    tokenizer,
    *,
    max_length: int | None = None,
    train_on: str = "assistant",
    on_overflow: str = "error",
    special_tokens_in_content: str = "error",
) -> TokenizedExample | None:
    """Any non-preference canonical record → one TokenizedExample (None when dropped).

    "text", "sft", "unpaired" (prompt + completion; the completion trains) and
    "prompt" (ids only, all labels -100, left-truncated). Preference records go
    through ``tokenize_preference``.
    """
    _check_options(train_on, on_overflow)
    kind = kind_of(record)
    tools = record.get("tools")
    special = dict(special_tokens_in_content=special_tokens_in_content)
    if kind == "text":
        return tokenize_text(record["text"], tokenizer, max_length=max_length, on_overflow=on_overflow, **special)
    if kind == "sft":
        return tokenize_messages(
            record["messages"], tokenizer, tools=tools, max_length=max_length, train_on=train_on,
            on_overflow=on_overflow, **special,
        )
    if kind == "unpaired":
        ex = tokenize_unpaired(record, tokenizer, max_length=max_length, on_overflow=on_overflow, **special)
        return ex.completion if ex else None
    if kind == "prompt":
        keep = _as_text(record, tokenizer, special_tokens_in_content)
        msgs, tools = _prepared(record["prompt"], tools, tokenizer, keep)
        _, ids, _ = _prompt_ids(tokenizer, msgs, tools, keep)
        # max_length is a hard limit for generation, so it wins over keep_min here.
        kept = _left_truncate(ids, max_length, tokenizer.bos_token_id) if max_length else ids
        return TokenizedExample(kept, [IGNORE_INDEX] * len(kept), len(ids), 0, 0, len(kept) < len(ids))
    raise TunesmithError(f"tokenize_record cannot take a {kind!r} record; use tokenize_preference")
