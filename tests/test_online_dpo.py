"""Online DPO/CPO (``rl.algorithm: online``): pairs built on-policy from two samples per prompt ranked by the reward.

* :func:`online_pairs` against a float64 NumPy reference (ordering, ties skipped or first-chosen as TRL);
* the mini-batch loss against TRL's ``OnlineDPOTrainer`` formula (``-logsigmoid(beta * logits).mean()``) and CPO;
* mini-batches keep a prompt's two samples together;
* a tiny run through the RL loop, and config mistakes naming their key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import losses
from cpo_jax.errors import ConfigError
from cpo_jax.rlhf.algorithms import online_pairs
from cpo_jax.rlhf.rollout import Rollout
from cpo_jax.rlhf.step import _minibatches, online_objective
from cpo_jax.train import TrainConfig, from_dict
from cpo_jax.train.validate import validate_config


def _rollout_arrays(seed=0, pairs=6, n=5):
    rng = np.random.RandomState(seed)
    scores = rng.randint(0, 3, size=2 * pairs).astype(np.float32)  # small integers: ties happen
    logps = -rng.rand(2 * pairs, n).astype(np.float32) * 3
    ref = logps + 0.3 * rng.randn(2 * pairs, n).astype(np.float32)
    lengths = rng.randint(1, n + 1, size=2 * pairs)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    return scores, logps, ref, mask


def _numpy_pairs(scores, logps, ref, mask, ties):
    out = []
    for i in range(len(scores) // 2):
        a, b = 2 * i, 2 * i + 1
        first = scores[a] >= scores[b]
        win, lose = (a, b) if first else (b, a)
        s = lambda x, r: float(np.sum(np.float64(x[r]) * mask[r]))  # noqa: E731
        real = scores[a] != scores[b] if ties == "skip" else True
        out.append((s(logps, win), s(logps, lose), s(ref, win), s(ref, lose), mask[win].sum(), mask[lose].sum(), real))
    return np.asarray(out, np.float64)


@pytest.mark.parametrize("ties", ["skip", "first"])
def test_pairs_match_a_float64_reference(ties):
    scores, logps, ref, mask = _rollout_arrays()
    assert (scores[0::2] == scores[1::2]).any() and (scores[0::2] != scores[1::2]).any()
    pairs = online_pairs(jnp.asarray(scores), jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(mask), ties=ties)
    expected = _numpy_pairs(scores, logps, ref, mask, ties)
    got = np.stack(
        [
            np.asarray(x, np.float64)
            for x in (
                pairs.chosen,
                pairs.rejected,
                pairs.ref_chosen,
                pairs.ref_rejected,
                pairs.chosen_lengths,
                pairs.rejected_lengths,
                pairs.real(),
            )
        ],
        axis=1,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ties"):
        online_pairs(jnp.asarray(scores), jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(mask), ties="random")


def _online_cfg(name="sigmoid", hparams=None, **rl):
    return from_dict(
        TrainConfig,
        {
            "model": {"path": "tiny-random"},
            "data": {"train_files": ["bundled:arithmetic-prompts:8"], "max_length": 96, "max_prompt_length": 64},
            "loss": {"objective": "rlhf", "name": name, "hparams": hparams or {"beta": 0.5}},
            "rl": {"algorithm": "online", "num_generations": 2, "prompts_per_step": 4, **rl},
        },
    )


def _mb(scores, logps, ref, mask):
    z = jnp.zeros(mask.shape, jnp.float32)
    ids = jnp.zeros(mask.shape, jnp.int32)
    return Rollout(
        prompt_ids=ids,
        prompt_mask=ids,
        tokens=ids,
        mask=jnp.asarray(mask),
        old_logps=jnp.asarray(logps),
        ref_logps=jnp.asarray(ref),
        values=z,
        scores=jnp.asarray(scores),
        advantages=z,
        returns=z,
    )


def test_dpo_loss_is_trls_online_formula():
    """TRL: ``first >= second`` picks chosen, ``losses = -logsigmoid(beta * (pi_logratios - ref_logratios))``,
    ``loss = losses.mean()`` over every pair (ties included): our ``online_ties: first``."""
    scores, logps, ref, mask = _rollout_arrays(seed=1)
    beta = 0.5
    loss, metrics = online_objective(
        _online_cfg(online_ties="first"), jnp.asarray(logps), _mb(scores, logps, ref, mask)
    )
    p = _numpy_pairs(scores, logps, ref, mask, "first")
    logits = (p[:, 0] - p[:, 1]) - (p[:, 2] - p[:, 3])
    trl = np.mean(np.log1p(np.exp(-beta * logits)))
    np.testing.assert_allclose(float(loss), trl, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/accuracies"]), np.mean(logits > 0), rtol=1e-6)
    assert float(metrics["online/ranked_pairs"]) == 1.0


def test_cpo_loss_averages_over_ranked_pairs_only():
    scores, logps, ref, mask = _rollout_arrays(seed=2)
    hparams = {"beta": 0.5, "gamma": 0.5}
    cfg = _online_cfg("cpo", hparams)
    loss, metrics = online_objective(cfg, jnp.asarray(logps), _mb(scores, logps, ref, mask))
    pairs = online_pairs(jnp.asarray(scores), jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(mask))
    per_pair = np.asarray(losses.get("cpo")(pairs, **hparams), np.float64)
    ranked = scores[0::2] != scores[1::2]
    np.testing.assert_allclose(float(loss), per_pair[ranked].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["online/ranked_pairs"]), ranked.mean())
    none_ranked = np.repeat(scores[0::2], 2)  # every pair tied: nothing to learn, the loss is 0
    loss, _ = online_objective(cfg, jnp.asarray(logps), _mb(none_ranked, logps, ref, mask))
    assert float(loss) == 0.0


def test_minibatches_keep_a_prompts_two_samples_together():
    b, n = 12, 3
    rows = jnp.arange(b, dtype=jnp.float32)
    rollout = _mb(rows, jnp.zeros((b, n)), jnp.zeros((b, n)), jnp.ones((b, n)))
    batches = _minibatches(rollout, jax.random.key(3), epochs=2, num_mini_batches=3, group=2)
    seen = np.asarray(batches.scores).reshape(-1, 2)
    assert (seen[:, 1] == seen[:, 0] + 1).all() and (seen[:, 0] % 2 == 0).all()
    assert sorted(np.asarray(batches.scores)[:3].ravel().tolist()) == list(range(b))  # one epoch: every row once


@pytest.mark.parametrize(
    "rl,loss,key",
    [
        ({"num_generations": 4}, {}, "rl.num_generations"),
        ({"num_mini_batches": 4, "prompts_per_step": 2}, {}, "rl.num_mini_batches"),
        ({"kl_in": "loss"}, {}, "rl.kl_in"),
        ({"adaptive_kl_target": 3.0}, {}, "rl.adaptive_kl_target"),
        ({}, {"hparams": {"beta": 0.1, "gamma": 0.5}}, "loss.hparams"),  # sigmoid takes no gamma
        ({}, {"name": "cpo", "hparams": {"beta": 0.1, "gamma": -1.0}}, "loss.hparams.gamma"),
    ],
)
def test_config_mistakes_name_their_key(rl, loss, key):
    base = _online_cfg(loss.get("name", "sigmoid"), loss.get("hparams"), **rl)
    with pytest.raises(ConfigError) as err:
        validate_config(base)
    assert key in str(err.value.where), err.value


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    pytest.importorskip("torch")
    from tests.train_fixtures import tiny_policy

    return str(tiny_policy(tmp_path_factory.mktemp("online_policy") / "policy"))


def test_an_online_cpo_run(policy_dir, tmp_path):
    from cpo_jax.rlhf.trainer import RLTrainer

    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"path": policy_dir},
            "data": {"train_files": ["bundled:arithmetic-prompts:64"], "max_length": 96, "max_prompt_length": 64},
            "loss": {"objective": "rlhf", "name": "sigmoid", "hparams": {"beta": 0.1}},
            "rl": {
                "algorithm": "online",
                "reward": "verifier:digits",
                "prompts_per_step": 8,
                "num_generations": 2,
                "max_new_tokens": 12,
            },
            "optim": {"learning_rate": 3e-3, "schedule": "constant"},
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
            "steps": 3,
            "save_every": 1000,
            "progress_bar": False,
            "tensorboard": False,
            "export_hf": False,
        },
    )
    history = RLTrainer(cfg, devices=jax.devices()[:1]).run().history
    first = history[0]
    assert first["objective/kl"] == 0.0  # the first rollout comes from the reference itself
    assert 0.0 < first["online/ranked_pairs"] <= 1.0  # the digit fraction separates most samples
    # the policy is the reference at the first update: every pair's DPO loss is log 2
    np.testing.assert_allclose(first["loss/total"], math.log(2), rtol=1e-4)
    assert all(np.isfinite(h["loss/total"]) for h in history)
    assert history[-1]["objective/kl"] != 0.0  # it moved
