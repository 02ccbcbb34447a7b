"""Uncertainty for evaluation numbers: every rate a suite reports carries an interval.

A 135M model scored on 60 prompts moves by ±12 points from sampling noise alone
(Wilson 95% half-width at p=0.5, n=60), so a bare accuracy invites reading noise as
progress. These helpers are pure Python (no numpy/scipy) so suites can be scored anywhere.

- ``wilson_interval``: for a rate of independent pass/fail items. Wilson rather than the
  normal approximation because it stays inside [0, 1] and is sane at 0/n and n/n, which
  is exactly where small models and small suites land.
- ``bootstrap_interval``: for statistics with no closed form (a ratio over items whose
  parts are correlated, such as constraint-level accuracy).
- ``paired_diff``: two models on the same items; which items flipped, and an exact
  McNemar test on the flips.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``n`` (z=1.96 → 95%).

    Wilson (1927); the same interval as statsmodels ``proportion_confint(method="wilson")``.
    With ``n == 0`` nothing is known, so the interval is the whole of [0, 1].
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp float dust (e.g. 1.0000000000000002) at the edges 0/n and n/n.
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_summary(flags: Sequence[bool], z: float = 1.96) -> dict[str, Any]:
    """The one shape every pass-rate takes in a report: rate, Wilson interval, counts."""
    k, n = sum(bool(f) for f in flags), len(flags)
    low, high = wilson_interval(k, n, z)
    return {"rate": k / n if n else 0.0, "low": low, "high": high, "successes": k, "n": n}


def bootstrap_interval(values: Sequence[Any], stat: Callable[[Sequence[Any]], float] = mean,
                       n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(values)``, resampling items with replacement.

    ``values`` may be any per-item objects that ``stat`` understands (e.g. ``(passed, total)``
    pairs with a ratio statistic), so that correlated parts of one item move together.
    Seeded so a report is reproducible; 1000 resamples put the 2.5% tails ±~1 resample apart.
    """
    if not values:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(n_resamples))
    lo_i = int(math.floor(alpha / 2 * (n_resamples - 1)))
    hi_i = int(math.ceil((1 - alpha / 2) * (n_resamples - 1)))
    return stats[lo_i], stats[hi_i]


def paired_diff(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Compare model A and model B on the same items (A is the baseline).

    Returns ``improved`` (indices A failed and B passed), ``regressed`` (A passed, B failed),
    the counts of items both passed / both failed, ``n``, and ``p_value``: the exact two-sided
    McNemar (binomial sign) test on the discordant items — only flips carry evidence of a
    difference, items both models agree on carry none.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_diff needs the same items for both models, got {len(a)} and {len(b)}")
    improved = [i for i, (x, y) in enumerate(zip(a, b)) if not x and y]
    regressed = [i for i, (x, y) in enumerate(zip(a, b)) if x and not y]
    both = sum(1 for x, y in zip(a, b) if x and y)
    return {"improved": improved, "regressed": regressed, "both_passed": both,
            "both_failed": len(a) - both - len(improved) - len(regressed), "n": len(a),
            "p_value": mcnemar_exact(len(improved), len(regressed))}


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under "no difference" each flip is a fair coin, so min(b, c) ~ Binomial(b + c, 1/2);
    the two-sided p-value doubles the smaller tail (capped at 1).
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
