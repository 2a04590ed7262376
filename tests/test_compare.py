"""The DPO-vs-RLHF comparison's measurements: compute budgets, sampled KL to the reference, pair diagnostics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpo_jax.data import byte_chat_tokenizer, load_records
from cpo_jax.experiments.compare import (
    held_out,
    mcnemar_exact,
    pair_diagnostics,
    preference_step_cost,
    rl_step_cost,
    sampled_kl,
)
from cpo_jax.hf.pretrained import from_pretrained
from tests.train_fixtures import tiny_policy

pytest.importorskip("torch")


def test_budgets_count_forward_token_equivalents():
    # 4 pairs -> 8 rows of 72 tokens; forward + backward (3) + a separate reference forward (1).
    assert preference_step_cost(4, 72, reference_forward=True) == 8 * 72 * 4
    assert preference_step_cost(4, 72, reference_forward=False) == 8 * 72 * 3
    # 16 rollouts of 48 + 24 tokens: sampling (1) + policy and reference scoring (2) + 2 epochs of updates (6).
    assert rl_step_cost(4, 4, 48, 24, ppo_epochs=2) == 16 * 72 * 9


def test_pair_diagnostics_against_numpy():
    rng = np.random.RandomState(0)
    ref = rng.normal(size=(40, 2)) * 3
    pol = ref + rng.normal(size=(40, 2))
    ref[3] = np.nan  # a pair the length policy dropped
    out = pair_diagnostics(pol.astype(np.float32), ref.astype(np.float32))
    keep = np.isfinite(ref).all(1)
    dt, dr = (pol[:, 0] - pol[:, 1])[keep], (ref[:, 0] - ref[:, 1])[keep]
    assert out["pairs"] == keep.sum()
    assert out["diagnostics/frac_in_U"] == pytest.approx(np.mean((dr < dt) & (dt < 0)), abs=1e-6)
    assert out["diagnostics/abs_accuracy"] == pytest.approx(np.mean(dt > 0), abs=1e-6)
    assert out["diagnostics/frac_ref_prefers_rejected"] == pytest.approx(np.mean(dr < 0), abs=1e-6)


def test_sampled_kl_is_zero_against_itself_and_positive_against_another_model(tmp_path):
    policy = from_pretrained(tiny_policy(tmp_path / "a", seed=0))
    other = from_pretrained(tiny_policy(tmp_path / "b", seed=1))
    prompts = load_records("bundled:arithmetic-prompts:6", "prompt_only")
    kw = dict(prompt_length=64, max_new_tokens=6, batch_size=4)
    same = sampled_kl(policy, policy, byte_chat_tokenizer(), prompts, **kw)
    assert same == {"kl/k1": 0.0, "kl/k3": 0.0}
    copy = nnx.merge(*nnx.split(policy))
    assert sampled_kl(policy, copy, byte_chat_tokenizer(), prompts, **kw) == same
    different = sampled_kl(policy, other, byte_chat_tokenizer(), prompts, **kw)
    assert different["kl/k3"] > 0.01 and different["kl/k1"] != 0.0  # k1 may be negative on few samples


def test_sampled_kl_scores_with_the_weights_as_arguments_not_as_baked_constants(tmp_path):
    """A jitted closure over the two models embeds their weights in the executable (1 GB per SmolLM2 policy,
    recompiled and cached on disk for each one): the lowered program must not depend on the weights' values."""
    from cpo_jax.experiments.compare import _policy_and_reference_logps

    a = from_pretrained(tiny_policy(tmp_path / "a", seed=0))
    b = from_pretrained(tiny_policy(tmp_path / "b", seed=1))
    ids = jnp.ones((2, 8), jnp.int32)
    tokens, mask = ids[:, -3:], jnp.ones((2, 3), jnp.int32)

    def lowered(policy, reference):
        (g, p), (rg, rp) = nnx.split(policy), nnx.split(reference)
        return _policy_and_reference_logps.lower(g, p, rg, rp, ids, jnp.ones_like(ids), tokens, mask).as_text()

    assert lowered(a, b) == lowered(b, a)


def test_mcnemar_exact_against_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.RandomState(1)
    for n, flip in [(64, 0.1), (64, 0.3), (20, 0.5), (5, 0.0)]:
        before = rng.rand(n) < 0.3
        after = np.where(rng.rand(n) < flip, ~before, before) | (rng.rand(n) < flip / 2)
        out = mcnemar_exact(before, after)
        gained, lost = np.sum(~before & after), np.sum(before & ~after)
        assert (out["mcnemar/gained"], out["mcnemar/lost"]) == (gained, lost)
        expected = stats.binomtest(int(gained), int(gained + lost), 0.5).pvalue if gained + lost else 1.0
        assert out["mcnemar/p"] == pytest.approx(expected, rel=1e-9)
    # 10 gained, 0 lost: p = 2 / 2**10.
    assert mcnemar_exact(np.zeros(10, bool), np.ones(10, bool))["mcnemar/p"] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="shape"):
        mcnemar_exact(np.zeros(3, bool), np.zeros(4, bool))


def test_held_out_drops_seen_and_repeated_questions():
    records = load_records("bundled:arithmetic-prompts:200", "prompt_only")
    seen = {r["prompt"][-1]["content"] for r in load_records("bundled:arithmetic-prompts:50", "prompt_only").records}
    out = held_out(records, seen, limit=30)
    questions = [r["prompt"][-1]["content"] for r in out.records]
    assert len(questions) == 30 == len(set(questions)) == len(out.sources)
    assert not set(questions) & seen
    # In order: the kept records are the first qualifying ones of the input.
    expected = []
    for r in records.records:
        q = r["prompt"][-1]["content"]
        if q not in seen and q not in expected:
            expected.append(q)
    assert questions == expected[:30]


def test_compare_tool_examples_pick_prompts_by_outcome_and_keep_the_table_intact():
    """``tools/compare_dpo_rlhf.py``'s completions table: which prompts it shows, and cells that cannot break a row."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import compare_dpo_rlhf as tool

    questions = [f"What is {i} + 1?" for i in range(6)]
    correct = {  # prompt: 0 1 2 3 4 5
        "start": [1, 1, 0, 0, 1, 0],
        "dpo": [0, 1, 0, 0, 0, 0],
        "rloo": [1, 1, 1, 0, 1, 0],
        "online_cpo": [1, 1, 0, 0, 1, 1],
    }
    results = {
        n: {"generation/correct": c, "generation/answers": [f"{n} says|{i}\nmore" for i in range(6)]}
        for n, c in correct.items()
    }
    rows = tool._examples(results, questions, per_kind=3).splitlines()
    assert rows[0] == "| prompt | kind | start | dpo | rloo | online_cpo |"
    body = rows[2:]
    assert [r.split(" | ")[0] for r in body] == ["| `What is 0 + 1?`", "| `What is 4 + 1?`", "| `What is 2 + 1?`",
                                                 "| `What is 5 + 1?`"]  # fmt: skip
    assert all(r.count(" | ") == 5 for r in body)  # the escaped pipe and the newline stay inside their cells
    assert "✗ `dpo says\\|0␤more`" in body[0] and "✓ `rloo says\\|2␤more`" in body[2]
    assert tool._cell("x" * 80, limit=70) == "`" + "x" * 70 + "` (cut)"
