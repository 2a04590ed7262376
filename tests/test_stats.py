"""``cpo_jax.experiments.stats`` against closed forms written out by hand."""

from __future__ import annotations

import math

import pytest

from cpo_jax.experiments.stats import describe_change, mcnemar_p, paired_change


def test_mcnemar_p_closed_forms():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # both tails of (1/2)^5
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)
    # 1 vs 9: 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_p(34, 1) == pytest.approx(2 * (1 + 35) / 2**35)


def test_paired_change_counts_interval_and_test():
    before = [True] * 10 + [False] * 30 + [True] * 2 + [False] * 22
    after = [True] * 10 + [True] * 8 + [False] * 22 + [False] * 2 + [False] * 22
    c = paired_change(before, after)
    n, gained, lost = 64, 8, 2
    assert (c["n"], c["gained"], c["lost"]) == (n, gained, lost)
    assert c["before"] == 12 / 64 and c["after"] == 18 / 64 and c["change"] == pytest.approx(6 / 64)
    half = 1.959963984540054 * math.sqrt(gained + lost - (gained - lost) ** 2 / n) / n
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((6 / 64 - half, 6 / 64 + half))
    assert c["p"] == pytest.approx(mcnemar_p(8, 2))
    assert "+8 / -2 of 64" in describe_change(c)


def test_paired_change_refuses_mismatched_records():
    with pytest.raises(ValueError, match="differ in length"):
        paired_change([True], [True, False])
    with pytest.raises(ValueError, match="no items"):
        paired_change([], [])
    same = paired_change([True, False], [True, False])
    assert same["change"] == 0 and same["ci_low"] == 0 == same["ci_high"] and same["p"] == 1.0
