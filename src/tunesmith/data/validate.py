"""The ``data check`` report and the loading API the trainer uses.

    report = check_files(["data/train.jsonl"])            # never raises on bad records
    report.ok, report.to_dict(), render_report(report)    # JSON-ready / rich renderable
    records = load_records("data/train.jsonl", expect={"sft", "text"}, purpose="method sft")
    train, eval_ = split_records(records, 0.1, seed=0)
    write_jsonl(train, "out/train.jsonl")                 # atomic: temp file + rename

Errors make a file fail (``report.ok`` is False, ``load_records`` raises one summary);
warnings do not: skipped blank lines and duplicate records (same canonical record,
``meta`` ignored) — the LLaMA-Factory demo sets hold a few duplicates and train fine.
Token statistics (only with a tokenizer) are computed untruncated and the cost of
``max_length`` is counted from the labels: trained tokens at positions >= max_length.
With a tokenizer, a special token inside a record's text (``<|im_end|>`` in a response)
is an error at ``file:line:field`` unless ``special_tokens_in_content="text"``
(data/tokenize.py); ``load_records(..., tokenizer=tok)`` runs that check alone.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.formats import normalise_records
from tunesmith.data.render import DEFAULT_OPTIONS, ChatOptions
from tunesmith.data.readers import SUFFIXES, RecordProblem, read_raw
from tunesmith.data.schema import Record, kind_of
from tunesmith.errors import DataError, TunesmithError



@dataclass
class TokenStats:
    """Token lengths of one file's records (preference pairs: the longer of the two)."""

    max_length: int | None
    count: int = 0
    min: int = 0
    median: float = 0
    p95: int = 0
    max: int = 0
    trained_tokens: int = 0  # trained tokens before truncation, all records
    truncated: int = 0  # records longer than max_length
    trained_tokens_lost: int = 0  # trained tokens at positions >= max_length (right cut, estimate)
    zero_trained: list[int] = field(default_factory=list)  # lines of records that train nothing
    formatting: Any = None  # data.tokenize.Formatting of SFT conversations: append or per-turn, and its cost

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["formatting"] = self.formatting.to_dict() if self.formatting is not None else None
        return out


@dataclass
class FileReport:
    file: str
    format: str | None = None
    kind: str | None = None
    records: int = 0  # records read from the file (before validation)
    errors: list[DataError] = field(default_factory=list)
    warnings: list[DataError] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (line, line of first occurrence)
    tokens: TokenStats | None = None
    entries: list[tuple[int, Record]] = field(default_factory=list, repr=False)
    images: dict | None = None  # {count, files, records, min, max, formats} when records hold images

    @property
    def reasoning_turns(self) -> int:
        """Assistant messages that carry a reasoning trace (the canonical ``reasoning`` field)."""
        return sum(1 for _, rec in self.entries for k in ("messages", "prompt", "chosen", "rejected", "completion")
                   for m in (rec.get(k) if isinstance(rec.get(k), list) else ()) if m.get("reasoning"))

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def valid(self) -> int:
        return len(self.entries)

    def problems(self) -> Counter:
        return Counter(getattr(e, "code", "invalid") for e in self.errors + self.warnings)

    def to_dict(self) -> dict[str, Any]:
        def d(e: DataError) -> dict:
            return e.to_dict() if isinstance(e, RecordProblem) else {
                "file": e.file, "line": e.line, "field": e.field, "reason": e.reason, "message": str(e)}
        return {
            "file": self.file, "ok": self.ok, "format": self.format, "kind": self.kind,
            "records": self.records, "valid": self.valid, "problems": dict(self.problems()),
            "errors": [d(e) for e in self.errors], "warnings": [d(e) for e in self.warnings],
            "duplicates": [{"line": a, "first": b} for a, b in self.duplicates],
            "reasoning_turns": self.reasoning_turns,
            "tokens": self.tokens.to_dict() if self.tokens else None,
            "images": self.images,
        }


@dataclass
class Report:
    files: list[FileReport]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    @property
    def errors(self) -> list[DataError]:
        return [e for f in self.files for e in f.errors]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": sum(f.records for f in self.files),
                "errors": len(self.errors), "files": [f.to_dict() for f in self.files]}


