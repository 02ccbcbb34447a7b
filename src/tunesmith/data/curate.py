"""Dataset curation (``tunesmith data curate``): turn raw domain dumps into a training set, and
show what was removed and why.

    result = curate(["alpaca.json", "identity.json"], "clean.jsonl", eval_files=["eval.jsonl"])
    result.kept, result.removed, result.report                       # counts, examples, histograms

Rules, in this order, each switchable in ``CurateConfig`` (``data.curate_rules`` measures them):

1. normalise: Unicode NFC, non-breaking and zero-width spaces, trailing spaces, blank-line runs;
2. exact duplicates: the same record after normalisation (``meta`` ignored), across all inputs;
3. near duplicates: MinHash + LSH (``datasketch``) on word 3-grams of the record's whole
   text, Jaccard ≥ ``jaccard`` (0.8); the first kept occurrence stays, the later one names it;
4. contamination: a record whose prompt or response shares a word ``ngram``-gram (13, as the
   GPT-3 and Llama papers count) with any eval text — an eval text shorter than that counts
   when it appears whole (``min_eval_words`` words or more; tunesmith's own suites count by
   n-grams only); with ``split``, the train part is checked against the held-out part the same way;
5. quality, on what trains (SFT assistant turns, chosen, desirable completions, text; a turn
   that only calls a tool is no response): empty responses (fewer than ``min_response_words``
   words), repetitive responses (share of repeated word 3-grams above ``max_repetition``),
   refusal boilerplate in SFT targets and chosen responses ("As an AI language model…"),
   a language outside ``languages`` (lingua; off unless set), more than ``max_length`` tokens
   under the model's chat template (with a tokenizer), PII (e-mail addresses, phone numbers,
   API keys, in texts and tool-call arguments: ``flag`` keeps and lists them, ``mask``
   replaces them, ``remove`` drops them).

Then the kept records are split (``split``: held out per source and KTO label) and mixed
(``mix``: weights or counts per source, ``data.mix``), both seeded.

Nothing is lost: every removed record goes to ``OUT.removed.jsonl`` with its source
``file:N`` (N: the line of a JSONL or CSV file, the 0-based record of a JSON or Parquet one),
the rule and the evidence (the record it duplicates and the estimated Jaccard, the eval item
and the shared n-gram, the measured ratio, the phrase, the language, or how many of each PII
kind — counts, not the values, in the evidence and the reports).

Streaming: inputs are read record by record (``data.readers``), analysed in chunks by
``workers`` processes (all cores by default; fork, so the eval index and the tokenizer are
shared, not copied in), and decided in input order here; kept records stream to disk. Memory
holds the duplicate indexes (8 bytes of exact key, the LSH bands and a 512-byte signature per
kept record), a few chunks in flight, and 2-4 small integers per kept record for the split and
the mix — not the records.

Why MinHash through ``datasketch`` and our own n-gram index: MinHash + LSH is the standard
near-duplicate method (datatrove, the Pile, Gopher) and datasketch is its well-kept
implementation; the exact n-gram overlap of decontamination is a sorted-array lookup per
window, which numpy does directly.
"""

from __future__ import annotations

import json
import os
from array import array
from collections import Counter, deque
from contextlib import closing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tunesmith.data import mix as mixing
from tunesmith.data.curate_report import Counts, summary
from tunesmith.data.curate_rules import Analyser, EvalIndex, Facts, Grams, prompt_and_responses, strings
from tunesmith.data.schema import Record
from tunesmith.errors import TunesmithError
from tunesmith.files import LineWriter, write_text_atomic

RULES = ("exact_duplicate", "near_duplicate", "contaminated", "empty_response", "repetitive", "refusal",
         "wrong_language", "truncated", "pii", "mix_left_out")
CHUNK = 256           # records per task sent to a worker
_FILE_BITS = 40       # a kept record's source as one integer: file index << 40 | line
_PII_EXAMPLES = 50    # kept records with PII listed in the report (all are counted)


