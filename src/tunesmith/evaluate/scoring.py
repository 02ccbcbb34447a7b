"""Scoring model outputs: domain-accuracy scorers, and loading + dispatch for every suite.

Domain accuracy — the user's held-out records with reference answers, one JSON object per
line::

    {"id": "q1", "prompt": "What is 12 * 7?", "reference": 84, "method": "numeric"}
    {"id": "q2", "prompt": "Capital of France?\\nA) Lyon\\nB) Paris", "reference": "B",
     "options": ["Lyon", "Paris"], "method": "multiple_choice"}

``id`` is optional in user files (it defaults to ``line-N``); ``method`` defaults to the one
the caller passes (``exact_match`` by default). Methods (``SCORERS``; each
``(response, reference, **opts) -> bool``):

- ``exact_match``: SQuAD normalisation on both sides (lower-case, drop punctuation and the
  articles a/an/the, collapse whitespace); a list reference passes on any element.
- ``contains``: the normalised reference occurs, on word boundaries, in the response.
- ``regex``: ``re.search(reference, response)``; ``ignore_case=True`` to ignore case.
- ``numeric``: the *last* number in the response (commas, sign, decimals, exponent) equals
  the reference within ``rel_tol`` (default 0) or ``abs_tol`` (default 1e-6) — last, because
  models show their working before the result.
- ``multiple_choice``: the chosen option read from generated text (``extract_choice``);
  the reference is a letter, an option's text or a 0-based index.

Multiple choice by log-likelihood needs the model for the option scores; ``pick_by_loglik``
is the pure half that turns them into a choice.

Why loading lives here: a suite file is read once, then validated by the record rules of
its kind (``instructions.validate_constraints``, a refusal ``category``, an accuracy
``reference``), and ``score_suite`` dispatches to the matching scorer. Keeping both in the
one module that already imports every kind avoids an import cycle.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunesmith.data.readers import read_raw
from tunesmith.errors import DataError, TunesmithError
from tunesmith.evaluate.instructions import score_instructions, validate_constraints
from tunesmith.evaluate.refusal import score_refusal
from tunesmith.evaluate.stats import rate_summary

# --- normalisation and extraction -----------------------------------------------------

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# No digit or word char right before: "3-4" yields 3 and 4, not 3 and -4.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
                     r"|(?<![\w.])[-+]?\.\d+")
LETTERS = "ABCDEFGHIJ"


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 ``normalize_answer``: lower, drop punctuation, drop articles, squash spaces.

    Punctuation is any Unicode "P*" character, so curly quotes go too.
    """
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_number(text: str) -> float | None:
    """The last number in ``text`` ("1,234.5" → 1234.5), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def extract_choice(response: str, options: Sequence[str] | None = None) -> int | None:
    """The 0-based option a generated answer picks, or None if it picks none or several.

    Tried in order, from most to least explicit: "answer is B" / "Answer: (B)" (last one);
    then, unless several letters appear as "(X)" (the options restated), a leading "B)",
    "B.", "(B)", "**B**" or a bare "B", or the one "(B)" anywhere; last, the text of exactly
    one option. Letters must be capitals so the article "a" never reads
    as option A; with ``options`` only letters within range count.
    """
    valid = LETTERS[: len(options)] if options else LETTERS
    explicit = re.findall(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*[(\[*]*([A-J])\b", response)
    explicit = [x for x in explicit if x in valid]
    if explicit:
        return valid.index(explicit[-1])
    wrapped = {x for x in re.findall(r"\(([A-J])\)", response) if x in valid}
    if len(wrapped) > 1:  # "(A) Lyon or (B) Paris" restates the options, it picks none
        return None
    m = re.match(r"\s*[(\[*]*([A-J])(?:[)\].:*]|\s*$)", response)
    if m and m.group(1) in valid:
        return valid.index(m.group(1))
    if wrapped:
        return valid.index(wrapped.pop())
    if options:
        said = f" {normalize_answer(response)} "
        hits = [i for i, o in enumerate(options) if normalize_answer(o) and f" {normalize_answer(o)} " in said]
        if len(hits) == 1:
            return hits[0]
    return None


def choice_index(reference: Any, options: Sequence[str] | None = None) -> int | None:
    """A multiple-choice reference (letter, option text or 0-based index) as an index."""
    n = len(options) if options else len(LETTERS)
    if isinstance(reference, int) and not isinstance(reference, bool):
        return reference if 0 <= reference < n else None
    if not isinstance(reference, str):
        return None
    ref = reference.strip()
    if len(ref) == 1 and ref.upper() in LETTERS[:n]:
        return LETTERS.index(ref.upper())
    norm = [normalize_answer(o) for o in options or []]
    return norm.index(normalize_answer(ref)) if normalize_answer(ref) in norm else None


def pick_by_loglik(option_logps: Sequence[float], lengths: Sequence[int] | None = None) -> int:
    """The option with the highest log-likelihood (first on ties).

    With ``lengths`` (tokens per option) the per-token mean is compared instead, which
    stops long options losing just for having more tokens (lm-eval-harness's ``acc_norm``
    divides by characters; tokens are what the caller has).
    """
    if not option_logps:
        raise ValueError("pick_by_loglik needs at least one option")
    scores = list(option_logps)
    if lengths is not None:
        scores = [lp / max(1, n) for lp, n in zip(scores, lengths, strict=True)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# --- scorers: (response, reference, **opts) -> bool -----------------------------------


def _as_list(reference: Any) -> list[str]:
    return [str(r) for r in reference] if isinstance(reference, list) else [str(reference)]


def exact_match(response: str, reference: Any) -> bool:
    said = normalize_answer(response)
    return any(said == normalize_answer(r) for r in _as_list(reference))


def contains(response: str, reference: Any) -> bool:
    said = f" {normalize_answer(response)} "
    return any(normalize_answer(r) and f" {normalize_answer(r)} " in said for r in _as_list(reference))


def regex_match(response: str, reference: str, ignore_case: bool = False) -> bool:
    try:
        return re.search(reference, response, re.IGNORECASE if ignore_case else 0) is not None
    except re.error as e:
        raise TunesmithError(f"regex reference {reference!r} is not a valid regular expression: {e}") from e


def numeric_match(response: str, reference: Any, rel_tol: float = 0.0, abs_tol: float = 1e-6) -> bool:
    ref = _reference_number(reference)
    said = extract_number(response)
    return said is not None and math.isclose(said, ref, rel_tol=rel_tol, abs_tol=abs_tol)


def _reference_number(reference: Any) -> float:
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return float(reference)
    found = extract_number(str(reference))
    if found is None:
        raise TunesmithError(f"numeric reference {reference!r} holds no number")
    return found


def multiple_choice(response: str, reference: Any, options: Sequence[str] | None = None) -> bool:
    want = choice_index(reference, options)
    if want is None:
        raise TunesmithError(f"multiple-choice reference {reference!r} is neither a letter "
                             f"A-{LETTERS[len(options or LETTERS) - 1]}, an option's text nor an index")
    return extract_choice(response, options) == want


SCORERS: dict[str, Callable[..., bool]] = {
    "exact_match": exact_match,
    "contains": contains,
    "regex": regex_match,
    "numeric": numeric_match,
    "multiple_choice": multiple_choice,
}


def score(method: str, response: str, reference: Any, **opts: Any) -> bool:
    """Dispatch to ``SCORERS[method]``; options as documented there."""
    if method not in SCORERS:
        raise TunesmithError(f"unknown scoring method {method!r}; use one of {', '.join(SCORERS)}")
    return bool(SCORERS[method](response, reference, **opts))


def score_accuracy(records: Sequence[dict[str, Any]], responses: Sequence[str],
                   method: str = "exact_match", **opts: Any) -> dict[str, Any]:
    """Score responses (aligned with ``records``) against each record's ``reference``.

    A record's own ``method`` wins over ``method``; its ``options`` go to multiple choice.
    """
    items = []
    for record, response in zip(records, responses, strict=True):
        m = record.get("method", method)
        extra = {"options": record["options"]} if m == "multiple_choice" and "options" in record else {}
        items.append({"id": record["id"], "method": m,
                      "passed": score(m, response, record["reference"], **opts, **extra)})
    return {"items": items, "aggregate": {"n": len(items),
                                          "accuracy": rate_summary([it["passed"] for it in items])}}


# --- suites: load, validate, dispatch -------------------------------------------------

SUITE_DIR = Path(__file__).parent / "suites"
# Built-in suite name -> record kind.
BUILTIN_SUITES = {"instruction_following": "instruction_following",
                  "refusal_harmful": "refusal", "refusal_benign": "refusal"}
# Record kind -> the key that marks it, and its scorer (records, responses, **opts).
SUITE_KINDS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "instruction_following": ("constraints", score_instructions),
    "refusal": ("category", score_refusal),
    "accuracy": ("reference", score_accuracy),
}


def suite_kind(record: dict[str, Any], file: str = "", line: int | None = None) -> str:
    """Which suite a record belongs to, from its marking key (see ``SUITE_KINDS``)."""
    for kind, (key, _) in SUITE_KINDS.items():
        if key in record:
            return kind
    keys = ", ".join(f"'{key}' ({kind})" for kind, (key, _) in SUITE_KINDS.items())
    raise DataError(file, line, "", f"cannot tell which suite this record is for; it needs one of {keys}")


def load_suite(name_or_path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a built-in suite (``BUILTIN_SUITES``) or a user file, validated.

    The kind of a user file is taken from its first record unless ``kind`` is given. Any
    problem raises a ``TunesmithError`` naming file, line and field.
    """
    name = str(name_or_path)
    if name in BUILTIN_SUITES:
        path, kind = SUITE_DIR / f"{name}.jsonl", BUILTIN_SUITES[name]
    else:
        path = Path(name)
        if not path.exists():
            raise TunesmithError(f"{name}: not a built-in suite ({', '.join(BUILTIN_SUITES)}) "
                                 "nor an existing file; check the name or path")
    if kind is not None and kind not in SUITE_KINDS:
        raise TunesmithError(f"unknown suite kind {kind!r}; use one of {', '.join(SUITE_KINDS)}")
    errors: list[DataError] = []
    rows = list(read_raw(path, errors))
    if errors:
        raise errors[0]
    records, seen = [], {}
    for line, raw in rows:
        record = validate_record(raw, str(path), line, kind)
        kind = kind or suite_kind(record, str(path), line)
        if record["id"] in seen:
            raise DataError(str(path), line, "id", f"duplicate id {record['id']!r} (first on line "
                            f"{seen[record['id']]}); ids must be unique")
        seen[record["id"]] = line
        records.append(record)
    return records


