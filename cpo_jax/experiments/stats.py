"""Small, exact statistics for before/after comparisons and seed sweeps (no SciPy needed).

* :func:`paired_change`: the change in a pass rate measured on the same items twice (greedy verifier accuracy on the
  same held-out prompts before and after training): the items gained and lost, the difference with a 95% interval,
  and McNemar's exact two-sided test on the discordant items.
* :func:`mcnemar_p`: that test alone (a two-sided binomial test of ``wins`` against ``losses`` at p = 1/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def mcnemar_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: ``P(|X - n/2| >= |wins - n/2|)`` for ``X ~ Binomial(wins + losses, 1/2)``.

    1.0 when there is no discordant item."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_change(before: Sequence[bool], after: Sequence[bool]) -> dict[str, float]:
    """The change from ``before`` to ``after``, two pass/fail records of the same ``n`` items.

    Returns ``before`` and ``after`` rates, ``gained`` (failed before, passed after) and ``lost`` counts, ``change``
    (``after - before`` = ``(gained - lost) / n``), its 95% interval ``ci_low`` / ``ci_high`` (the Wald interval of a
    paired difference, ``change ± 1.96 * sqrt(gained + lost - (gained - lost)^2 / n) / n``, clipped to [-1, 1]) and
    McNemar's exact ``p``."""
    if len(before) != len(after):
        raise ValueError(f"paired records differ in length: {len(before)} before, {len(after)} after")
    n = len(before)
    if n == 0:
        raise ValueError("no items to compare")
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    change = (gained - lost) / n
    half = Z95 * math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    return {
        "n": float(n),
        "before": sum(map(bool, before)) / n,
        "after": sum(map(bool, after)) / n,
        "gained": float(gained),
        "lost": float(lost),
        "change": change,
        "ci_low": max(-1.0, change - half),
        "ci_high": min(1.0, change + half),
        "p": mcnemar_p(gained, lost),
    }


def describe_change(change: dict[str, float], what: str = "generation accuracy") -> str:
    """One line: ``what 0.156 -> 0.406 (+0.250, 95% CI [+0.14, +0.36]; +18 / -2 prompts, McNemar p = 2e-04)``."""
    return (
        f"{what} {change['before']:.3f} -> {change['after']:.3f} ({change['change']:+.3f}, 95% CI "
        f"[{change['ci_low']:+.3f}, {change['ci_high']:+.3f}]; +{int(change['gained'])} / -{int(change['lost'])} "
        f"of {int(change['n'])} held-out prompts, McNemar p = {change['p']:.2g})"
    )