@dataclass
class CurateConfig:
    normalise: bool = True
    exact_duplicates: bool = True
    near_duplicates: bool = True
    jaccard: float = 0.8          # near-duplicate threshold (estimated Jaccard of word 3-grams)
    num_perm: int = 128           # MinHash permutations
    decontaminate: bool = True
    ngram: int = 13               # words shared with an eval text that make a record contaminated
    min_eval_words: int = 8       # an eval text shorter than ngram counts whole from this many words
    min_response_words: int = 1   # fewer words in a response: empty_response
    max_repetition: float = 0.5   # share of repeated word 3-grams in a response above which: repetitive
    refusals: bool = True         # remove refusal boilerplate from SFT targets and chosen responses
    languages: list = field(default_factory=list)  # ISO 639-1 codes to keep (e.g. [en]); [] = no language rule
    min_language_chars: int = 40  # shorter records are not judged by language (too little to tell)
    min_language_confidence: float = 0.6  # removed only when the other language is at least this likely
    pii: str = "flag"             # flag | mask | remove | off
    max_length: int = 0           # with a tokenizer: a record longer (tokens, untruncated) is removed; 0 = off
    split: float = 0.0            # fraction held out for evaluation, stratified by source (and KTO label)
    mix: list = field(default_factory=list)  # [{path, weight} | {path, count}] per input (data.mix); [] = all once
    seed: int = 0                 # of the split and the mix

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = type(f.default) if isinstance(f.default, (bool, int, float, str)) else list
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                default = f.default if want is not list else []
                raise TunesmithError(f"curate: {f.name} is {value!r}; it takes a {want.__name__} "
                                     f"(default {default!r})")
        if not 16 <= self.num_perm <= 1024:
            raise TunesmithError(f"curate: num_perm {self.num_perm} must be between 16 and 1024 (default 128)")
        if self.pii not in ("flag", "mask", "remove", "off"):
            raise TunesmithError(f"curate: pii {self.pii!r} is not a choice; use flag, mask, remove or off")
        if not 0 < self.jaccard <= 1:
            raise TunesmithError(f"curate: jaccard {self.jaccard} must be in (0, 1], e.g. 0.8")
        if self.ngram < 1 or self.min_eval_words < 1:
            raise TunesmithError("curate: ngram and min_eval_words must be at least 1 word")
        if not 0 <= self.split < 1 or self.max_length < 0:
            raise TunesmithError(f"curate: split {self.split} must be in [0, 1) and max_length {self.max_length} "
                                 f">= 0 (0 = off)")
        if not all(isinstance(x, str) and len(x) == 2 for x in self.languages):
            raise TunesmithError(f"curate: languages {self.languages!r} must be two-letter ISO 639-1 codes, "
                                 f"e.g. [en, de]")
        mixing.sources(self.mix, "curate: mix")