def _unit(file: str) -> str:
    return "line" if SUFFIXES.get(Path(file).suffix.lower()) in ("jsonl", "csv") else "record"


def _dedupe_key(rec: Record) -> str:
    return json.dumps({k: v for k, v in rec.items() if k != "meta"}, sort_keys=True, ensure_ascii=False)


def check_file(path: str | Path, *, format: str | None = None, columns: dict[str, str] | None = None,
               tokenizer=None, max_length: int | None = None, special_tokens_in_content: str = "error",
               chat: ChatOptions = DEFAULT_OPTIONS) -> FileReport:
    """Read, normalise and validate one file; every problem lands in the report."""
    rep = FileReport(str(path))
    try:
        rows = list(read_raw(path, rep.errors, rep.warnings))
    except DataError as e:  # the whole file is unreadable
        rep.errors.append(e)
        return rep
    rep.records = len(rows)
    nf = normalise_records(rows, str(path), rep.errors, format=format, columns=columns)
    rep.format, rep.kind, rep.entries = nf.format, nf.kind, nf.entries
    seen: dict[str, int] = {}
    unit = _unit(rep.file)
    for line, rec in rep.entries:
        first = seen.setdefault(_dedupe_key(rec), line)
        if first != line:
            rep.duplicates.append((line, first))
            rep.warnings.append(RecordProblem(rep.file, line, "", f"duplicate of the record at {unit} {first}",
                                              "duplicate"))
    check_images(rep)
    if tokenizer is not None:
        rep.tokens = token_stats(rep, tokenizer, max_length, special_tokens_in_content, chat)
    rep.errors.sort(key=lambda e: (e.line is not None, e.line or 0))
    return rep


def check_images(rep: FileReport) -> None:
    """Open every image the records name (once per picture): a missing, undecodable or absurdly
    sized one is an error at its ``file:line:field``; sizes go to ``rep.images``."""
    from tunesmith.data.images import images_of, open_image

    seen: dict[str, tuple | str] = {}
    count, records = 0, 0
    for line, rec in rep.entries:
        refs = images_of(rec)
        records += bool(refs)
        for fld, ref in refs:
            count += 1
            if ref not in seen:
                try:
                    seen[ref] = open_image(ref)
                except ValueError as e:
                    seen[ref] = str(e)
            if isinstance(seen[ref], str):
                rep.errors.append(RecordProblem(rep.file, line, fld, seen[ref], "image"))
    sizes = [v for v in seen.values() if not isinstance(v, str)]
    if count:
        rep.images = {"count": count, "files": len(seen), "records": records,
                      "min": f"{min(w for w, _, _ in sizes)}x{min(h for _, h, _ in sizes)}" if sizes else None,
                      "max": f"{max(w for w, _, _ in sizes)}x{max(h for _, h, _ in sizes)}" if sizes else None,
                      "formats": sorted({f for _, _, f in sizes})}


def check_files(paths: Iterable[str | Path], **kw: Any) -> Report:
    """``check_file`` for each path (keyword arguments as there)."""
    return Report([check_file(p, **kw) for p in paths])


def _tokenize(rec: Record, tokenizer, max_length: int | None, special: str, chat):
    """(the record's sequences as training tokenizes them or None when all trained tokens are
    cut, the SFT conversation's TokenizedConversation or None)."""
    from tunesmith.data.tokenize import training_sequences

    got = training_sequences(rec, tokenizer, max_length=max_length, on_overflow="drop",
                             special_tokens_in_content=special, chat=chat)
    return (None, None) if got is None else ([ex for _, ex in got[0]], got[1])


