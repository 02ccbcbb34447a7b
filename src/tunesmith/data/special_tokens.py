"""Special tokens written inside a record's text (``data.special_tokens_in_content``).

A tokenizer reads its special tokens (``<|im_end|>``, ``<|eot_id|>``, ``</s>``…) wherever
they appear in text, so a response holding ``<|im_end|>\n<|im_start|>user\n…`` would
train a fake user turn inside the assistant span. ``"error"`` (default) refuses such a
record with ``SpecialTokenError`` naming the field (``messages.1.content``) and the token.
``"text"`` keeps them as plain text: while the template renders, each occurrence in the
record's strings is a same-length run of a private-use character (so every character
position, and with it the trained spans ``render.py`` found, stays the same); the rendered text then
gets the tokens back and is encoded piece by piece, the template's own text with
special-token parsing and the record's occurrences without it. The masking contract
(``tokenize.py``) holds unchanged: only the ids inside those pieces differ (ordinary text tokens). Records
without special tokens tokenize identically under both settings.

``tokenize.py`` calls ``as_text`` once per record and, with the keeper it returns, encodes
the rendered text through ``AsText`` (``encode_piece`` is the one way a piece of text
becomes ids, for both).
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any

from tunesmith.data.schema import Record
from tunesmith.errors import TunesmithError

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


class AsText:
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
        ids, offsets = encode_piece(tokenizer, piece, first, as_text=True)
        if self.special_ids & set(ids):
            raise TunesmithError(f"this tokenizer makes a special token from the plain text {piece!r}, so it "
                                 "cannot be kept as text; remove it from the data")
        return ids, offsets


def as_text(record: Record, tokenizer, special_tokens_in_content: str) -> AsText | None:
    """None when the record holds no special token; refused under "error"; else the keeper."""
    if special_tokens_in_content not in SPECIAL_TOKENS_IN_CONTENT:
        raise TunesmithError(f"special_tokens_in_content must be one of {SPECIAL_TOKENS_IN_CONTENT}, not "
                             f"{special_tokens_in_content!r}")
    hit = find_special_token(record, tokenizer)
    if hit is None:
        return None
    if special_tokens_in_content == "error":
        raise SpecialTokenError(*hit)
    return AsText(tokenizer)


def encode_piece(tokenizer, piece: str, first: bool, as_text: bool = False):
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
