"""RLHF algorithms, rollout scoring and the PPO update step against independent float64 NumPy references.

Covers :mod:`cpo_jax.rlhf.algorithms` (advantages, the minibatch objective and its gradient, the adaptive KL
controller), :mod:`cpo_jax.rlhf.rollout` (completion log-probs/entropy from hidden states, checked against a
dense forward pass of each unpadded row), :mod:`cpo_jax.rlhf.step` (one scored rollout, one SGD update) and
:func:`cpo_jax.ops.logprobs.chunked_token_entropy`. The pure losses underneath have their own tests in
``test_rlhf_losses.py``; here the references are written from the formulas and never call the library.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cpo_jax.models import Transformer, TransformerConfig
from cpo_jax.ops.logprobs import chunked_token_entropy
from cpo_jax.rlhf.algorithms import (
    adaptive_kl_coef,
    advantages_and_returns,
    policy_objective,
)
from cpo_jax.rlhf.rollout import Rollout, completion_hidden, completion_logps
from cpo_jax.rlhf.step import score_rollout, update
from cpo_jax.train.config import ModelConfig, RLConfig, TrainConfig
from cpo_jax.train.step import TrainState
from tests import reference_np as ref

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def fast_jit(fn, **kwargs):
    """``jax.jit`` without XLA's backend optimisation passes: on these tiny graphs they cost seconds of
    compile time and save nothing (the numbers are the same up to float32 rounding)."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


# ------------------------------------------------------------------------------------------------
# float64 NumPy references


def ragged_mask(rng, batch, length, *, short_rows=()):
    """Right-padded ``[B, N]`` completion mask; the rows in ``short_rows`` have length 1."""
    lengths = rng.integers(1, length + 1, batch)
    lengths[list(short_rows)] = 1
    lengths[-1] = length  # at least one full row
    return (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)


def token_weights(mask, aggregation):
    """``w [B, N]`` with ``aggregate(x) = sum(w * x)`` for each aggregation."""
    if aggregation == "token_mean":
        return mask / mask.sum()
    if aggregation == "seq_mean_token_mean":
        return mask / mask.sum(-1, keepdims=True) / mask.shape[0]
    return mask / mask.shape[0]


def whiten(x, mask, eps=1e-8):
    mean = (x * mask).sum() / mask.sum()
    var = (np.square(x - mean) * mask).sum() / mask.sum()
    return (x - mean) / np.sqrt(var + eps)


def np_advantages(cfg, scores, old, ref_logps, values, mask, beta):
    """``(advantages, returns, summed KL [B])`` written from the RLOO/GRPO/REINFORCE/PPO formulas."""
    kl_tok = ref.kl_k(old, ref_logps, cfg.kl_estimator) * mask
    kl = kl_tok.sum(-1)
    beta_r = beta if cfg.kl_in == "reward" else 0.0
    if cfg.algorithm == "ppo":
        rewards = -beta_r * kl_tok
        last = mask.sum(-1).astype(int) - 1
        rewards[np.arange(len(scores)), last] += scores
        adv, ret = ref.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask) * mask
        return adv, ret, kl
    r = scores - beta_r * kl
    grouped = r.reshape(-1, cfg.num_generations)
    if cfg.algorithm == "rloo":
        a = ref.rloo(grouped).reshape(-1)
    elif cfg.algorithm == "grpo":
        a = ref.grpo(grouped).reshape(-1)
    else:
        a = r.copy()
    if cfg.whiten_advantages:
        a = whiten(a, np.ones_like(a))
    return a[:, None] * mask, np.zeros_like(mask), kl