def config_from(raw: Any, where: str) -> CurateConfig:
    """A ``CurateConfig`` from a YAML mapping (``--config``, a pipeline's curate stage); an unknown
    or mistyped setting is one sentence naming it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TunesmithError(f"{where} must be a mapping of curate settings")
    names = {f.name for f in fields(CurateConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise TunesmithError(f"{where}: unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(names))}")
    cfg = CurateConfig(**raw)
    cfg.check()
    return cfg


@dataclass
class Result:
    kept: int = 0
    removed: int = 0
    flagged: list[dict] = field(default_factory=list)    # kept records with PII (the first 50)
    report: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------- eval texts


def eval_texts(paths: list[str]) -> list[tuple[str, str]]:
    """(``file:line``, text) of every string of every eval record — prompts, references,
    messages — in any file tunesmith reads (its own suites' ``{"id", "prompt", …}`` too)."""
    from tunesmith.data.readers import read_raw
    from tunesmith.data.validate import summarise

    out: list[tuple[str, str]] = []
    for path in paths:
        errors: list = []
        out += [(f"{path}:{line}", t) for line, raw in read_raw(path, errors) for t in strings(raw) if t.strip()]
        if errors:
            raise summarise(errors, [path])
    return out


def eval_index(cfg: CurateConfig, evals: list[tuple[str, str]], suites: list[tuple[str, str]]) -> EvalIndex | None:
    """The user's eval texts (shorter ones whole) and tunesmith's suites (13-grams only: their
    short generic questions would flag everyday records)."""
    if not cfg.decontaminate:
        return None
    index = EvalIndex(cfg.ngram, cfg.min_eval_words)
    index.add(evals, whole=True)
    index.add(suites, whole=False)
    return index.freeze()


# ---------------------------------------------------------------- reading and analysing


_ANALYSER: Analyser | None = None  # the worker processes' (inherited through fork)


def _analyse_chunk(task: tuple) -> tuple:
    """A worker's task: parse (JSONL) and normalise a chunk of one file's rows through the
    data layer, analyse each record, and send each back as its JSON line.
    → (file index, [(line, Facts)], the chunk's problems in line order, kinds)."""
    from tunesmith.data.formats import normalise_records
    from tunesmith.data.schema import kind_of

    file_index, file, rows, read, errors = task
    nf = normalise_records(_parsed(file, rows, errors), file, errors, **read)
    out = []
    for line, rec in nf.entries:
        facts = _ANALYSER.analyse(rec)
        facts.line, facts.record = json.dumps(facts.record, ensure_ascii=False) + "\n", None
        out.append((line, facts))
    errors.sort(key=lambda e: (e.line is not None, e.line or 0))
    return file_index, out, errors, [kind_of(rec) for _, rec in nf.entries[:1]]


def _parsed(file: str, rows: list, errors: list) -> list:
    """(line, raw record) of each row; a JSONL file's rows come unparsed, ``(line, (offset,
    bytes))`` (``read_raw(parse_jsonl=False)``), and are parsed here."""
    from tunesmith.data.readers import _NO_RECORD, SUFFIXES, jsonl_record

    if SUFFIXES.get(Path(file).suffix.lower()) != "jsonl":
        return rows
    parsed = ((line, jsonl_record(file, line, start, raw, errors)) for line, (start, raw) in rows)
    return [(line, obj) for line, obj in parsed if obj is not _NO_RECORD]


def _chunks(paths: list[str], read: dict) -> Iterator[tuple]:
    """(file index, file, rows, how to normalise them, the reader's problems with them) per
    ``CHUNK`` rows of each input (JSONL lines unparsed: the workers parse them); the file's
    format and prompt mode come from its first chunk (``data check`` decides them from the whole
    file). A problem travels with its chunk, so the run stops at the same one whatever the
    number of workers."""
    from tunesmith.data.formats import normalise_records
    from tunesmith.data.readers import read_raw
    from tunesmith.errors import DataError

    for i, path in enumerate(paths):
        found: list = []
        rows: list = []
        fixed = None

        def how() -> dict:  # the first chunk decides
            return fixed or _file_format(normalise_records(_parsed(path, rows, []), path, [], **read), read)

        try:
            for row in read_raw(path, found, parse_jsonl=False):
                rows.append(row)
                if len(rows) == CHUNK:
                    fixed = how()
                    yield i, path, rows, fixed, found[:]
                    rows, found[:] = [], []
        except DataError as e:  # the file as a whole cannot be read
            yield i, path, rows, fixed or read, [*found, e]
            return
        if rows or found:
            yield i, path, rows, how(), found[:]


def _file_format(nf, read: dict) -> dict:
    return {**read, "format": nf.format or read.get("format"), "prompt_mode": nf.prompt_mode}


def _in_order(tasks: Iterator[tuple], workers: int) -> Iterator[tuple]:
    """Each task's result in task order; ``workers`` processes at most two tasks ahead each
    (a bounded queue: the reader never runs ahead of the analysis by more than that)."""
    if workers <= 1:
        yield from map(_analyse_chunk, tasks)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_analyse_chunk, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------- deciding in order


class Decisions:
    """What only the whole stream decides — exact and near duplicates of kept records — and the
    report's counts, kept as the records go by (nothing per record but the indexes)."""

    def __init__(self, cfg: CurateConfig, files: list[str], perms):
        from datasketch import MinHashLSH

        from tunesmith.data.curate_rules import minhash

        self.cfg, self.files = cfg, files
        self.exact: dict[int, int] = {}
        self.lsh = MinHashLSH(threshold=cfg.jaccard, num_perm=cfg.num_perm) if cfg.near_duplicates else None
        self.probe = minhash(cfg.num_perm, perms)  # each record's signature is set into it: no object per record
        self.signatures: list[np.ndarray] = []   # of kept records, by kept index
        self.where = array("q")                  # kept index → file index << 40 | line
        self.source, self.label = array("H"), array("b")
        self.rules: Counter = Counter()
        self.examples: dict[str, list] = {}
        self.before, self.after = Counts(), Counts()
        self.flagged: list[dict] = []
        self.pii_records, self.pii_kinds = 0, Counter()
        self.records = 0

    def name(self, code: int) -> str:
        return f"{self.files[code >> _FILE_BITS]}:{code & ((1 << _FILE_BITS) - 1)}"

    def duplicate(self, facts: Facts) -> tuple[str, dict] | None:
        if facts.key is not None and facts.key in self.exact:
            return "exact_duplicate", {"duplicate_of": self.name(self.where[self.exact[facts.key]])}
        if self.lsh is not None:
            self.probe.hashvalues = facts.signature
            best = max(((k, float(np.mean(self.signatures[k] == facts.signature))) for k in self.lsh.query(self.probe)),
                       key=lambda x: x[1], default=None)
            if best is not None and best[1] >= self.cfg.jaccard:
                return "near_duplicate", {"duplicate_of": self.name(self.where[best[0]]), "jaccard": round(best[1], 3)}
        return None

    def keep(self, file_index: int, line: int, facts: Facts) -> None:
        k = len(self.where)
        self.where.append(file_index << _FILE_BITS | line)
        self.source.append(file_index)
        self.label.append(facts.label)
        if facts.key is not None:
            self.exact.setdefault(facts.key, k)
        if self.lsh is not None:
            self.probe.hashvalues = facts.signature  # (duplicate() set it; set again: keep() stands alone)
            self.lsh.insert(k, self.probe, check_duplication=False)
            self.signatures.append(facts.signature)
        self.after.add(self.files[file_index], facts)
        if facts.pii:
            self.pii_records += 1
            self.pii_kinds.update(facts.pii)
            if len(self.flagged) < _PII_EXAMPLES:
                self.flagged.append({"source": f"{self.files[file_index]}:{line}", "pii": facts.pii,
                                     "masked": self.cfg.pii == "mask"})

    def removed(self, rule: str, where: str, evidence: dict) -> dict:
        self.rules[rule] += 1
        shown = self.examples.setdefault(rule, [])
        if len(shown) < 3:
            shown.append({"source": where, "evidence": evidence})
        return {"source": where, "rule": rule, "evidence": evidence}


def _first_pass(paths: list[str], cfg: CurateConfig, analyser: Analyser, workers: int, read: dict,
                kept: LineWriter, removed: LineWriter) -> Decisions:
    """Every record through every rule, in input order; kept ones to ``kept``, the others with
    their evidence to ``removed``. A malformed record stops the run (``data check`` names each)."""
    global _ANALYSER
    from tunesmith.data.validate import summarise

    decide = Decisions(cfg, paths, analyser.perms)
    errors: list = []
    kinds: dict[int, str] = {}
    _ANALYSER = analyser
    try:
        with closing(_in_order(_chunks(paths, read), workers)) as stream:
            _decide_all(stream, paths, decide, errors, kinds, kept, removed)
    finally:
        _ANALYSER = None
    if errors:
        raise summarise(errors, paths)
    if len(set(kinds.values())) > 1:
        what = ", ".join(f"{paths[i]} holds {k}" for i, k in sorted(kinds.items()))
        raise TunesmithError(f"curate: the inputs hold records of different kinds ({what}); curate one kind at a time")
    return decide


def _decide_all(stream, paths, decide: Decisions, errors: list, kinds: dict, kept: LineWriter,
                removed: LineWriter) -> None:
    for file_index, results, errs, kind in stream:
        errors += errs
        if errors:
            return
        if kind and kinds.setdefault(file_index, kind[0]) != kind[0]:
            raise TunesmithError(f"curate: {paths[file_index]} holds {kinds[file_index]} records and, further on, "
                                 f"{kind[0]} records; keep one kind per file")
        for line, facts in results:
            decide.records += 1
            decide.before.add(paths[file_index], facts)
            verdict = decide.duplicate(facts) or facts.verdict
            if verdict is not None:
                entry = decide.removed(verdict[0], f"{paths[file_index]}:{line}", verdict[1])
                removed.write(json.dumps(entry, ensure_ascii=False)[:-1] + ', "record": ' + facts.line[:-1] + "}\n")
                continue
            decide.keep(file_index, line, facts)
            kept.write(facts.line)


# ---------------------------------------------------------------- split and mix


def held_out(strata: list[tuple], fraction: float, seed: int) -> set[int]:
    """``round(fraction * n)`` of each stratum (at least one of a stratum of two or more), seeded."""
    import random

    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(strata):
        groups.setdefault(key, []).append(i)
    held: set[int] = set()
    rnd = random.Random(seed)
    for key in sorted(groups, key=str):
        members = groups[key]
        k = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        held |= set(rnd.sample(members, k))
    return held


def _lines(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        yield from enumerate(f)


class SplitCheck:
    """A held-out part checked as an eval file is (word ``n``-grams), except that an n-gram
    found in more than ``boilerplate`` train records is a template (a shared system prompt,
    identity.json's "I am {{name}}, an AI assistant…"), not a leak: as the GPT-3 paper's
    decontamination ignores its most frequent n-grams. Two passes over the train records:
    ``count`` every one, then ``hit`` each."""

    def __init__(self, held: Iterable[tuple[str, Record]], n: int, boilerplate: int = 10):
        self.index = EvalIndex(n, n)
        for where, rec in held:
            prompt, responses = prompt_and_responses(rec)
            self.index.add([(where, t) for t in (prompt, *responses)], whole=False)
        self.index.freeze()
        self.records = np.zeros(len(self.index.keys), np.int64)  # train records holding each n-gram
        self.boilerplate = boilerplate

    def _grams(self, rec: Record) -> tuple[Grams, list[tuple[int, int]]]:
        g = Grams(list(_texts_of(rec)))
        return g, [(p, lo + i) for lo, hi in g.parts for p, i in self.index.positions(g, (lo, hi))]

    def count(self, rec: Record) -> None:
        if len(self.index.keys):
            self.records[np.unique([p for p, _ in self._grams(rec)[1]]).astype(np.int64)] += 1

    def hit(self, rec: Record) -> dict | None:
        if not len(self.index.keys):
            return None
        g, found = self._grams(rec)
        for p, at in found:
            if self.records[p] <= self.boilerplate:
                return {"eval_item": self.index.items[int(self.index.owner[p])], "shared": g.text(at, self.index.n),
                        "split": "eval"}
        return None


def _texts_of(rec: Record) -> list[str]:
    prompt, responses = prompt_and_responses(rec)
    return [prompt, *responses]


def split_overlap(train: list[Record], held: list[Record], n: int = 13) -> tuple[int, str | None]:
    """How many ``train`` records share a word n-gram (not a template's) with a ``held`` one,
    and the first shared span — the check of a run's ``data.eval_split``."""
    check = SplitCheck(((str(i), r) for i, r in enumerate(held)), n)
    for rec in train:
        check.count(rec)
    hits = [h for h in map(check.hit, train) if h is not None]
    return len(hits), (hits[0]["shared"] if hits else None)


def _split(decide: Decisions, cfg: CurateConfig, scratch: str, eval_out: LineWriter,
           removed: LineWriter) -> tuple[list[int], set[int]]:
    """Hold out the eval part and check the train part against it (``SplitCheck``): a train
    record sharing a held-out n-gram is removed as contaminated. → (train, held-out) indexes."""
    held = held_out(list(zip(decide.source, decide.label)), cfg.split, cfg.seed)
    kept = [(i, line) for i, line in _lines(scratch) if i in held]
    for _, line in kept:
        eval_out.write(line)
    check = SplitCheck(((decide.name(decide.where[i]), json.loads(line)) for i, line in kept), cfg.ngram)
    for i, line in _lines(scratch):
        if i not in held:
            check.count(json.loads(line))
    train = []
    for i, line in _lines(scratch):
        if i in held:
            continue
        hit = check.hit(rec := json.loads(line))
        if hit is not None:
            removed.write({**decide.removed("contaminated", decide.name(decide.where[i]), hit), "record": rec})
            decide.after.sources[decide.files[decide.source[i]]] -= 1
            continue
        train.append(i)
    return train, held


def _mix(decide: Decisions, srcs: list[mixing.Source], train: list[int], seed: int) -> tuple[Counter, dict]:
    """(how many times each train index goes out, the mix's report)."""
    by_source: list[list[int]] = [[] for _ in decide.files]
    for i in train:
        by_source[decide.source[i]].append(i)
    picks = mixing.plan(srcs, [len(g) for g in by_source], seed)
    times = Counter(by_source[s][j] for s, idx in enumerate(picks) for j in idx)
    report = {src.path: {"kept": len(g), "asked": src.describe(), "out": len(idx)}
              for src, g, idx in zip(srcs, by_source, picks)}
    return times, report


# ---------------------------------------------------------------- the run


def outputs(out: str | Path, split: bool) -> dict[str, Path]:
    """The files a curation writes for ``out``."""
    out = Path(out)
    side = {k: out.with_name(out.stem + s) for k, s in (("removed", ".removed.jsonl"), ("json", ".report.json"),
                                                         ("html", ".report.html"))}
    if split:
        return {"train": out.with_name(f"{out.stem}-train{out.suffix}"),
                "eval": out.with_name(f"{out.stem}-eval{out.suffix}"), **side}
    return {"train": out, **side}


def _inputs(inputs: list[str], cfg: CurateConfig) -> tuple[list[str], list[mixing.Source]]:
    """The input files (``mix``'s when none are given) and each one's mix entry."""
    srcs = mixing.sources(cfg.mix, "curate: mix")
    inputs = list(inputs) or [s.path for s in srcs]
    if not inputs:
        raise TunesmithError("curate: no input files; give them as arguments or in the config's mix")
    for f in inputs:
        if not Path(f).is_file():
            raise TunesmithError(f"curate: {f} does not exist; check the path")
    resolved = [Path(f).resolve() for f in inputs]
    twice = next((f for f, r in zip(inputs, resolved) if resolved.count(r) > 1), None)
    if twice is not None:
        raise TunesmithError(f"curate: {twice} is given twice; give each input once")
    by_path = {}
    for s in srcs:
        r = Path(s.path).resolve()
        if r not in resolved:
            raise TunesmithError(f"curate: mix names {s.path}, which is not an input; add it or drop it from the mix")
        by_path[r] = s
    return inputs, [by_path.get(r, mixing.Source(f)) for f, r in zip(inputs, resolved)]


def curate(inputs: list[str], out: str | Path, *, eval_files: list[str] = (), suite_files: list[str] = (),
           cfg: CurateConfig | None = None, tokenizer=None, workers: int | None = None, **read) -> Result:
    """Curate ``inputs`` into ``out`` (canonical JSONL, atomic; with ``split``, OUT-train.jsonl and
    OUT-eval.jsonl instead), ``OUT.removed.jsonl`` (every removed record, why and the evidence),
    ``OUT.report.json`` and ``OUT.report.html``. ``workers``: processes analysing records
    (default: every core); the result does not depend on it."""
    from datasketch import MinHash

    from tunesmith.data.curate_report import render_curation

    cfg = cfg or CurateConfig()
    cfg.check()
    inputs, srcs = _inputs(list(inputs), cfg)
    for f in eval_files:
        if not Path(f).is_file():
            raise TunesmithError(f"curate: {f} does not exist; check the path")
    if cfg.max_length and tokenizer is None:
        raise TunesmithError("curate: max_length needs a tokenizer; pass --model (the model you will train)")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise TunesmithError(f"curate: workers {workers} must be at least 1")
    if tokenizer is not None and workers > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers fork after it was used
    perms = MinHash(num_perm=cfg.num_perm, seed=1, scheme="affine32").permutations  # drawn once, shared
    analyser = Analyser(cfg, eval_index(cfg, eval_texts(list(eval_files)), eval_texts(list(suite_files))),
                        tokenizer, perms)
    paths = outputs(out, cfg.split > 0)
    reshape = cfg.split > 0 or any(not s.plain for s in srcs)
    writers = {k: LineWriter(p) for k, p in paths.items() if k in ("train", "eval", "removed")}
    kept = LineWriter(paths["train"].with_name(f".{paths['train'].name}.kept")) if reshape else writers["train"]
    try:
        decide = _first_pass(inputs, cfg, analyser, workers, read, kept, writers["removed"])
        report = _reshape(decide, cfg, srcs, kept, writers) if reshape else {}
        result = Result(report=summary(decide, asdict(cfg), RULES, inputs, [*eval_files, *suite_files]),
                        flagged=decide.flagged)
        result.report.update(report)
        result.kept, result.removed = result.report["kept"], result.report["removed"]
        for w in writers.values():
            w.commit()
    finally:
        for w in [kept, *writers.values()]:
            w.abort()
    write_text_atomic(paths["json"], json.dumps(result.report, indent=1, ensure_ascii=False) + "\n")
    write_text_atomic(paths["html"], render_curation(result.report))
    result.paths = paths
    return result


def _reshape(decide: Decisions, cfg: CurateConfig, srcs: list[mixing.Source], kept: LineWriter,
             writers: dict[str, LineWriter]) -> dict:
    """The split (checked against its train part) and the mix, from the kept records on disk."""
    kept.f.flush()
    report: dict = {}
    train = list(range(len(decide.where)))
    if cfg.split > 0:
        train, held = _split(decide, cfg, kept.tmp, writers["eval"], writers["removed"])
        report["split"] = {"train": len(train), "eval": len(held),
                           "by_source": dict(Counter(decide.files[decide.source[i]] for i in sorted(held)))}
    times, mixed = _mix(decide, srcs, train, cfg.seed)
    if any(not s.plain for s in srcs):
        report["mix"] = mixed
    train_set = set(train)
    for i, line in _lines(kept.tmp):
        for _ in range(times.get(i, 0)):
            writers["train"].write(line)
        if i in train_set and i not in times:  # a weight below 1 or a count left it out: said, not lost
            asked = mixed[srcs[decide.source[i]].path]["asked"]
            entry = decide.removed("mix_left_out", decide.name(decide.where[i]), {"mix": asked})
            writers["removed"].write(json.dumps(entry, ensure_ascii=False)[:-1] + ', "record": ' + line.rstrip("\n")
                                     + "}\n")
            decide.after.sources[decide.files[decide.source[i]]] -= 1
    if cfg.split > 0:
        report["split"]["train"] = writers["train"].lines
    return report