def token_stats(rep: FileReport, tokenizer, max_length: int | None, special: str = "error",
                chat: ChatOptions = DEFAULT_OPTIONS) -> TokenStats:
    """Token-length distribution and the cost of ``max_length``; template problems become errors.

    The cost is measured by tokenizing as training does: SFT loses tokens from the right,
    preference and unpaired records lose prompt tokens from the left first. A conversation
    under a history-rewriting template counts its longest per-turn sequence, and the file's
    ``formatting`` says what the per-turn mode costs."""
    from tunesmith.data.special_tokens import SpecialTokenError
    from tunesmith.data.tokenize import Formatting

    st = TokenStats(max_length)
    lengths = []
    formatting = Formatting()
    from tunesmith.data.images import has_images

    for line, rec in rep.entries:
        if has_images(rec):  # a text model's template cannot show them: counted in rep.images instead
            continue
        try:  # untruncated first, so the report sees the full lengths
            exs, conv = _tokenize(rec, tokenizer, None, special, chat)
            cut = _tokenize(rec, tokenizer, max_length, special, chat)[0] if max_length is not None else exs
        except SpecialTokenError as e:
            rep.errors.append(RecordProblem(rep.file, line, e.field, e.reason, "special_token"))
            continue
        except TunesmithError as e:
            rep.errors.append(RecordProblem(rep.file, line, "", str(e), "template"))
            continue
        if conv is not None and kind_of(rec) == "sft":
            formatting.add(conv)
        n = max(ex.n_tokens for ex in exs)
        lengths.append(n)
        full = sum(ex.n_trained_full for ex in exs)
        kept = 0 if cut is None else sum(ex.n_trained for ex in cut)
        if max_length is not None and n > max_length:
            st.truncated += 1
        st.trained_tokens += full
        st.trained_tokens_lost += full - kept
        if kind_of(rec) != "prompt" and (full == 0 or cut is None):
            st.zero_trained.append(line)
            why = ("trains no tokens (no assistant content)" if full == 0 else
                   f"every trained token lies beyond max_length {max_length}; raise max_length or "
                   "shorten the prompt")
            rep.errors.append(RecordProblem(rep.file, line, "", why, "zero_trained"))
    st.formatting = formatting if formatting.records else None
    if lengths:
        s = sorted(lengths)
        st.count, st.min, st.max = len(s), s[0], s[-1]
        st.median = statistics.median(s)
        st.p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
    return st


# --- loading API --------------------------------------------------------------------


def _paths(path_or_paths: str | Path | Iterable[str | Path]) -> list[str]:
    if isinstance(path_or_paths, (str, Path)):
        return [str(path_or_paths)]
    return [str(p) for p in path_or_paths]


def summarise(errors: list[DataError], paths: list[str]) -> DataError:
    """One DataError: the first problem, how many more, and the command that lists them all."""
    first = errors[0]
    more = len(errors) - 1
    reason = first.reason.rstrip(".")
    if more:
        reason += f"; and {more} more problem{'s' * (more > 1)}"
    reason += f" — run `tunesmith data check {' '.join(paths)}` for the full list"
    return RecordProblem(first.file, first.line, first.field, reason, getattr(first, "code", "invalid"))


def _special_token_errors(rep: FileReport, tokenizer) -> None:
    from tunesmith.data.special_tokens import SpecialTokenError, find_special_token

    for line, rec in rep.entries:
        hit = find_special_token(rec, tokenizer)
        if hit is not None:
            e = SpecialTokenError(*hit)
            rep.errors.append(RecordProblem(rep.file, line, e.field, e.reason, "special_token"))
    rep.errors.sort(key=lambda e: (e.line is not None, e.line or 0))


def load_records(path_or_paths: str | Path | Iterable[str | Path], *, format: str | None = None,
                 columns: dict[str, str] | None = None, expect: set[str] | None = None,
                 purpose: str | None = None, tokenizer=None, special_tokens_in_content: str = "error"
                 ) -> list[Record]:
    """Canonical records from one or more files, or ONE ``DataError`` summarising every problem.

    ``expect`` is the set of acceptable kinds; ``purpose`` names who needs them
    ("method sft") in the error: "data/prefs.jsonl holds preference records; method sft
    needs sft or text records". With ``tokenizer`` (and ``special_tokens_in_content``
    "error"), a special token inside a record's text is one of those problems, located
    at ``file:line:field`` (tokenization would refuse it later without the line).
    """
    paths = _paths(path_or_paths)
    report = check_files(paths, format=format, columns=columns)
    if tokenizer is not None and special_tokens_in_content == "error":
        for f in report.files:
            _special_token_errors(f, tokenizer)
    if not report.ok:
        raise summarise(report.errors, paths)
    records: list[Record] = []
    for f in report.files:
        if expect is not None and f.kind not in expect:
            need = " or ".join(sorted(expect))
            raise TunesmithError(f"{f.file} holds {f.kind} records; {purpose or 'this step'} needs {need} "
                                 "records")
        records.extend(rec for _, rec in f.entries)
    return records


