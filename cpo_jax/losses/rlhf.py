"""KL-regularised RLHF pieces: KL estimators, penalised rewards, advantages, PPO losses.

Token-level arrays are ``[B, T]`` with a float/bool ``mask`` ``[B, T]`` (1 on completion
tokens). Log-probs are per-token log-probs of the sampled tokens.

References:
  * KL estimators k1/k2/k3: J. Schulman, "Approximating KL divergence" (2020).
  * PPO: Schulman et al. 2017 (arXiv 1707.06347), eq. 7; RLHF use: Ziegler et al. 2019.
  * GAE: Schulman et al. 2016 (arXiv 1506.02438), eq. 16.
  * RLOO: Ahmadian et al. 2024 (arXiv 2402.14740), eq. 6.
  * GRPO: Shao et al. 2024 (arXiv 2402.03300), eq. 3 (outcome supervision).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from cpo_jax.losses._common import at_least_f32

Array = jax.Array
KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]

K3_LOG_RATIO_CLIP = 20.0


def kl_estimate(
    logps: Array, ref_logps: Array, estimator: KLEstimator = "k1", *, k3_clip: float | None = K3_LOG_RATIO_CLIP
) -> Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, ``[...]`` -> ``[...]``.

    With d = log pi - log pi_ref:
      * k1 = d                      (unbiased, high variance, can be negative)
      * k2 = d**2 / 2               (biased, low variance)
      * k3 = exp(-d) - 1 + d        (unbiased, >= 0)
    For k3, d is clipped to ``[-k3_clip, k3_clip]`` (as verl does) so that exp(-d) stays finite.
    """
    delta = at_least_f32(logps) - at_least_f32(ref_logps)
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * jnp.square(delta)
    if estimator == "k3":
        if k3_clip is not None:
            delta = jnp.clip(delta, -k3_clip, k3_clip)
        return jnp.expm1(-delta) + delta
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")


