"""Show a tokenized example the way the loss sees it: which tokens train, which don't.

``render_tokens(tok, ids, labels, color=True)`` returns rich markup (print it with
``tunesmith.console.out.print``): trained tokens green, ignored ones dim. With
``color=False`` it is plain text where each run of trained tokens is wrapped in
``[[`` ``]]`` (print it with ``markup=False``). Either way newlines show as ``↵`` (and
still break the line), tabs as ``⇥``, carriage returns as ``␍``, other control
characters as ``\\xNN``, and a last line sums up: tokens, trained, ignored.
"""

from __future__ import annotations

from rich.markup import escape

from tunesmith.data.tokenize import IGNORE_INDEX
_CONTEXT = 3  # tokens of left context when decoding one token (see _pieces)


def _visible(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\n":
            out.append("↵\n")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("␍")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _pieces(tokenizer, input_ids: list[int]) -> list[str]:
    """Each token's text as it reads inside the sequence.

    Decoding a token alone loses the leading space of SentencePiece tokens ("▁Hi" → "Hi"),
    so each piece is the difference between decoding it with 3 tokens of left context
    and decoding the context alone (O(n), not O(n²)).
    """
    def dec(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces = []
    for k in range(len(input_ids)):
        ctx = input_ids[max(0, k - _CONTEXT):k]
        before, now = dec(ctx), dec(ctx + [input_ids[k]])
        pieces.append(now[len(before):] if now.startswith(before) else dec([input_ids[k]]))
    return pieces


def trained_spans(labels: list[int]) -> list[list[int]]:
    """The ids of each run of consecutive trained positions (for ``data inspect --json``)."""
    spans: list[list[int]] = []
    prev = False
    for label in labels:
        trained = label != IGNORE_INDEX
        if trained and not prev:
            spans.append([])
        if trained:
            spans[-1].append(label)
        prev = trained
    return spans


def token_summary(labels: list[int]) -> str:
    """One line: '42 tokens, 17 trained (40%), 25 ignored'."""
    n = len(labels)
    trained = sum(label != IGNORE_INDEX for label in labels)
    pct = 100.0 * trained / n if n else 0.0
    return f"{n} tokens, {trained} trained ({pct:.0f}%), {n - trained} ignored"


def render_tokens(tokenizer, input_ids: list[int], labels: list[int], *, color: bool) -> str:
    """The example's text with trained tokens marked, then a summary line (see module doc)."""
    pieces = _pieces(tokenizer, list(input_ids))
    out: list[str] = []
    in_run = False
    for piece, label in zip(pieces, labels):
        trained = label != IGNORE_INDEX
        text = _visible(piece)
        if color:
            style = "green" if trained else "dim"
            # Close the style before a newline so a terminal's line breaks stay clean.
            out.extend(p if p in ("", "\n") else f"[{style}]{escape(p)}[/{style}]" for p in _split_keep(text))
        else:
            if trained and not in_run:
                out.append("[[")
            elif not trained and in_run:
                out.append("]]")
            in_run = trained
            out.append(text)
    if in_run:
        out.append("]]")
    return "".join(out) + "\n" + token_summary(list(labels))


def _split_keep(text: str) -> list[str]:
    """'a↵\\nb' → ['a↵', '\\n', 'b']: newlines as their own unstyled parts."""
    parts: list[str] = []
    for i, line in enumerate(text.split("\n")):
        if i:
            parts.append("\n")
        parts.append(line)
    return parts
