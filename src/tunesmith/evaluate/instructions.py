"""Instruction following: prompts whose constraints are checked by code, not by a judge.

In the spirit of IFEval (Zhou et al. 2023, arXiv:2311.07911): every constraint is a
yes/no fact about the text, so the score is reproducible and needs no second model.

Record format — the built-in ``suites/instruction_following.jsonl`` and user files alike,
one JSON object per line::

    {"id": "if-001", "prompt": "Describe a river in under 50 words.",
     "constraints": [{"type": "max_words", "value": 50},
                     {"type": "include_keywords", "value": ["river"]}]}

Constraint types (``value`` as given; "—" means no value):

=================  ===========================  ==============================================
type               value                        passes when the response …
=================  ===========================  ==============================================
max_words          N (int ≥ 1)                  has at most N words
min_words          N                            has at least N words
max_sentences      N                            has at most N sentences
min_sentences      N                            has at least N sentences
include_keywords   ["w", ...]                   contains every word (any case; plural "s"/"es"
                                                and possessive "'s" also count)
forbidden_words    ["w", ...]                   contains none of the words (same matching)
all_lowercase      —                            has letters and no capital letter
all_uppercase      —                            has letters and no lower-case letter
json_format        — or {"key": "type", ...}    is valid JSON once ``` fences are stripped; with
                                                a schema, an object holding each key with its
                                                type (string, number, integer, boolean, array,
                                                object, null)
bullet_points      N                            has exactly N lines starting "- ", "* ", "• ",
                                                "+ " or "1. " / "1) "
starts_with        "phrase"                     starts with the phrase (any case, ignoring
                                                leading quotes, ``*``, ``#``)
ends_with          "phrase"                     ends with the phrase (any case, ignoring
                                                trailing quotes and ``*``; a final "." or "!" is
                                                ignored unless the phrase has one)
title              —                            has a title in <<double angular brackets>>
postscript         — or "P.S."                  has a line starting with the marker
paragraphs         N                            has exactly N paragraphs separated by blank lines
language           "en" | "fr" | "es" | "de"    is in that language, by a stop-word count
placeholders       N                            has at least N square-bracket placeholders such
                                                as [name] (markdown links do not count)
no_commas          —                            has no comma
wrapped_in_quotes  —                            is wrapped in double quotes
=================  ===========================  ==============================================

Counting rules, shared by all checkers: a word is a run of letters/digits (apostrophes
inside, as in "don't", stay one word); a sentence ends at ".", "!" or "?" followed by
whitespace, or at a line break, and must hold a word — so "e.g. this" counts two.
The language check counts distinctive stop words per language: the asked language must
have the most hits, at least 2, and at least 10% of the words.

Validation (``validate_constraints``) names the file, line and field of a bad constraint,
lists the known types, and rejects records whose constraints contradict each other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from tunesmith.errors import DataError
from tunesmith.evaluate.stats import bootstrap_interval, rate_summary

# --- counting -------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_BULLET = re.compile(r"^[ \t]*(?:[-*•+]|\d{1,3}[.)])[ \t]+\S", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_TITLE = re.compile(r"<<[^<>\n]*\w[^<>\n]*>>")
# [name], [Your Address]; not markdown links [text](url) nor empty checkboxes "[ ]".
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]*\w[^\[\]\n]*\](?!\()")
# Curly apostrophes read as straight ones, so "You’ve" matches a phrase typed "You've".
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'"})
_CODE_FENCE = re.compile(r"^```[\w+-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def count_sentences(text: str) -> int:
    return sum(1 for piece in _SENTENCE_BREAK.split(text.strip()) if _WORD.search(piece))


def count_bullets(text: str) -> int:
    return len(_BULLET.findall(text))


def count_paragraphs(text: str) -> int:
    return sum(1 for chunk in _PARAGRAPH_BREAK.split(text.strip()) if _WORD.search(chunk))


def _mentions(text: str, word: str) -> bool:
    """Whole-word, any case; "river" also matches "rivers"/"river's" (a fair pass for a
    keyword request) but not "riverbank" or "unriver"."""
    pattern = r"(?<!\w)" + re.escape(word) + r"(?:s|es|'s|’s)?(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


# --- checkers: (response, value) -> bool ----------------------------------------------


def _max_words(text: str, n: int) -> bool:
    return len(words(text)) <= n


def _min_words(text: str, n: int) -> bool:
    return len(words(text)) >= n


def _max_sentences(text: str, n: int) -> bool:
    return count_sentences(text) <= n


def _min_sentences(text: str, n: int) -> bool:
    return count_sentences(text) >= n


def _include_keywords(text: str, kws: list[str]) -> bool:
    return all(_mentions(text, w) for w in kws)


def _forbidden_words(text: str, kws: list[str]) -> bool:
    return not any(_mentions(text, w) for w in kws)


def _all_lowercase(text: str, _: None) -> bool:
    return any(c.isalpha() for c in text) and text == text.lower()


def _all_uppercase(text: str, _: None) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


def strip_code_fence(text: str) -> str:
    """Small models wrap JSON in ```json fences even when told not to; the JSON inside is
    what was asked for, so the fence is not held against them."""
    text = text.strip()
    m = _CODE_FENCE.match(text)
    return m.group(1).strip() if m else text


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _json_format(text: str, schema: dict[str, str] | None) -> bool:
    try:
        obj = json.loads(strip_code_fence(text))
    except json.JSONDecodeError:
        return False
    if not schema:
        return True
    return isinstance(obj, dict) and all(k in obj and _JSON_TYPES[t](obj[k]) for k, t in schema.items())


def _bullet_points(text: str, n: int) -> bool:
    return count_bullets(text) == n


def _edge(text: str, phrase: str, at_end: bool) -> str:
    """``text`` lower-cased, with quotes, emphasis and whitespace trimmed from the checked
    edge (and a final "." or "!" when the phrase has none), so decoration a model adds
    around an otherwise exact phrase does not fail it."""
    decoration = "\"'“”*_` \t\n"
    text = text.translate(_APOSTROPHES)
    if at_end:
        text = text.rstrip(decoration)
        if phrase.rstrip()[-1:] not in ".!":
            text = text.rstrip(".!").rstrip(decoration)
    else:
        text = text.lstrip(decoration + "#")
    return text.lower()


