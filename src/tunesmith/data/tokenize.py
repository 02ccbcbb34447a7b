"""Chat template + label masks: THE label-masking contract of tunesmith.

Everything downstream (batches, every training method, evaluation's loss suite) relies
on what is written here and in ``render.py`` (which characters train), nowhere else.

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
Not from ``{% generation %}`` markers (stock templates lack them): ``data/render.py`` reads
them from the template itself and gives, per training sequence, its text and the character
spans that train — each assistant turn as the model produces it after the generation prompt
it is given at inference. One sequence per conversation where the template only appends
("append"), one per assistant turn where it rewrites history ("per-turn"; ``render.py``
says why and how). The text is tokenized once (``add_special_tokens=False``: the template
already has BOS where the model wants it) with offsets, and a token trains when its first
character lies in a span; a per-turn sequence's prompt is encoded on its own, so its ids are
exactly ``tokenize_prompt``'s. A token that straddles a span's start stays -100 (rare:
tokenizers split at special tokens and newlines, which is where templates put turn
boundaries). ``tokenize_conversation`` returns every sequence of a conversation (and the
mode); ``tokenize_messages`` / ``tokenize_record`` are the one-sequence forms.

Tools, tool calls and reasoning are put where the template takes them, or adapted
(``render.py``: "Reasoning", "Adapting a conversation to a template").

Special tokens inside content (``special_tokens_in_content``): ``special_tokens.py``.

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

from dataclasses import dataclass

from tunesmith.data import render
from tunesmith.data.render import DEFAULT_OPTIONS, ChatOptions
from tunesmith.data.schema import Message, Record, kind_of
from tunesmith.data.special_tokens import AsText, as_text, encode_piece
from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last", "all")
ON_OVERFLOW = ("error", "drop")


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


def _encode(tokenizer, text: str, shift: int = 0, keep: AsText | None = None, first: bool = True
            ) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets (+ shift); with ``keep``, ``text`` is marked (see AsText).
    ``first=False``: ``text`` continues a sequence (no word-start marker at its start)."""
    if keep is None:
        ids, offsets = encode_piece(tokenizer, text, first=first)
        return ids, [(s + shift, e + shift) for s, e in offsets]
    text, ranges = keep.restore(text)
    bounds = sorted({0, len(text), *(x for r in ranges for x in r)})
    plain = set(ranges)
    ids, offsets = [], []
    for a, b in zip(bounds, bounds[1:]):
        piece = text[a:b]
        p_ids, p_offs = keep.encode(tokenizer, piece, first and a == 0) if (a, b) in plain else \
            encode_piece(tokenizer, piece, first and a == 0)
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


@dataclass
class TokenizedConversation:
    """One SFT conversation as its training sequences (``render.conversation``: append or per-turn)."""

    examples: list[TokenizedExample]
    mode: str  # "append": one sequence; "per-turn": one per trained assistant turn
    n_tokens_single: int  # tokens of the whole conversation as one sequence (the cost's "before")
    adapted: tuple[str, ...] = ()
    dropped_turns: int = 0  # per-turn sequences whose trained tokens max_length cut entirely


@dataclass
class Formatting:
    """What the chat template's modes cost a dataset: records → sequences, tokens before → after."""

    records: int = 0
    per_turn: int = 0  # conversations the template's history rewriting split into one sequence per turn
    sequences: int = 0
    tokens_single: int = 0  # tokens had every conversation been one sequence
    tokens: int = 0  # tokens of the sequences that train

    def add(self, conv: TokenizedConversation) -> None:
        self.records += 1
        self.per_turn += conv.mode == "per-turn"
        self.sequences += len(conv.examples)
        self.tokens_single += conv.n_tokens_single
        self.tokens += sum(len(e.input_ids) for e in conv.examples)

    def summary(self) -> str:
        """'append (one sequence per conversation)' or the per-turn cost, in one phrase."""
        if not self.per_turn:
            return "append (one sequence per conversation)"
        return (f"per-turn for {self.per_turn} of {self.records} conversations (the template rewrites earlier turns): "
                f"{self.records} → {self.sequences} sequences, {self.tokens_single} → {self.tokens} tokens")

    def to_dict(self) -> dict:
        return {"mode": "per-turn" if self.per_turn else "append", "records": self.records,
                "per_turn_records": self.per_turn, "sequences": self.sequences,
                "tokens_single": self.tokens_single, "tokens": self.tokens}


def _marked(record: Record, tokenizer, special_tokens_in_content: str):
    """(keeper or None, the record's messages/tools with special tokens marked when kept as text)."""
    keep = as_text(record, tokenizer, special_tokens_in_content)
    return keep, (record if keep is None else keep.mark(record))