def load_training(train: Any, eval_split: float, seed: int, **read: Any) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records of a run config's ``data.train``: mixed as its entries ask
    (``data.mix``), the held-out part (``eval_split`` > 0) taken before the mix, so that no
    copy of a record lands on both sides. Plain paths read as one ``load_records`` call."""
    from tunesmith.data import mix

    srcs = mix.sources(train)
    if all(s.plain for s in srcs):
        records = load_records([s.path for s in srcs], **read)
        return split_records(records, eval_split, seed) if eval_split > 0 else (records, [])
    # a source asked for nothing (weight or count 0) gives none to the held-out part either
    groups = [load_records(s.path, **read) if s.weight != 0 and s.count != 0 else [] for s in srcs]
    held: list[Record] = []
    if eval_split > 0:
        train_part, held_part = split_records([(g, r) for g, recs in enumerate(groups) for r in recs], eval_split, seed)
        groups = [[r for g, r in train_part if g == i] for i in range(len(groups))]
        held = [r for _, r in held_part]
    return mix.mix(groups, srcs, seed), held


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic split: ``round(fraction * n)`` records (at least 1) go to eval.

    Both parts keep the source order, so the split files diff cleanly against the input.
    """
    if not 0 < fraction < 1:
        raise TunesmithError(f"split fraction must be between 0 and 1 (e.g. 0.1), got {fraction}")
    n = len(records)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise TunesmithError(f"cannot split {n} record(s) with fraction {fraction}: the train part would be "
                             "empty; use a smaller fraction or more records")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write one JSON object per line, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- rendering ----------------------------------------------------------------------


def render_report(report: Report, *, limit: int = 20):
    """A rich renderable of the report (the CLI prints it; nothing here prints)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    for f in report.files:
        status = "[green]ok[/green]" if f.ok else f"[red]{len(f.errors)} error(s)[/red]"
        what = f"{f.records} record{'s' * (f.records != 1)}" + (f", format {f.format}" if f.format else "") \
            + (f", kind {f.kind}" if f.kind else "")
        parts.append(Text.from_markup(f"[bold]{escape(f.file)}[/bold]: {escape(what)} — {status}"))
        counts = f.problems()
        if counts:
            parts.append(Text("  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))))
        if f.images:
            im = f.images
            parts.append(Text(f"  images: {im['count']} in {im['records']} record(s), {im['files']} distinct file(s)"
                              + (f", {im['min']} to {im['max']} pixels ({', '.join(im['formats'])})" if im["min"]
                                 else "")))
        if f.tokens and f.tokens.count:
            t = f.tokens
            tab = Table(box=None, padding=(0, 2), show_header=True)
            for col in ("tokens", "min", "median", "p95", "max", "trained"):
                tab.add_column(col, justify="right")
            tab.add_row("", str(t.min), f"{t.median:g}", str(t.p95), str(t.max), str(t.trained_tokens))
            parts.append(tab)
            if f.reasoning_turns:
                parts.append(Text(f"  reasoning: {f.reasoning_turns} assistant turn(s) carry a trace"))
            if t.formatting is not None:
                parts.append(Text(f"  chat template mode: {t.formatting.summary()}"))
            if t.max_length is not None:
                parts.append(Text(f"  max_length {t.max_length}: {t.truncated} record(s) truncated, "
                                  f"{t.trained_tokens_lost} trained token(s) lost; "
                                  f"{len(t.zero_trained)} record(s) train nothing"))
        for title, items, style in (("errors", f.errors, "red"), ("warnings", f.warnings, "yellow")):
            if title == "warnings":
                items = [w for w in items if getattr(w, "code", "") != "duplicate"]
            for e in items[:limit]:
                parts.append(Text(f"  {e}", style=style))
            if len(items) > limit:
                parts.append(Text(f"  … and {len(items) - limit} more {title} (use --json for all)"))
        if f.duplicates:
            shown = ", ".join(f"{a}→{b}" for a, b in f.duplicates[:8])
            more = f" and {len(f.duplicates) - 8} more" if len(f.duplicates) > 8 else ""
            parts.append(Text(f"  {len(f.duplicates)} duplicate record(s) ({_unit(f.file)} → first "
                              f"occurrence: {shown}{more})", style="yellow"))
    return Group(*parts)