def _starts_with(text: str, phrase: str) -> bool:
    return _edge(text, phrase, at_end=False).startswith(_phrase(phrase))


def _ends_with(text: str, phrase: str) -> bool:
    return _edge(text, phrase, at_end=True).endswith(_phrase(phrase))


def _phrase(phrase: str) -> str:
    return phrase.strip().translate(_APOSTROPHES).lower()


def _title(text: str, _: None) -> bool:
    return _TITLE.search(text) is not None


def _postscript(text: str, marker: str | None) -> bool:
    # "P.S." also matches "p.s.", "P. S." and "**P.S.**" at the start of a line.
    body = re.escape((marker or "P.S.").strip()).replace(r"\.", r"\.\s?")
    return re.search(r"^[ \t*_>]*" + body, text, re.MULTILINE | re.IGNORECASE) is not None


def _paragraphs(text: str, n: int) -> bool:
    return count_paragraphs(text) == n


# Only words distinctive to one language: "de", "la", "que", "en", "un" are shared by
# French and Spanish, "die"/"also" are English too, so they would blur the vote.
STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the and is are of to it that with for this you was have be on they what "
                    "your can will from or".split()),
    "fr": frozenset("le les et est des une dans pour qui pas avec sur du au aux vous nous ce cette "
                    "sont je il elle mais très votre être ou".split()),
    "es": frozenset("el los las y es por para del al muy pero como está están son su sus yo "
                    "también una puede hay".split()),
    "de": frozenset("der das und ist nicht mit ein eine einen ich sie zu dem auf für von sich "
                    "auch sind wir oder aber wie werden".split()),
}


def language_hits(text: str) -> dict[str, int]:
    toks = [w.lower() for w in words(text)]
    return {lang: sum(t in sw for t in toks) for lang, sw in STOP_WORDS.items()}