def np_objective(cfg, logps, old, ref_logps, adv, mask, beta, values=None, old_values=None, returns=None):
    """``(loss, policy loss, clipfrac, value clipfrac, d loss / d logps, d loss / d values)`` of one minibatch.

    The clipped branch carries no gradient; inside the clip range (or where the unclipped branch is
    the larger) the surrogate ``-A * rho`` has derivative ``-A * rho`` in the log-prob.
    """
    w = token_weights(mask, cfg.loss_aggregation)
    eps_high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    ratio = np.exp(logps - old)
    unclipped = -adv * ratio
    clipped = -adv * np.clip(ratio, 1 - cfg.clip_eps, 1 + eps_high)
    clip_active = clipped > unclipped
    pg = np.sum(w * np.maximum(unclipped, clipped))
    grad = w * np.where(clip_active, 0.0, -adv * ratio)
    loss = pg
    if cfg.kl_in == "loss":
        d = logps - ref_logps
        loss += beta * np.sum(w * ref.kl_k(logps, ref_logps, cfg.kl_estimator))
        dk = {"k1": np.ones_like(d), "k2": d, "k3": 1.0 - np.exp(-d)}[cfg.kl_estimator]
        grad = grad + beta * w * dk
    value_grad, value_clipfrac = None, None
    if cfg.algorithm == "ppo":
        if cfg.value_clip_eps is None:
            v_active = np.zeros(mask.shape, bool)
            per_token = np.square(values - returns)
        else:
            v_clipped = old_values + np.clip(values - old_values, -cfg.value_clip_eps, cfg.value_clip_eps)
            v_active = np.square(v_clipped - returns) > np.square(values - returns)
            per_token = np.maximum(np.square(values - returns), np.square(v_clipped - returns))
        loss += cfg.vf_coef * 0.5 * np.sum(w * per_token)
        value_grad = cfg.vf_coef * w * np.where(v_active, 0.0, values - returns)
        value_clipfrac = (v_active * mask).sum() / mask.sum()
    clipfrac = (clip_active * mask).sum() / mask.sum()
    return loss, pg, clipfrac, value_clipfrac, grad, value_grad


def np_entropy(logits):
    logp = ref.log_softmax(logits)
    return -np.sum(np.exp(logp) * logp, axis=-1)


# ------------------------------------------------------------------------------------------------
# advantages_and_returns

P, K, N = 3, 4, 7


def rollout_arrays(seed):
    rng = np.random.default_rng(seed)
    b = P * K
    mask = ragged_mask(rng, b, N, short_rows=(0, 5))
    old = -np.abs(rng.normal(1.0, 0.7, (b, N)))
    ref_logps = old + rng.normal(0.0, 0.4, (b, N))
    values = rng.normal(0.0, 1.0, (b, N))
    scores = rng.normal(0.0, 1.0, b)
    return scores, old, ref_logps, values, mask


# Every algorithm with both KL placements and both whitening settings; the estimators rotate so that each
# algorithm, and each KL placement, meets all three (a pairwise cover of the 48 combinations, in 16).
ADVANTAGE_CASES = [
    (algorithm, kl_in, ("k1", "k2", "k3")[(a + j) % 3], whiten_advantages)
    for a, algorithm in enumerate(["rloo", "grpo", "reinforce", "ppo"])
    for j, (kl_in, whiten_advantages) in enumerate(
        [("reward", False), ("reward", True), ("loss", False), ("loss", True)]
    )
]


