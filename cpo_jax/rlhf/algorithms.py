"""RLOO, GRPO, REINFORCE, PPO and online DPO/CPO as pure functions of a rollout, on the losses of
:mod:`cpo_jax.losses.rlhf` and :mod:`cpo_jax.losses`.

Two stages, both jittable:

* :func:`advantages_and_returns` turns scores, log-probs and values into ``[B, N]`` advantages. The KL
  penalty ``beta * KL(pi_old || pi_ref)`` is either subtracted from the reward here (``kl_in="reward"``:
  sequence level for RLOO/GRPO/REINFORCE, per token for PPO as in Ziegler et al. 2019) or left to the loss.
* :func:`policy_objective` is the loss of one minibatch: PPO's clipped surrogate (with one epoch and one
  minibatch the ratio is 1 and it is the plain policy gradient of RLOO/GRPO), plus ``beta * KL(pi || pi_ref)``
  when ``kl_in="loss"`` (GRPO style, usually with k3), plus ``vf_coef`` times the clipped value loss for PPO.

:func:`adaptive_kl_coef` is Ziegler et al.'s proportional controller for beta.

Online preference optimisation (``algorithm="online"``, TRL's ``OnlineDPOTrainer``): two completions per prompt,
ranked by their scores (:func:`online_pairs`), make a preference pair on the policy's own samples; the loss is any
pairwise loss of :mod:`cpo_jax.losses` (DPO, CPO, IPO...) on their summed log-probs and the reference's. Nothing
is subtracted from the scores; the loss's beta is the regulariser, and ``objective/kl`` is a readout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.losses.pair import PairLogps
from cpo_jax.losses.rlhf import (
    aggregate_token_losses,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    kl_penalized_token_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    reinforce_advantages,
    rloo_advantages,
    value_loss,
)

if TYPE_CHECKING:  # annotations only: this module is pure (jax and cpo_jax.losses), it never imports train/
    from cpo_jax.train.config import RLConfig

Array = jax.Array
Algorithm = Literal["rloo", "grpo", "reinforce", "ppo", "online"]
SEQUENCE_LEVEL = ("rloo", "grpo", "reinforce")


def online_pairs(scores: Array, logps: Array, ref_logps: Array, mask: Array, *, ties: str = "skip") -> PairLogps:
    """Preference pairs from two sampled completions per prompt, ranked by their scores.

    Args:
      scores: ``[2P]`` rewards, rows grouped by prompt (rows ``2i`` and ``2i + 1`` answer prompt ``i``).
      logps, ref_logps: ``[2P, N]`` token log-probs of the completions under the policy and the reference.
      mask: ``[2P, N]`` 1 on completion tokens.
      ties: ``"skip"``: a pair whose scores are equal carries no preference and is masked out (``PairLogps.mask``);
        ``"first"``: the first completion is chosen on a tie, as TRL's ``OnlineDPOTrainer`` does
        (``first >= second``).

    Returns:
      ``[P]`` :class:`~cpo_jax.losses.PairLogps`: summed log-probs of the higher-scored (chosen) and the other
      completion, the reference's, token counts (at least 1) and the mask of ranked pairs.
    """
    if ties not in ("skip", "first"):
        raise ValueError(f"ties={ties!r}: expected 'skip' or 'first'")
    m = mask.astype(jnp.float32)
    sums = jnp.sum(logps * m, axis=-1).reshape(-1, 2)
    ref_sums = jnp.sum(ref_logps * m, axis=-1).reshape(-1, 2)
    lengths = jnp.maximum(jnp.sum(m, axis=-1), 1.0).reshape(-1, 2)
    pair_scores = scores.reshape(-1, 2)
    first = pair_scores[:, 0] >= pair_scores[:, 1]

    def order(x):
        return jnp.where(first, x[:, 0], x[:, 1]), jnp.where(first, x[:, 1], x[:, 0])

    (chosen, rejected), (ref_chosen, ref_rejected), (n_chosen, n_rejected) = map(order, (sums, ref_sums, lengths))
    ranked = pair_scores[:, 0] != pair_scores[:, 1] if ties == "skip" else jnp.ones_like(first)
    return PairLogps(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths=n_chosen,
        rejected_lengths=n_rejected,
        mask=ranked,
    )


def sequence_kl(logps: Array, ref_logps: Array, mask: Array, estimator: str) -> Array:
    """``[B]`` summed per-token KL estimate of the completions (nats per sequence)."""
    return jnp.sum(kl_estimate(logps, ref_logps, estimator) * mask, axis=-1)


def advantages_and_returns(
    cfg: RLConfig,
    scores: Array,
    old_logps: Array,
    ref_logps: Array,
    values: Array,
    mask: Array,
    kl_coef: Array | float,
) -> tuple[Array, Array, dict[str, Array]]:
    """``(advantages [B, N], returns [B, N], metrics)`` for ``cfg.algorithm``.

    Args:
      scores: ``[B]`` rewards, rows grouped by prompt (``B = P * cfg.num_generations``).
      old_logps, ref_logps, values, mask: ``[B, N]``.
      kl_coef: beta (a traced scalar, so an adaptive controller does not recompile).
    """
    mask = mask.astype(jnp.float32)
    kl = sequence_kl(old_logps, ref_logps, mask, cfg.kl_estimator)
    beta_reward = kl_coef if cfg.kl_in == "reward" else 0.0
    if cfg.algorithm == "ppo":
        token_rewards = kl_penalized_token_rewards(
            scores, old_logps, ref_logps, mask, kl_coef=beta_reward, estimator=cfg.kl_estimator
        )
        advantages, returns = gae_advantages(token_rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask
    elif cfg.algorithm in SEQUENCE_LEVEL:
        rewards = scores - beta_reward * kl
        grouped = rewards.reshape(-1, cfg.num_generations)
        if cfg.algorithm == "rloo":
            seq_adv = rloo_advantages(grouped).reshape(-1)
        elif cfg.algorithm == "grpo":
            seq_adv = grpo_advantages(grouped).reshape(-1)
        else:
            seq_adv = reinforce_advantages(rewards)
        if cfg.whiten_advantages:
            seq_adv = masked_whiten(seq_adv, jnp.ones_like(seq_adv))
        advantages = seq_adv[:, None] * mask
        returns = jnp.zeros_like(advantages)
    elif cfg.algorithm == "online":  # the pair loss needs no advantages
        advantages = returns = jnp.zeros_like(mask)
    else:
        raise ValueError(f"rl.algorithm={cfg.algorithm!r}: expected one of rloo, grpo, reinforce, ppo, online")
    grouped_scores = scores.reshape(-1, cfg.num_generations)
    metrics = {
        "objective/kl": jnp.mean(kl),
        "objective/non_score_reward": -kl_coef * jnp.mean(kl),
        "objective/rlhf_reward": jnp.mean(scores - kl_coef * kl),
        "objective/scores": jnp.mean(scores),
        "objective/entropy": jnp.mean(-jnp.sum(old_logps * mask, axis=-1)),
        "critic/score/max": jnp.max(scores),
        "critic/score/min": jnp.min(scores),
        "critic/score/std_within_prompt": jnp.mean(jnp.std(grouped_scores, axis=-1)),
        "critic/advantages/mean": masked_mean(advantages, mask),
        "critic/advantages/max": jnp.max(jnp.where(mask > 0, advantages, -jnp.inf)),
        "critic/advantages/min": jnp.min(jnp.where(mask > 0, advantages, jnp.inf)),
    }
    if cfg.algorithm == "ppo":
        metrics["critic/values/mean"] = masked_mean(values, mask)
        metrics["critic/returns/mean"] = masked_mean(returns, mask)
    return advantages, returns, metrics


def policy_objective(
    cfg: RLConfig,
    logps: Array,
    old_logps: Array,
    ref_logps: Array,
    advantages: Array,
    mask: Array,
    kl_coef: Array | float,
    values: Array | None = None,
    old_values: Array | None = None,
    returns: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Scalar loss of one minibatch (all ``[B, N]``) and its metrics (TRL/verl names)."""
    mask = mask.astype(jnp.float32)
    pg_loss, stats = ppo_policy_loss(
        logps,
        old_logps,
        advantages,
        mask,
        clip_eps=cfg.clip_eps,
        clip_eps_high=cfg.clip_eps_high,
        aggregation=cfg.loss_aggregation,
    )
    ratio = jnp.exp(logps - old_logps)
    loss = pg_loss
    metrics = {
        "loss/policy_avg": pg_loss,
        "policy/clipfrac_avg": stats["clipfrac"],
        "policy/approxkl_avg": stats["approx_kl"],
        "val/ratio": masked_mean(ratio, mask),
        "val/ratio_var": masked_mean(jnp.square(ratio - masked_mean(ratio, mask)), mask),
    }
    if cfg.kl_in == "loss":
        kl_loss = aggregate_token_losses(kl_estimate(logps, ref_logps, cfg.kl_estimator), mask, cfg.loss_aggregation)
        loss = loss + kl_coef * kl_loss
        metrics["loss/kl_avg"] = kl_loss
    if cfg.algorithm == "ppo":
        vf_loss, vstats = value_loss(
            values, old_values, returns, mask, clip_eps=cfg.value_clip_eps, aggregation=cfg.loss_aggregation
        )
        loss = loss + cfg.vf_coef * vf_loss
        metrics["loss/value_avg"] = vf_loss
        metrics["val/clipfrac_avg"] = vstats["vf_clipfrac"]
    metrics["loss/total"] = loss
    return loss, metrics


def adaptive_kl_coef(kl_coef: float, observed_kl: float, n_samples: int, *, target: float, horizon: int) -> float:
    """Ziegler et al. (2019) proportional controller: ``beta *= 1 + clip(KL / target - 1, ±0.2) * n / horizon``."""
    error = float(np.clip(observed_kl / target - 1.0, -0.2, 0.2))
    return float(kl_coef * (1.0 + error * n_samples / horizon))