def _language(text: str, lang: str) -> bool:
    hits, n = language_hits(text), len(words(text))
    mine = hits[lang]
    others = max(v for k, v in hits.items() if k != lang)
    return mine >= 2 and mine > others and mine >= 0.1 * n


def _placeholders(text: str, n: int) -> bool:
    return len(_PLACEHOLDER.findall(text)) >= n


def _no_commas(text: str, _: None) -> bool:
    return "," not in text


def _wrapped_in_quotes(text: str, _: None) -> bool:
    t = text.strip()
    return len(t) >= 2 and t[0] in "\"“" and t[-1] in "\"”"


# --- registry -------------------------------------------------------------------------


class Constraint(NamedTuple):
    check: Callable[[str, Any], bool]
    value: str  # the value kind, a key of _VALUE_KINDS


CONSTRAINTS: dict[str, Constraint] = {
    "max_words": Constraint(_max_words, "count"),
    "min_words": Constraint(_min_words, "count"),
    "max_sentences": Constraint(_max_sentences, "count"),
    "min_sentences": Constraint(_min_sentences, "count"),
    "include_keywords": Constraint(_include_keywords, "word_list"),
    "forbidden_words": Constraint(_forbidden_words, "word_list"),
    "all_lowercase": Constraint(_all_lowercase, "none"),
    "all_uppercase": Constraint(_all_uppercase, "none"),
    "json_format": Constraint(_json_format, "schema"),
    "bullet_points": Constraint(_bullet_points, "count"),
    "starts_with": Constraint(_starts_with, "phrase"),
    "ends_with": Constraint(_ends_with, "phrase"),
    "title": Constraint(_title, "none"),
    "postscript": Constraint(_postscript, "marker"),
    "paragraphs": Constraint(_paragraphs, "count"),
    "language": Constraint(_language, "language"),
    "placeholders": Constraint(_placeholders, "count"),
    "no_commas": Constraint(_no_commas, "none"),
    "wrapped_in_quotes": Constraint(_wrapped_in_quotes, "none"),
}

CHECKERS: dict[str, Callable[[str, Any], bool]] = {name: c.check for name, c in CONSTRAINTS.items()}


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_phrase(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_word_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_phrase(w) for w in v)


def _is_schema(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and bool(v) and all(
        isinstance(k, str) and t in _JSON_TYPES for k, t in v.items()))


# value kind -> (accepts the value?, what to write instead, for the error message)
_VALUE_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (_is_count, "a whole number of at least 1"),
    "word_list": (_is_word_list, 'a non-empty list of non-empty strings, e.g. ["river"]'),
    "phrase": (_is_phrase, "a non-empty string"),
    "none": (lambda v: v is None, "no value (leave 'value' out)"),
    "marker": (lambda v: v is None or _is_phrase(v), 'no value or a marker string such as "P.S."'),
    "schema": (_is_schema, 'no value, or an object mapping keys to one of ' + ", ".join(_JSON_TYPES)),
    "language": (lambda v: v in STOP_WORDS, "one of " + ", ".join(f'"{k}"' for k in STOP_WORDS)),
}


# --- validation -----------------------------------------------------------------------


def validate_constraints(constraints: Any, file: str, line: int | None) -> None:
    """Raise ``DataError`` (file:line:field: reason) for the first bad constraint."""
    if not isinstance(constraints, list) or not constraints:
        raise DataError(file, line, "constraints", "must be a non-empty list of "
                        '{"type": ..., "value": ...} objects')
    seen: dict[str, Any] = {}
    for i, c in enumerate(constraints):
        field = f"constraints.{i}"
        if not isinstance(c, dict):
            raise DataError(file, line, field, 'must be an object like {"type": "max_words", "value": 50}')
        extra = sorted(set(c) - {"type", "value"})
        if extra:
            raise DataError(file, line, f"{field}.{extra[0]}", "unknown key; a constraint has only "
                            "'type' and 'value'")
        kind = c.get("type")
        if kind not in CONSTRAINTS:
            raise DataError(file, line, f"{field}.type", f"unknown constraint type {kind!r}; "
                            f"known types: {', '.join(CONSTRAINTS)}")
        accepts, wanted = _VALUE_KINDS[CONSTRAINTS[kind].value]
        if not accepts(c.get("value")):
            got = "missing" if "value" not in c else f"got {json.dumps(c['value'])}"
            raise DataError(file, line, f"{field}.value", f"{kind} needs {wanted}; {got}")
        if kind in seen:
            raise DataError(file, line, f"{field}.type", f"{kind} appears twice; merge them into one")
        seen[kind] = c.get("value")
    problem = contradiction(seen)
    if problem:
        raise DataError(file, line, "constraints", f"cannot all be met: {problem}")