def _sequence(tokenizer, text: str, spans, prompt_chars: int, keep) -> tuple[list[int], list[int]]:
    """ids and labels of one sequence; a per-turn sequence's prompt is encoded on its own, so its
    ids are exactly the ids the model is given at inference."""
    if prompt_chars:
        p_ids, p_offs = _encode(tokenizer, text[:prompt_chars], keep=keep)
        c_ids, c_offs = _encode(tokenizer, text[prompt_chars:], shift=prompt_chars, keep=keep, first=False)
        ids, offsets = p_ids + c_ids, p_offs + c_offs
    else:
        ids, offsets = _encode(tokenizer, text, keep=keep)
    return ids, _labels(ids, offsets, spans)


def tokenize_conversation(
    messages: list[Message],
    tokenizer,
    *,
    tools: list[dict] | None = None,
    max_length: int | None = None,
    train_on: str = "assistant",
    on_overflow: str = "error",
    special_tokens_in_content: str = "error",
    chat: ChatOptions = DEFAULT_OPTIONS,
) -> TokenizedConversation | None:
    """One conversation → its training sequences (None: every trained token cut, on_overflow drop)."""
    _check_options(train_on, on_overflow)
    keep, rec = _marked({"messages": messages, "tools": tools}, tokenizer, special_tokens_in_content)
    if train_on == "all":
        adapt = render.adaptation(rec["messages"], rec["tools"], tokenizer, chat)
        msgs, tls, _ = render.prepare(rec["messages"], rec["tools"], tokenizer, chat, adapt)
        full = render.render(tokenizer, msgs, tls, False, chat)
        _check_all(rec["messages"], full, chat)
        ids, _ = _encode(tokenizer, full, keep=keep)
        ex = _right_truncate(ids, list(ids), max_length, on_overflow)
        return None if ex is None else TokenizedConversation([ex], "append", len(ids), tuple(sorted(adapt)))
    rendered = render.conversation(rec["messages"], rec["tools"], tokenizer, chat, last_only=train_on == "last")
    examples = []
    for text, spans, prompt_chars in rendered.sequences:
        ids, labels = _sequence(tokenizer, text, spans, prompt_chars, keep)
        ex = _right_truncate(ids, labels, max_length, on_overflow)
        if ex is not None:
            examples.append(ex)
    if not examples:
        return None
    dropped = len(rendered.sequences) - len(examples)
    single = len(examples[0].input_ids) if rendered.mode == "append" and not examples[0].truncated else \
        len(_encode(tokenizer, rendered.full, keep=keep)[0])
    return TokenizedConversation(examples, rendered.mode, single, rendered.adapted, dropped)


def _check_all(messages: list[Message], full: str, chat: ChatOptions) -> None:
    """train_on: all trains the conversation as the template renders it whole: refused where
    that would lose or train a trace against data.reasoning."""
    traced = [i for i, m in enumerate(messages) if m.get("reasoning") and chat.reasoning != "drop"]
    if traced and chat.reasoning == "answer_only":
        raise TunesmithError("data.train_on: all trains every token, so data.reasoning: answer_only cannot keep the "
                             "traces as context; use train_on: assistant, or reasoning: train or drop")
    lost = next((i for i in traced if messages[i]["reasoning"].strip() not in full), None)
    if lost is not None:
        raise TunesmithError(f"data.train_on: all trains the conversation as the chat template renders it whole, "
                             f"which drops the reasoning of message {lost}; use train_on: assistant (each turn as "
                             "the model produces it), or data.reasoning: drop")


def tokenize_messages(messages: list[Message], tokenizer, **kw) -> TokenizedExample | None:
    """A conversation that is one training sequence (keywords as ``tokenize_conversation``);
    a history-rewriting template's multi-turn conversation is several: use that function."""
    conv = tokenize_conversation(messages, tokenizer, **kw)
    if conv is None:
        return None
    if len(conv.examples) > 1:
        raise TunesmithError(f"this conversation is {len(conv.examples)} training sequences under this chat template "
                             "(it rewrites earlier turns); use tokenize_conversation")
    return conv.examples[0]