@pytest.mark.parametrize("algorithm,kl_in,estimator,whiten_advantages", ADVANTAGE_CASES)
def test_advantages_and_returns_match_numpy(algorithm, kl_in, estimator, whiten_advantages):
    cfg = RLConfig(
        algorithm=algorithm,
        kl_in=kl_in,
        kl_estimator=estimator,
        whiten_advantages=whiten_advantages,
        num_generations=K,
        gamma=0.97,
        lam=0.9,
    )
    beta = 0.3
    scores, old, ref_logps, values, mask = rollout_arrays(0)
    adv, ret, metrics = advantages_and_returns(
        cfg, *(jnp.asarray(x, jnp.float32) for x in (scores, old, ref_logps, values, mask)), jnp.float32(beta)
    )
    want_adv, want_ret, kl = np_advantages(cfg, scores, old, ref_logps, values, mask, beta)
    assert adv.shape == ret.shape == mask.shape
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=2e-4, atol=2e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0)
    expected = {
        "objective/kl": kl.mean(),
        "objective/non_score_reward": -beta * kl.mean(),
        "objective/rlhf_reward": np.mean(scores - beta * kl),
        "objective/scores": scores.mean(),
        "critic/advantages/mean": (want_adv * mask).sum() / mask.sum(),
        "critic/advantages/max": want_adv[mask > 0].max(),
    }
    if algorithm == "ppo":
        expected["critic/returns/mean"] = (want_ret * mask).sum() / mask.sum()
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=2e-4, atol=2e-5, err_msg=name)


def test_kl_in_reward_changes_sequence_advantages_by_the_penalty():
    """With kl_in=reward, RLOO's advantage is the RLOO of ``score - beta * KL``: raising each row's score by
    ``beta * KL`` of that row cancels the penalty exactly, giving the advantages of kl_in=loss."""
    scores, old, ref_logps, values, mask = rollout_arrays(1)
    beta = 0.5
    kl = (ref.kl_k(old, ref_logps, "k1") * mask).sum(-1)
    args = lambda s: [jnp.asarray(x, jnp.float32) for x in (s, old, ref_logps, values, mask)]
    with_kl, _, _ = advantages_and_returns(RLConfig(kl_in="reward", num_generations=K), *args(scores + beta * kl), beta)
    without, _, _ = advantages_and_returns(RLConfig(kl_in="loss", num_generations=K), *args(scores), beta)
    np.testing.assert_allclose(np.asarray(with_kl), np.asarray(without), atol=1e-5)
    assert np.abs(np.asarray(without)).max() > 0.1


def test_unknown_algorithm():
    scores, old, ref_logps, values, mask = (jnp.asarray(x) for x in rollout_arrays(2))
    with pytest.raises(ValueError, match="a2c"):
        advantages_and_returns(RLConfig(algorithm="a2c", num_generations=K), scores, old, ref_logps, values, mask, 0.1)


# ------------------------------------------------------------------------------------------------
# policy_objective: value and gradient

RATIOS = np.array([0.5, 0.75, 0.9, 1.0, 1.1, 1.24, 1.5, 2.0])  # both sides of [0.8, 1.2] and of 1.28


def objective_arrays(seed, batch=6):
    rng = np.random.default_rng(seed)
    n = len(RATIOS)
    mask = ragged_mask(rng, batch, n, short_rows=(1,))
    logps = -np.abs(rng.normal(1.0, 0.7, (batch, n)))
    ratio = np.stack([rng.permutation(RATIOS) for _ in range(batch)])
    old = logps - np.log(ratio)
    adv = rng.normal(0.0, 1.0, (batch, n))
    adv = np.where(np.abs(adv) < 0.1, 0.5, adv)
    ref_logps = logps + rng.normal(0.0, 0.4, (batch, n))
    values, returns = rng.normal(0.0, 1.0, (2, batch, n))
    old_values = values + rng.choice([-0.5, -0.1, 0.1, 0.5], (batch, n))
    return logps, old, ref_logps, adv, mask, values, old_values, returns


OBJECTIVE_CASES = {
    "rloo": {"algorithm": "rloo"},
    "grpo_k3_in_loss": {"algorithm": "grpo", "kl_in": "loss", "kl_estimator": "k3"},
    "ppo": {"algorithm": "ppo", "vf_coef": 0.4, "value_clip_eps": 0.2},
    "ppo_k2_in_loss_unclipped_values": {
        "algorithm": "ppo",
        "kl_in": "loss",
        "kl_estimator": "k2",
        "value_clip_eps": None,
    },
}


