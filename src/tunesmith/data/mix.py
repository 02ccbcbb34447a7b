"""Mixing sources with weights or target counts, seeded — ``data curate``'s ``mix:`` and a run
config's ``data.train`` list take the same entries:

    data:
      train:
        - data/domain.jsonl                        # every record once
        - {path: data/identity.json, weight: 3}    # every record three times
        - {path: data/general.jsonl, weight: 0.5}  # half of its records, drawn
        - {path: data/chat.jsonl, count: 2000}     # 2,000 records (more than it holds: whole copies + a draw)

A weight w takes round(w x n) of a source's n records; a count takes that many. Whole copies
first, then a seeded draw without replacement for the rest, each source in its own order (the
trainer shuffles). As open-instruct's ``dataset_mixer`` and LLaMA-Factory's ``interleave_probs``,
only written as what they mean: a weight multiplies, a count counts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable

from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class Source:
    path: str
    weight: float | None = None
    count: int | None = None

    @property
    def plain(self) -> bool:
        return self.count is None and self.weight in (None, 1, 1.0)

    def describe(self) -> str:
        return f"count {self.count}" if self.count is not None else f"weight {self.weight if self.weight is not None else 1}"


def source(entry: Any, where: str = "data.train") -> Source:
    """A path, a ``{path, weight}`` / ``{path, count}`` mapping, or an object with those attributes."""
    if isinstance(entry, str):
        return Source(entry)
    get = entry.get if isinstance(entry, dict) else (lambda k, d=None: getattr(entry, k, d))
    extra = sorted(set(entry) - {"path", "weight", "count"}) if isinstance(entry, dict) else []
    path, weight, count = get("path"), get("weight"), get("count")
    if not isinstance(path, str) or not path or extra:
        raise TunesmithError(f"{where}: {entry!r} is not a source; write a path or {{path: FILE, weight: W}} or "
                             f"{{path: FILE, count: N}}")
    if weight is not None and count is not None:
        raise TunesmithError(f"{where}: {path} has both weight and count; give one")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0):
        raise TunesmithError(f"{where}: {path}'s weight {weight!r} must be a number >= 0 (2 = every record twice)")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise TunesmithError(f"{where}: {path}'s count {count!r} must be a whole number >= 0")
    return Source(path, None if weight is None else float(weight), count)


def sources(entries: Any, where: str = "data.train") -> list[Source]:
    if entries is None:
        return []
    return [source(e, where) for e in ([entries] if isinstance(entries, (str, dict)) else entries)]


def paths(entries: Any) -> list[str]:
    """The files of a ``data.train`` value (a path, or a list of paths and mix entries)."""
    return [s.path for s in sources(entries)]


def wanted(src: Source, n: int) -> int:
    return src.count if src.count is not None else round((1.0 if src.weight is None else src.weight) * n)


def draw(n: int, k: int, rnd: random.Random) -> list[int]:
    """k indexes into n records: k // n whole copies, then a draw of the rest (input order)."""
    if n == 0:
        return []
    return [i for _ in range(k // n) for i in range(n)] + sorted(rnd.sample(range(n), k % n))


def plan(srcs: list[Source], sizes: list[int], seed: int) -> list[list[int]]:
    """For each source, the indexes of its records in the mix (one random stream per seed)."""
    rnd = random.Random(seed)
    out = []
    for src, n in zip(srcs, sizes):
        k = wanted(src, n)
        if k and not n:
            raise TunesmithError(f"mix: {src.path} has no records left to draw {k} from; drop it from the mix or "
                                 f"give it data")
        out.append(draw(n, k, rnd))
    return out


def mix(groups: Iterable[list], srcs: list[Source], seed: int) -> list:
    """The records of every group as its source asks, sources in order."""
    groups = list(groups)
    return [g[i] for g, idx in zip(groups, plan(srcs, [len(g) for g in groups], seed)) for i in idx]
