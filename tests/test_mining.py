"""Mining pairs by the reference's preferences (issue 7, Part B), on synthetic log-probs."""

import numpy as np
import pytest

from cpo_jax.data import arithmetic_candidates, score_arithmetic
from cpo_jax.experiments import mining


def test_candidates_pair_the_right_answer_with_every_distinct_wrong_one():
    records = arithmetic_candidates(20, seed=3)
    by_problem = {}
    for r in records:
        by_problem.setdefault(r["problem"], []).append(r)
        assert score_arithmetic(r["prompt"], r["chosen"]) == 1.0
        assert score_arithmetic(r["prompt"], r["rejected"]) == 0.0
    assert sorted(by_problem) == list(range(20))
    for rows in by_problem.values():
        wrong = [r["rejected"][0]["content"] for r in rows]
        assert len(wrong) == len(set(wrong)) >= 2


def test_select_keeps_the_reference_favourite_wrong_answer_and_disjoint_contrast():
    records = [
        {"problem": p, "prompt": "q", "chosen": "c", "rejected": f"w{k}", "answer": 1}
        for p in range(3)
        for k in range(3)
    ]
    # [chosen, rejected] summed log-probs; lengths make the per-token view differ from the summed one.
    logps = np.array(
        [
            [-4.0, -3.0],
            [-4.0, -2.0],
            [-4.0, -9.0],  # problem 0: w0, w1 preferred; w1 most (per token)
            [-4.0, -5.0],
            [-4.0, -6.0],
            [-4.0, -4.5],  # problem 1: all below the right answer; w2 closest
            [-4.0, -3.0],
            [-4.0, -5.0],
            [-4.0, -4.2],  # problem 2: w0 preferred only in summed units
        ]
    )
    lengths = np.array([[4, 4]] * 6 + [[4, 2], [4, 4], [4, 4]], float)
    mined = mining.select_pairs(records, logps, lengths)
    assert [(r["problem"], r["rejected"]) for r in mined.violated] == [(0, "w1")]
    assert mined.violated[0]["delta_ref"] == pytest.approx(-2.0)
    assert mined.violated[0]["delta_ref_norm"] == pytest.approx(-0.5)
    # problem 2's w0 is -1 summed but +0.5 per token: neither violated nor contrast; w2 is its closest below
    assert [(r["problem"], r["rejected"]) for r in mined.contrast] == [(1, "w2"), (2, "w2")]
    assert mined.stats["candidates_ref_prefers_wrong"] == 2


def test_select_ignores_dropped_records_and_checks_shapes():
    records = [{"problem": 0, "prompt": "q", "chosen": "c", "rejected": "w", "answer": 1}]
    mined = mining.select_pairs(records, np.array([[np.nan, np.nan]]), np.array([[np.nan, np.nan]]))
    assert mined.violated == [] and mined.contrast == [] and mined.stats["candidates_scored"] == 0
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        mining.select_pairs(records, np.zeros((2, 2)), np.ones((2, 2)))


def test_split_holds_out_the_tail_and_refuses_impossible_sizes():
    train, held = mining.split(list(range(10)), 3)
    assert train == list(range(7)) and held == [7, 8, 9]
    with pytest.raises(ValueError, match="cannot hold out 10 of 10"):
        mining.split(list(range(10)), 10)