# Each case with every aggregation; the upper clip alternates so that each case meets both.
OBJECTIVE_GRID = [
    (case, aggregation, (None, 0.28)[(c + a) % 2])
    for c, case in enumerate(sorted(OBJECTIVE_CASES))
    for a, aggregation in enumerate(AGGREGATIONS)
]


@pytest.mark.parametrize("case,aggregation,eps_high", OBJECTIVE_GRID)
def test_policy_objective_value_and_gradient(case, aggregation, eps_high):
    cfg = RLConfig(**OBJECTIVE_CASES[case], clip_eps=0.2, clip_eps_high=eps_high, loss_aggregation=aggregation)
    beta = 0.3
    logps, old, ref_logps, adv, mask, values, old_values, returns = objective_arrays(3)
    ratio = np.exp(logps - old)
    live = mask > 0
    for high, positive in [(True, True), (True, False), (False, True), (False, False)]:
        side = ratio > 1.3 if high else ratio < 0.8
        assert np.any(live & side & ((adv > 0) == positive)), "the data must clip on both sides for both signs"

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    ppo = cfg.algorithm == "ppo"

    def loss_fn(lp, v):
        return policy_objective(
            cfg,
            lp,
            f32(old),
            f32(ref_logps),
            f32(adv),
            f32(mask),
            jnp.float32(beta),
            values=v if ppo else None,
            old_values=f32(old_values) if ppo else None,
            returns=f32(returns) if ppo else None,
        )

    (loss, metrics), (d_logps, d_values) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        f32(logps), f32(values)
    )
    want, want_pg, clipfrac, value_clipfrac, want_d_logps, want_d_values = np_objective(
        cfg, logps, old, ref_logps, adv, mask, beta, values, old_values, returns
    )
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss/total"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss/policy_avg"]), want_pg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["policy/clipfrac_avg"]), clipfrac, rtol=1e-6)
    masked_mean = lambda x: (x * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["policy/approxkl_avg"]), masked_mean(ratio - 1 - np.log(ratio)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["val/ratio"]), masked_mean(ratio), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d_logps), want_d_logps, rtol=1e-5, atol=1e-7)
    if ppo:
        np.testing.assert_allclose(np.asarray(d_values), want_d_values, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(metrics["val/clipfrac_avg"]), value_clipfrac, rtol=1e-6)
    assert ("loss/kl_avg" in metrics) == (cfg.kl_in == "loss")
    assert ("loss/value_avg" in metrics) == ppo


def test_clipped_tokens_get_no_gradient():
    """The tokens whose clipped branch is active are exactly the zeros of the policy gradient (kl_in=reward)."""
    cfg = RLConfig(algorithm="rloo", clip_eps=0.2)
    logps, old, ref_logps, adv, mask, *_ = objective_arrays(4)
    grad = jax.grad(
        lambda lp: policy_objective(cfg, lp, *(jnp.asarray(x, jnp.float32) for x in (old, ref_logps, adv, mask)), 0.1)[
            0
        ]
    )(jnp.asarray(logps, jnp.float32))
    ratio = np.exp(logps - old)
    clipped = -adv * np.clip(ratio, 0.8, 1.2) > -adv * ratio
    live = mask > 0
    assert np.any(live & clipped) and np.any(live & ~clipped)
    np.testing.assert_array_equal(np.asarray(grad)[live] == 0, clipped[live])
    assert np.all(np.asarray(grad)[~live] == 0)


# ------------------------------------------------------------------------------------------------
# Tiny models. Parameters are drawn in NumPy into the abstract state: initialising through nnx.Rngs
# would compile one random-number program per parameter shape, which costs seconds on CPU.

TINY = {
    "family": "llama",
    "model_type": "llama",
    "vocab_size": 48,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 8,
}