def kl_penalized_sequence_reward(
    scores: Array,
    logps: Array,
    ref_logps: Array,
    mask: Array,
    *,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> Array:
    """Sequence reward with the KL penalty in the reward: ``score - kl_coef * sum_t kl_t`` -> ``[B]``.

    Args: scores ``[B]``; logps, ref_logps, mask ``[B, T]``.
    """
    kl = kl_estimate(logps, ref_logps, estimator) * mask
    return at_least_f32(scores) - kl_coef * jnp.sum(kl, axis=-1)


def last_token_index(mask: Array) -> Array:
    """Index of the last 1 in each row of ``mask`` ``[B, T]`` -> int ``[B]`` (0 for an empty row)."""
    positions = jnp.arange(mask.shape[-1])
    return jnp.max(jnp.where(mask > 0, positions, 0), axis=-1)


def kl_penalized_token_rewards(
    scores: Array,
    logps: Array,
    ref_logps: Array,
    mask: Array,
    *,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> Array:
    """Per-token PPO rewards ``[B, T]``: ``-kl_coef * kl_t`` everywhere, plus ``score`` on the last token.

    This is the Ziegler et al. (2019) / TRL PPO shaping; summing it over t gives
    :func:`kl_penalized_sequence_reward`.
    """
    mask = mask.astype(jnp.float32)
    rewards = -kl_coef * kl_estimate(logps, ref_logps, estimator) * mask
    last = jax.nn.one_hot(last_token_index(mask), mask.shape[-1], dtype=jnp.float32)
    return rewards + at_least_f32(scores)[:, None] * last * mask


def reinforce_advantages(rewards: Array, baseline: Array | float | None = None) -> Array:
    """REINFORCE advantages ``[N]``: ``reward - baseline`` (no baseline: the reward itself)."""
    rewards = at_least_f32(rewards)
    return rewards if baseline is None else rewards - baseline


def rloo_advantages(rewards: Array) -> Array:
    """RLOO advantages for ``[P, K]`` rewards (K samples per prompt, K >= 2) -> ``[P, K]``.

    ``A_i = r_i - mean_{j != i} r_j = K / (K - 1) * (r_i - mean_j r_j)``.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt; got K={k}")
    rewards = at_least_f32(rewards)
    leave_one_out_mean = (jnp.sum(rewards, axis=-1, keepdims=True) - rewards) / (k - 1)
    return rewards - leave_one_out_mean


def grpo_advantages(rewards: Array, *, scale_by_std: bool = True, eps: float = 1e-4) -> Array:
    """GRPO group-normalised advantages for ``[P, K]`` rewards -> ``[P, K]``.

    ``A_i = (r_i - mean(r)) / (std(r) + eps)``, with the unbiased (ddof=1) std as in TRL.
    ``scale_by_std=False`` keeps only the centring (Dr. GRPO, Liu et al. 2025).
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt; got K={k}")
    rewards = at_least_f32(rewards)
    centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    if not scale_by_std:
        return centred
    return centred / (jnp.std(rewards, axis=-1, ddof=1, keepdims=True) + eps)


def gae_advantages(
    rewards: Array, values: Array, mask: Array, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Array, Array]:
    """Generalised advantage estimation over ``[B, T]`` token rewards and values.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    V and r zeroed outside ``mask`` (so nothing leaks past the end of a completion).
    Returns ``(advantages, returns)``, both (at least) float32 ``[B, T]``, ``returns = A + V``.
    """
    mask = mask.astype(jnp.float32)
    rewards = at_least_f32(rewards) * mask
    values = at_least_f32(values) * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(carry, delta_t):
        advantage = delta_t + gamma * lam * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = advantages.T * mask
    return advantages, advantages + values


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Mean of ``x`` over entries where ``mask`` is 1 (0 if none)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Whitens ``x`` to zero mean / unit variance over the masked entries (TRL's ``masked_whiten``)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def aggregate_token_losses(per_token: Array, mask: Array, aggregation: Aggregation = "token_mean") -> Array:
    """Reduces ``[B, T]`` per-token losses to a scalar.

    * ``token_mean``: sum over all masked tokens / number of masked tokens (DAPO, TRL default);
    * ``seq_mean_token_mean``: mean over sequences of each sequence's token mean (original GRPO);
    * ``seq_mean_token_sum``: mean over sequences of each sequence's token sum.
    """
    mask = mask.astype(jnp.float32)
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    if aggregation == "seq_mean_token_mean":
        return jnp.mean(masked_mean(per_token, mask, axis=-1))
    if aggregation == "seq_mean_token_sum":
        return jnp.mean(jnp.sum(per_token * mask, axis=-1))
    raise ValueError(
        f"unknown aggregation {aggregation!r}; expected 'token_mean', 'seq_mean_token_mean' or 'seq_mean_token_sum'"
    )


def ppo_policy_loss(
    logps: Array,
    old_logps: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: Aggregation = "token_mean",
) -> tuple[Array, dict[str, Array]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``rho_t = exp(logp_t - old_logp_t)``;
    ``l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip_eps, 1 + clip_eps_high))``.

    Args:
      logps, old_logps, mask: ``[B, T]``. ``advantages``: ``[B, T]`` or ``[B]`` (sequence-level,
        broadcast over tokens, as RLOO/GRPO use it).
      clip_eps_high: upper clip (DAPO's clip-higher); defaults to ``clip_eps``.
    Returns:
      ``(loss, stats)`` with the scalar loss and ``clipfrac`` (share of tokens where the clipped
      branch is active) and ``approx_kl`` (mean of k3 between old and new policy).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = at_least_f32(advantages)
    log_ratio = at_least_f32(logps) - at_least_f32(old_logps)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(kl_estimate(old_logps, logps, "k3"), mask),
    }
    return aggregate_token_losses(per_token, mask, aggregation), stats


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip_eps: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, ±eps) - R)^2)``.

    ``clip_eps=None`` gives the plain squared error. Returns ``(loss, {"vf_clipfrac": ...})``.
    """
    values = at_least_f32(values)
    returns = at_least_f32(returns)
    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        per_token, clipfrac = unclipped, jnp.zeros((), jnp.float32)
    else:
        old_values = at_least_f32(old_values)
        clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        clipped = jnp.square(clipped_values - returns)
        per_token = jnp.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).astype(jnp.float32), mask)
    return 0.5 * aggregate_token_losses(per_token, mask, aggregation), {"vf_clipfrac": clipfrac}