def tokenize_text(text: str, tokenizer, *, max_length=None, on_overflow="error",
                  special_tokens_in_content: str = "error") -> TokenizedExample | None:
    """Language modelling: the tokenizer's own special tokens (BOS if it adds one) + EOS."""
    kept = as_text({"text": text}, tokenizer, special_tokens_in_content) is not None
    split = {"split_special_tokens": True} if kept else {}
    ids = list(tokenizer(text, add_special_tokens=True, **split)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return _right_truncate(ids, list(ids), max_length, on_overflow)


# -- prompt + responses: truncate the prompt from the left first -----------------------


def _prompt_ids(tokenizer, prompt: list[Message], tools, keep: AsText | None = None,
                chat: ChatOptions = DEFAULT_OPTIONS, adapt: frozenset | None = None) -> tuple[str, list[int], int]:
    """(prompt text with generation prompt, its ids, tokens to keep at least when cut)."""
    text, bare = render.prompt_text(prompt, tools, tokenizer, chat, adapt)
    ids, offsets = _encode(tokenizer, text, keep=keep)
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


def _response(prompt, resp, tools, tokenizer, chat, adapt, text: str) -> tuple[str, list[tuple[int, int]]]:
    """(the response's text after the prompt ``text``, its trained spans in prompt + response)."""
    ts, full, _ = render.turns(list(prompt) + list(resp), tools, tokenizer, chat, first=len(prompt), adapt=adapt)
    if not ts:
        raise TunesmithError("a response has no assistant message to train on")
    if len(ts) == 1:
        seq = ts[0].prompt + ts[0].text
    elif all(full.startswith(t.prompt + t.text) for t in ts):
        seq = full
    else:
        raise TunesmithError("a response of several assistant turns is rendered differently once later turns exist "
                             "under this chat template, so it is not one sequence; keep one assistant turn per "
                             "response")
    if not seq.startswith(text):
        raise TunesmithError("the chat template renders the prompt differently once a response follows it, so "
                             "chosen and rejected cannot share the prompt tokens; set data.chat_template")
    spans = [(len(t.prompt) + t.context, len(t.prompt) + len(t.text)) for t in ts]
    return seq[len(text):], spans


def _prompt_responses(prompt, responses, tokenizer, tools, max_length, on_overflow, keep=None,
                      chat: ChatOptions = DEFAULT_OPTIONS):
    """Shared prompt ids + one TokenizedExample per response (None when refused)."""
    adapt = frozenset().union(*(render.adaptation(list(prompt) + list(r), tools, tokenizer, chat) for r in responses))
    text, p_ids, keep_min = _prompt_ids(tokenizer, prompt, tools, keep, chat, adapt)
    parts = []
    for resp in responses:
        tail, spans = _response(prompt, resp, tools, tokenizer, chat, adapt, text)
        ids, offsets = _encode(tokenizer, tail, shift=len(text), keep=keep, first=False)
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
    special_tokens_in_content: str = "error", chat: ChatOptions = DEFAULT_OPTIONS,
) -> PreferenceExample | None:
    """A preference record → chosen and rejected sharing the same prompt tokens."""
    _check_options("assistant", on_overflow)
    keep, rec = _marked(record, tokenizer, special_tokens_in_content)
    kept, exs = _prompt_responses(rec["prompt"], [rec["chosen"], rec["rejected"]], tokenizer, rec.get("tools"),
                                  max_length, on_overflow, keep, chat)
    if exs is None:
        return None
    return PreferenceExample(chosen=exs[0], rejected=exs[1], prompt_len=len(kept))


def tokenize_unpaired(
    record: Record, tokenizer, *, max_length: int | None = None, on_overflow: str = "error",
    special_tokens_in_content: str = "error", chat: ChatOptions = DEFAULT_OPTIONS,
) -> UnpairedExample | None:
    """An "unpaired" record (prompt, completion, label) → its example and prompt length,
    for KTO (which pairs prompts with other records' completions for its KL estimate)."""
    _check_options("assistant", on_overflow)
    keep, rec = _marked(record, tokenizer, special_tokens_in_content)
    kept, exs = _prompt_responses(rec["prompt"], [rec["completion"]], tokenizer, rec.get("tools"),
                                  max_length, on_overflow, keep, chat)
    if exs is None:
        return None
    return UnpairedExample(completion=exs[0], prompt_len=len(kept), desirable=bool(record["label"]))


def tokenize_prompt(messages: list[Message], tokenizer, *, tools: list[dict] | None = None,
                    chat: ChatOptions = DEFAULT_OPTIONS, special_tokens_in_content: str | None = None) -> list[int]:
    """Prompt ids ending with the generation prompt, for generation and GRPO.
    ``special_tokens_in_content`` as in training ("error", "text"); None reads the prompt's
    text as the tokenizer does (a special token written in it becomes that token)."""
    if special_tokens_in_content is None:
        return _encode(tokenizer, render.prompt_text(messages, tools, tokenizer, chat)[0])[0]
    keep, rec = _marked({"prompt": messages, "tools": tools}, tokenizer, special_tokens_in_content)
    return _encode(tokenizer, render.prompt_text(rec["prompt"], rec["tools"], tokenizer, chat)[0], keep=keep)[0]