def tiny_model(seed=0, **changes):
    """``(graphdef, state)`` of a random one-layer Llama (norm scales near 1, weights N(0, 0.5))."""
    cfg = TransformerConfig(**{**TINY, **changes})
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    draw = lambda x: jnp.asarray(
        1.0 + rng.normal(0, 0.2, x.shape) if x.ndim == 1 else rng.normal(0, 0.5, x.shape), x.dtype
    )
    return graphdef, jax.tree.map(draw, abstract)


def padded_batch(seed, *, prompt_lengths, completion_lengths, tp=5, n=6, vocab=48):
    """Left-padded prompts and right-padded completions; the padding holds junk token ids, not 0."""
    rng = np.random.default_rng(seed)
    b = len(prompt_lengths)
    prompt_ids = rng.integers(1, vocab, (b, tp))
    tokens = rng.integers(1, vocab, (b, n))
    prompt_mask = (np.arange(tp)[None, :] >= tp - np.asarray(prompt_lengths)[:, None]).astype(np.int32)
    mask = (np.arange(n)[None, :] < np.asarray(completion_lengths)[:, None]).astype(np.int32)
    return prompt_ids, prompt_mask, tokens, mask


def dense_completion_logits(graphdef, state, prompt_ids, prompt_mask, tokens, mask):
    """float64 ``[B, N, V]`` logits predicting each completion token, from a plain forward pass (no attention
    mask, positions 0..T-1) of each row with its padding removed. The rows are moved to the left edge and
    filled on the right with junk, which a causal model cannot see, so one batched call serves all rows."""
    b, n = tokens.shape
    rows = np.full((b, prompt_ids.shape[1] + n), 7)
    for i in range(b):
        real = np.concatenate([prompt_ids[i][prompt_mask[i] > 0], tokens[i][mask[i] > 0]])
        rows[i, : len(real)] = real
    logits = np.asarray(fast_jit(lambda st, ids: nnx.merge(graphdef, st)(ids))(state, jnp.asarray(rows)), np.float64)
    starts = prompt_mask.sum(-1) - 1
    return np.stack([logits[i, s : s + n] for i, s in enumerate(starts)]) * mask[..., None]


def gather(logp, tokens):
    return np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


# ------------------------------------------------------------------------------------------------
# chunked_token_entropy


