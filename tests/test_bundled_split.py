"""The bundled arithmetic sets never share a question between training and evaluation (issue: eval leakage).

The split is by construction (a hash of the question text), so the test checks it directly, at the sizes the
configs use and far beyond, and checks that a generator without ``split`` (the old behaviour) does overlap, so the
check itself can fail."""

from __future__ import annotations

import hashlib

import pytest

from cpo_jax.data.bundled import EVAL_SHARE, arithmetic_candidates, arithmetic_preferences, question_split
from cpo_jax.data.sources import bundled_rows

TRAIN_SOURCES = ("arithmetic-train", "arithmetic-prompts")
EVAL_SOURCES = ("arithmetic-eval", "arithmetic-eval-prompts")


def _question(record) -> str:
    prompt = record["prompt"]
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt.strip()


def _questions(name: str, n: int) -> set[str]:
    return {_question(r) for _, r in bundled_rows(f"bundled:{name}:{n}")}


@pytest.mark.parametrize("n", [1, 16, 64, 256, 1024, 4096])
def test_training_and_evaluation_sources_are_disjoint_at_every_size(n):
    train = set().union(*(_questions(s, n) for s in TRAIN_SOURCES))
    held_out = set().union(*(_questions(s, n) for s in EVAL_SOURCES))
    assert train and held_out
    assert not train & held_out


def test_each_source_draws_only_its_split():
    for names, split in ((TRAIN_SOURCES, "train"), (EVAL_SOURCES, "eval")):
        for name in names:
            for q in _questions(name, 512):
                a, op, b = q.removeprefix("What is ").removesuffix("?").split(" ")
                assert question_split(int(a), op, int(b)) == split, (name, q)


def test_split_is_a_hash_of_the_question_text():
    """An independent recomputation: the first 4 bytes of SHA-256, big-endian, modulo EVAL_SHARE."""
    for a, op, b in [(3, "+", 4), (50, "-", 7), (12, "*", 13), (0, "+", 0)]:
        text = f"What is {a} {op} {b}?"
        expected = "eval" if int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % EVAL_SHARE == 0 else "train"
        assert question_split(a, op, b) == expected
    share = sum(question_split(a, "+", b) == "eval" for a in range(51) for b in range(51)) / 51**2
    assert abs(share - 1 / EVAL_SHARE) < 0.03


def test_unsplit_generators_overlap_so_the_check_can_fail():
    train = {_question(r) for r in arithmetic_preferences(1024, seed=0, max_operand=50)}
    evaluation = {_question(r) for r in arithmetic_preferences(256, seed=1, max_operand=50)}
    assert train & evaluation


def test_mining_candidates_follow_the_split():
    held_out = {_question(r) for r in arithmetic_candidates(64, seed=5, max_operand=50, split="eval")}
    train = {_question(r) for r in arithmetic_candidates(256, seed=4, max_operand=50, split="train")}
    assert held_out and train and not held_out & train
    with pytest.raises(ValueError, match="split"):
        arithmetic_candidates(2, seed=0, split="test")