def tokenize_sequences(
    record: Record,
    tokenizer,
    *,
    max_length: int | None = None,
    train_on: str = "assistant",
    on_overflow: str = "error",
    special_tokens_in_content: str = "error",
    chat: ChatOptions = DEFAULT_OPTIONS,
) -> list[TokenizedExample] | None:
    """Any non-preference canonical record → its training sequences (None when dropped).

    "text", "unpaired" (prompt + completion; the completion trains) and "prompt" (ids
    only, all labels -100, left-truncated) are one sequence; "sft" is one per conversation
    or, under a history-rewriting template, one per trained assistant turn
    (``render.py``). Preference records go through ``tokenize_preference``.
    """
    _check_options(train_on, on_overflow)
    kind = kind_of(record)
    special = dict(special_tokens_in_content=special_tokens_in_content)
    if kind == "sft":
        conv = tokenize_conversation(record["messages"], tokenizer, tools=record.get("tools"), max_length=max_length,
                                     train_on=train_on, on_overflow=on_overflow, chat=chat, **special)
        return None if conv is None else conv.examples
    if kind == "text":
        ex = tokenize_text(record["text"], tokenizer, max_length=max_length, on_overflow=on_overflow, **special)
    elif kind == "unpaired":
        u = tokenize_unpaired(record, tokenizer, max_length=max_length, on_overflow=on_overflow, chat=chat, **special)
        ex = u.completion if u else None
    elif kind == "prompt":
        keep, rec = _marked(record, tokenizer, special_tokens_in_content)
        _, ids, _ = _prompt_ids(tokenizer, rec["prompt"], rec.get("tools"), keep, chat)
        # max_length is a hard limit for generation, so it wins over keep_min here.
        kept = _left_truncate(ids, max_length, tokenizer.bos_token_id) if max_length else ids
        ex = TokenizedExample(kept, [IGNORE_INDEX] * len(kept), len(ids), 0, 0, len(kept) < len(ids))
    else:
        raise TunesmithError(f"tokenize_sequences cannot take a {kind!r} record; use tokenize_preference")
    return None if ex is None else [ex]


def tokenize_training(record: Record, tokenizer, **kw) -> TokenizedConversation | None:
    """An SFT or text record as ``tokenize_conversation`` reports it (keywords as ``tokenize_sequences``)."""
    if kind_of(record) == "sft":
        return tokenize_conversation(record["messages"], tokenizer, tools=record.get("tools"), **kw)
    exs = tokenize_sequences(record, tokenizer, **kw)
    return None if exs is None else TokenizedConversation(exs, "append", exs[0].n_tokens)


def training_sequences(record: Record, tokenizer, **kw
                       ) -> tuple[list[tuple[str, TokenizedExample]], TokenizedConversation | None] | None:
    """Every sequence training makes of any record, named as ``data inspect`` shows them
    ("chosen"/"rejected", "sft, turn k of n", the kind), with the SFT or text record's
    TokenizedConversation (None for the others); None when every trained token is cut
    (``on_overflow="drop"``). Keywords as ``tokenize_sequences``; ``train_on`` is not used for
    pairs."""
    kind = kind_of(record)
    if kind == "preference":
        pe = tokenize_preference(record, tokenizer, **{k: v for k, v in kw.items() if k != "train_on"})
        return None if pe is None else ([("chosen", pe.chosen), ("rejected", pe.rejected)], None)
    if kind in ("sft", "text"):
        conv = tokenize_training(record, tokenizer, **kw)
        if conv is None:
            return None
        n = len(conv.examples)
        return [(f"sft, turn {k + 1} of {n}" if n > 1 else kind, ex) for k, ex in enumerate(conv.examples)], conv
    exs = tokenize_sequences(record, tokenizer, **kw)
    return None if exs is None else ([(kind, ex) for ex in exs], None)


def tokenize_record(record: Record, tokenizer, **kw) -> TokenizedExample | None:
    """A record that is one training sequence (keywords as ``tokenize_sequences``)."""
    exs = tokenize_sequences(record, tokenizer, **kw)
    if exs is None:
        return None
    if len(exs) > 1:
        raise TunesmithError(f"this record is {len(exs)} training sequences under this chat template (it rewrites "
                             "earlier turns); use tokenize_sequences")
    return exs[0]
