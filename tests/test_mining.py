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


def test_distinct_questions_keeps_the_first_problem_that_asks_each_question():
    def rec(problem, q, wrong):
        return {"problem": problem, "prompt": [{"role": "user", "content": q}], "rejected": wrong}

    records = [
        rec(0, "1 + 1", "3"),
        rec(0, "1 + 1", "1"),
        rec(1, "2 + 2", "5"),
        rec(2, "1 + 1", "3"),
        rec(3, "3 + 3", "7"),
    ]
    kept = mining.distinct_questions(records)
    assert [(r["problem"], r["rejected"]) for r in kept] == [(0, "3"), (0, "1"), (1, "5"), (3, "7")]


def test_mined_train_and_held_out_questions_are_disjoint():
    train = mining.distinct_questions(arithmetic_candidates(200, seed=7, split="train"))
    held = mining.distinct_questions(arithmetic_candidates(100, seed=7, split="eval"))
    questions = lambda rs: {r["prompt"][0]["content"] for r in rs}  # noqa: E731
    assert questions(train) and questions(held) and not questions(train) & questions(held)