# Format constraints that no JSON document can meet.
_NOT_WITH_JSON = ("bullet_points", "postscript", "wrapped_in_quotes")


def contradiction(c: dict[str, Any]) -> str | None:
    """Why constraints (type -> value) cannot all pass together, or None if they can.

    Catches the mistakes a prompt writer makes, not every logical conflict.
    """
    for unit in ("words", "sentences"):
        lo, hi = c.get(f"min_{unit}"), c.get(f"max_{unit}")
        if lo is not None and hi is not None and lo > hi:
            return f"min_{unit} {lo} > max_{unit} {hi}"
    if "all_lowercase" in c and "all_uppercase" in c:
        return "all_lowercase and all_uppercase"
    forbidden = c.get("forbidden_words", [])
    needed = c.get("include_keywords", []) + [c[k] for k in ("starts_with", "ends_with") if k in c]
    clash = [w for w in forbidden if any(_mentions(phrase, w) for phrase in needed)]
    if clash:
        return f"forbidden word {clash[0]!r} is also required"
    if "no_commas" in c and any("," in c[k] for k in ("starts_with", "ends_with") if k in c):
        return "no_commas but a required phrase has a comma"
    if "json_format" in c:
        other = [k for k in _NOT_WITH_JSON if k in c] + (["paragraphs"] if c.get("paragraphs", 1) > 1 else [])
        if other:
            return f"json_format with {other[0]}"
    return None


# --- scoring --------------------------------------------------------------------------


def check_response(constraints: Sequence[dict[str, Any]], response: str) -> list[dict[str, Any]]:
    """Per-constraint results: ``[{"type", "value", "passed"}]`` in the record's order."""
    return [{"type": c["type"], "value": c.get("value"),
             "passed": bool(CHECKERS[c["type"]](response, c.get("value")))} for c in constraints]


def score_item(record: dict[str, Any], response: str) -> dict[str, Any]:
    results = check_response(record["constraints"], response)
    return {"id": record["id"], "passed": all(r["passed"] for r in results), "constraints": results}


def _ratio(pairs: Sequence[tuple[int, int]]) -> float:
    return sum(p for p, _ in pairs) / sum(t for _, t in pairs)


def score_instructions(records: Sequence[dict[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """Score responses (aligned with ``records``) on the instruction-following suite.

    Aggregate: ``prompt_accuracy`` (all constraints of a prompt pass; IFEval's "strict
    prompt-level") with a Wilson interval; ``constraint_accuracy`` (share of all
    constraints passed) with a bootstrap interval over prompts, since constraints of one
    prompt share a response and are not independent; ``by_type`` rates for the report.
    """
    items = [score_item(r, resp) for r, resp in zip(records, responses, strict=True)]
    pairs = [(sum(c["passed"] for c in it["constraints"]), len(it["constraints"])) for it in items]
    by_type: dict[str, list[bool]] = {}
    for it in items:
        for c in it["constraints"]:
            by_type.setdefault(c["type"], []).append(c["passed"])
    low, high = bootstrap_interval(pairs, stat=_ratio) if pairs else (0.0, 1.0)
    passed, total = sum(p for p, _ in pairs), sum(t for _, t in pairs)
    constraint_accuracy = {"rate": passed / total if total else 0.0, "low": low, "high": high,
                           "successes": passed, "n": total}
    return {"items": items, "aggregate": {
        "n": len(items),
        "prompt_accuracy": rate_summary([it["passed"] for it in items]),
        "constraint_accuracy": constraint_accuracy,
        "by_type": {k: rate_summary(v) for k, v in sorted(by_type.items())},
    }}