@pytest.mark.parametrize("chunk_size,softcap", [(4, None), (4, 2.0), (5, 2.0), (1024, None)])  # B*T = 15: chunks
def test_chunked_token_entropy_matches_dense_softmax(chunk_size, softcap):
    rng = np.random.default_rng(6)
    hidden, unembedding = rng.normal(0, 1, (3, 5, 8)), rng.normal(0, 1, (8, 40))
    temperature = 0.7
    got = chunked_token_entropy(
        jnp.asarray(hidden, jnp.float32),
        jnp.asarray(unembedding, jnp.float32),
        chunk_size=chunk_size,
        temperature=temperature,
        logit_softcap=softcap,
    )
    logits = hidden @ unembedding
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    want = np_entropy(logits / temperature)
    assert got.shape == (3, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# adaptive_kl_coef


@pytest.mark.parametrize("observed,error", [(11.0, 0.1), (9.0, -0.1), (10.0, 0.0), (50.0, 0.2), (0.5, -0.2)])
def test_adaptive_kl_coef_closed_form(observed, error):
    got = adaptive_kl_coef(0.1, observed, 256, target=10.0, horizon=1000)
    assert got == pytest.approx(0.1 * (1.0 + error * 256 / 1000), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Scoring a rollout: completion_hidden + completion_logps/entropy against the dense forward of each row


def test_score_rollout_equals_the_dense_forward_of_each_unpadded_row():
    """Old and reference log-probs (and the entropy) read from hidden states of the left-padded prompt +
    right-padded completion equal log-softmax of each unpadded row's logits, and the advantages follow."""
    temperature = 0.7  # applied after the Gemma 2 soft-cap
    # Learned absolute positions: RoPE alone cannot tell whether left padding shifted them.
    changes = {"final_softcap": 1.5, "position": "learned", "max_position_embeddings": 16}
    graphdef, policy = tiny_model(0, **changes)
    _, reference = tiny_model(1, **changes)
    rl = RLConfig(algorithm="rloo", num_generations=2, temperature=temperature)
    cfg = TrainConfig(model=ModelConfig(logprob_chunk_size=4), rl=rl)  # B*N = 24: six chunks
    batch = padded_batch(7, prompt_lengths=[5, 5, 2, 2], completion_lengths=[6, 1, 3, 5])
    mask = batch[3]
    scores, beta = np.array([1.0, -0.5, 0.25, 2.0]), 0.2
    rollout, metrics = fast_jit(functools.partial(score_rollout, cfg=cfg, graphdef=graphdef))(
        {"model": policy}, {"model": reference}, *(jnp.asarray(x) for x in (*batch, scores)), jnp.float32(beta)
    )

    live, maskf = mask > 0, mask.astype(np.float64)
    policy_logits = dense_completion_logits(graphdef, policy, *batch) / temperature
    want_old = gather(ref.log_softmax(policy_logits), batch[2]) * maskf
    want_ref = (
        gather(ref.log_softmax(dense_completion_logits(graphdef, reference, *batch) / temperature), batch[2]) * maskf
    )
    np.testing.assert_allclose(np.asarray(rollout.old_logps)[live], want_old[live], atol=2e-5)
    np.testing.assert_allclose(np.asarray(rollout.ref_logps)[live], want_ref[live], atol=2e-5)
    assert np.abs(want_old - want_ref)[live].min() > 1e-3  # the two models differ on every token
    entropy = (np_entropy(policy_logits) * maskf).sum() / maskf.sum()
    np.testing.assert_allclose(float(metrics["policy/entropy_avg"]), entropy, rtol=1e-5)
    want_adv, _, kl = np_advantages(rl, scores, want_old, want_ref, np.zeros_like(maskf), maskf, beta)
    np.testing.assert_allclose(np.asarray(rollout.advantages), want_adv, atol=1e-4)
    np.testing.assert_allclose(float(metrics["objective/kl"]), kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["response_length/mean"]), 3.75)
    assert np.all(np.asarray(rollout.values) == 0)


# ------------------------------------------------------------------------------------------------
# One PPO update on a fixed rollout


def test_one_ppo_sgd_update_on_a_fixed_rollout():
    """``update`` (one epoch, one minibatch, plain SGD) reports the clipped objective of the pre-update
    log-probs and moves every parameter, value head included, by exactly ``-lr * grad`` of it."""
    rl = RLConfig(
        algorithm="ppo",
        kl_in="loss",
        kl_estimator="k3",
        vf_coef=0.5,
        value_clip_eps=0.2,
        clip_eps=0.2,
        clip_eps_high=0.28,
        loss_aggregation="seq_mean_token_mean",
        num_generations=2,
        temperature=0.9,
    )
    cfg = TrainConfig(model=ModelConfig(logprob_chunk_size=8), rl=rl)  # B*N = 24 > 8: the chunked custom VJP
    beta, lr = 0.3, 0.5
    graphdef, model_state = tiny_model(0)
    rng = np.random.default_rng(8)
    params = {
        "model": model_state,
        "value_head": {"kernel": jnp.asarray(rng.normal(0, 0.3, 16), jnp.float32), "bias": jnp.float32(0.1)},
    }
    prompt_ids, prompt_mask, tokens, mask = padded_batch(
        9, prompt_lengths=[5, 5, 3, 3], completion_lengths=[6, 1, 4, 6]
    )
    batch = [jnp.asarray(x) for x in (prompt_ids, prompt_mask, tokens, mask)]
    maskf = mask.astype(np.float64)
    w = jnp.asarray(token_weights(maskf, rl.loss_aggregation), jnp.float32)

    @fast_jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def reference_loss(p, old, ref_logps, adv, old_values, returns):
        """The objective written out in jnp on the model's dense (one-chunk) log-probs, for autodiff."""
        m = nnx.merge(graphdef, p["model"])
        h = completion_hidden(m, *batch)
        lp = completion_logps(m, h, batch[2], temperature=0.9, chunk_size=10**6)
        v = h @ p["value_head"]["kernel"] + p["value_head"]["bias"]
        r = jnp.exp(lp - old)
        loss = jnp.sum(w * jnp.maximum(-adv * r, -adv * jnp.clip(r, 1 - rl.clip_eps, 1 + rl.clip_eps_high)))
        d = lp - ref_logps
        loss += beta * jnp.sum(w * (jnp.exp(-d) - 1 + d))  # k3
        v_clip = old_values + jnp.clip(v - old_values, -rl.value_clip_eps, rl.value_clip_eps)
        loss += rl.vf_coef * 0.5 * jnp.sum(w * jnp.maximum((v - returns) ** 2, (v_clip - returns) ** 2))
        return loss, (lp, v)

    zeros = jnp.zeros(tokens.shape, jnp.float32)
    (_, (logps0, values0)), _ = reference_loss(params, *[zeros] * 5)
    logps0, values0 = np.asarray(logps0, np.float64), np.asarray(values0, np.float64)
    ratio = np.stack([rng.permutation(RATIOS[[0, 1, 3, 5, 6, 7]]) for _ in range(4)])  # clipped on both sides
    old = (logps0 - np.log(ratio)) * maskf
    ref_logps = (logps0 + rng.normal(0, 0.3, logps0.shape)) * maskf
    adv = rng.normal(0, 1, logps0.shape) * maskf
    old_values = values0 + rng.choice([-0.4, 0.05, 0.4], logps0.shape)
    returns = rng.normal(0, 1, logps0.shape) * maskf
    arrays = [jnp.asarray(x, jnp.float32) for x in (old, ref_logps, adv, old_values, returns)]
    rollout = Rollout(
        *batch,
        old_logps=arrays[0],
        ref_logps=arrays[1],
        values=arrays[3],
        scores=jnp.zeros(4),
        advantages=arrays[2],
        returns=arrays[4],
    )

    optimizer = optax.apply_if_finite(optax.sgd(lr), 10**9)
    state = TrainState(
        step=jnp.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(0))
    )
    step = fast_jit(functools.partial(update, cfg=cfg, graphdef=graphdef, optimizer=optimizer, schedule=lambda s: lr))
    new_state, metrics = step(state, rollout, jnp.float32(beta))

    want, want_pg, clipfrac, value_clipfrac, _, _ = np_objective(
        rl, logps0, old, ref_logps, adv, maskf, beta, values0, old_values, returns
    )
    assert 0 < clipfrac < 1 and 0 < value_clipfrac < 1
    np.testing.assert_allclose(float(metrics["loss/policy_avg"]), want_pg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss/total"]), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["policy/clipfrac_avg"]), clipfrac, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["val/clipfrac_avg"]), value_clipfrac, rtol=1e-6)

    (loss, _), grads = reference_loss(params, *arrays)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    moved = jax.tree.map(
        lambda new, old_: (np.asarray(new, np.float64) - np.asarray(old_, np.float64)) / -lr, new_state.params, params
    )
    leaves, grad_leaves = jax.tree.leaves(moved), jax.tree.leaves(grads)
    assert len(leaves) == len(grad_leaves) > 3
    scale = max(float(np.abs(g).max()) for g in grad_leaves)
    assert scale > 1e-3
    for got, g in zip(leaves, grad_leaves):
        np.testing.assert_allclose(got, np.asarray(g), atol=2e-3 * scale, rtol=1e-3)
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in grad_leaves))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
    assert int(new_state.step) == 1 and float(metrics["finite"]) == 1.0
    assert int(metrics["nonfinite/consecutive"]) == 0 and int(metrics["nonfinite/total"]) == 0