def validate_record(raw: Any, file: str, line: int | None, kind: str | None = None) -> dict[str, Any]:
    """A checked copy of one suite record (``id`` filled in if missing), or a ``DataError``."""
    if not isinstance(raw, dict):
        raise DataError(file, line, "", f"each record must be a JSON object, got {type(raw).__name__}")
    kind = kind or suite_kind(raw, file, line)
    record = {"id": f"line-{line}", **raw}
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool) or record["id"] == "":
        raise DataError(file, line, "id", "must be a non-empty string or an integer")
    _require_text(record, "prompt", file, line)
    _KIND_CHECKS[kind](record, file, line)
    return record


def _require_text(record: dict[str, Any], key: str, file: str, line: int | None) -> None:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in record else f"got {value!r}"
        raise DataError(file, line, key, f"must be a non-empty string; {got}")


def _check_instruction(record: dict[str, Any], file: str, line: int | None) -> None:
    validate_constraints(record.get("constraints"), file, line)


def _check_refusal(record: dict[str, Any], file: str, line: int | None) -> None:
    _require_text(record, "category", file, line)


def _check_accuracy(record: dict[str, Any], file: str, line: int | None) -> None:
    method, ref, options = record.get("method"), record.get("reference"), record.get("options")
    if method is not None and method not in SCORERS:
        raise DataError(file, line, "method", f"unknown scoring method {method!r}; use one of "
                        f"{', '.join(SCORERS)}")
    if ref is None or ref == "" or ref == [] or isinstance(ref, (bool, dict)):
        raise DataError(file, line, "reference", "must be a string, a number or a list of strings")
    if options is not None and not (isinstance(options, list) and len(options) >= 2
                                    and all(isinstance(o, str) and o.strip() for o in options)):
        raise DataError(file, line, "options", "must be a list of at least 2 non-empty strings")
    if method == "multiple_choice" and choice_index(ref, options) is None:
        raise DataError(file, line, "reference", f"{ref!r} is neither an option letter, an option's "
                        "text nor a 0-based index")
    if method == "numeric" and not isinstance(ref, (int, float)) and extract_number(str(ref)) is None:
        raise DataError(file, line, "reference", f"{ref!r} holds no number for the numeric method")
    if method == "regex":
        try:
            re.compile(ref)
        except (re.error, TypeError) as e:
            raise DataError(file, line, "reference", f"not a valid regular expression: {e}") from e


_KIND_CHECKS: dict[str, Callable[[dict[str, Any], str, int | None], None]] = {
    "instruction_following": _check_instruction,
    "refusal": _check_refusal,
    "accuracy": _check_accuracy,
}


def score_suite(kind: str, records: Sequence[dict[str, Any]], responses: Sequence[str],
                **opts: Any) -> dict[str, Any]:
    """``{"items": [...], "aggregate": {...}}`` from the scorer of ``kind`` (``SUITE_KINDS``)."""
    if kind not in SUITE_KINDS:
        raise TunesmithError(f"unknown suite kind {kind!r}; use one of {', '.join(SUITE_KINDS)}")
    return SUITE_KINDS[kind][1](records, responses, **opts)
