"""Preference metrics under TRL's names, plus the paper's diagnostics.

TRL (``DPOTrainer``) meaning, with ``u = log pi - log pi_ref`` on summed log-probs:
  * ``rewards/chosen``, ``rewards/rejected``: mean of ``beta * u_w``, ``beta * u_l``;
  * ``rewards/accuracies``: share of pairs with ``beta * u_w > beta * u_l`` (strict), i.e.
    ``delta_theta > delta_ref``: a *relative* accuracy;
  * ``rewards/margins``: mean of ``beta * (u_w - u_l)``;
  * ``logps/chosen``, ``logps/rejected``: mean summed policy log-probs.

The paper's diagnostics (Yang et al. 2026), with ``delta_theta = log pi(y_w) - log pi(y_l)`` and
``delta_ref`` likewise under the reference:
  * ``diagnostics/frac_in_U``: share with ``delta_ref < delta_theta < 0``, the region where DPO's
    loss is below log 2 while the policy still prefers ``y_l``;
  * ``diagnostics/frac_ref_prefers_rejected``: share with ``delta_ref < 0``;
  * ``diagnostics/abs_accuracy``: share with ``delta_theta > 0``, the policy's *absolute*
    preference accuracy;
  * ``diagnostics/frac_ref_below_gamma``: share with ``delta_ref < gamma`` (when ``gamma`` is given),
    the pairs whose CPO target is lifted above the reference margin;
  * ``diagnostics/delta_theta_mean``, ``diagnostics/delta_ref_mean``.
With the lengths, each diagnostic is also reported on per-token average log-probs under the same
name with the suffix ``_norm`` (the units of the released CPO code).
"""

from __future__ import annotations

import jax.numpy as jnp

from cpo_jax.losses._common import Array, at_least_f32


def _mean(x: Array, mask: Array | None) -> Array:
    x = at_least_f32(x)
    if mask is None:
        return jnp.mean(x)
    mask = at_least_f32(mask)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _diagnostics(delta_theta, delta_ref, *, gamma, mask, suffix) -> dict[str, Array]:
    out = {
        "diagnostics/abs_accuracy": _mean(delta_theta > 0, mask),
        "diagnostics/delta_theta_mean": _mean(delta_theta, mask),
    }
    if delta_ref is not None:
        out["diagnostics/frac_in_U"] = _mean((delta_ref < delta_theta) & (delta_theta < 0), mask)
        out["diagnostics/frac_ref_prefers_rejected"] = _mean(delta_ref < 0, mask)
        out["diagnostics/delta_ref_mean"] = _mean(delta_ref, mask)
        if gamma is not None:
            out["diagnostics/frac_ref_below_gamma"] = _mean(delta_ref < gamma, mask)
    return {key + suffix: value for key, value in out.items()}


def preference_metrics(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array | None = None,
    reference_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    gamma: float | None = None,
    mask: Array | None = None,
) -> dict[str, Array]:
    """TRL's reward/logp metrics and the paper's diagnostics, as scalar means over the batch.

    Args:
      policy_*/reference_*: ``[B]`` summed completion log-probs. Without a reference (reference-free
        losses), rewards are ``beta * log pi`` as in TRL's CPO/ORPO trainers, and only the
        reference-free diagnostics are returned.
      chosen_lengths, rejected_lengths: ``[B]`` token counts; adds the ``*_norm`` diagnostics.
      gamma: CPO's margin; adds ``diagnostics/frac_ref_below_gamma``.
      mask: ``[B]`` 1 for real pairs, 0 for padding pairs.
    """
    pc, pr = at_least_f32(policy_chosen_logps), at_least_f32(policy_rejected_logps)
    has_reference = reference_chosen_logps is not None and reference_rejected_logps is not None
    rc, rr = (at_least_f32(reference_chosen_logps), at_least_f32(reference_rejected_logps)) if has_reference else (0.0, 0.0)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    metrics = {
        "rewards/chosen": _mean(chosen_rewards, mask),
        "rewards/rejected": _mean(rejected_rewards, mask),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards, mask),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards, mask),
        "logps/chosen": _mean(pc, mask),
        "logps/rejected": _mean(pr, mask),
    }
    delta_ref = rc - rr if has_reference else None
    metrics.update(_diagnostics(pc - pr, delta_ref, gamma=gamma, mask=mask, suffix=""))
    if chosen_lengths is not None and rejected_lengths is not None:
        n_c, n_r = jnp.maximum(at_least_f32(chosen_lengths), 1.0), jnp.maximum(at_least_f32(rejected_lengths), 1.0)
        delta_ref_norm = rc / n_c - rr / n_r if has_reference else None
        metrics.update(_diagnostics(pc / n_c - pr / n_r, delta_ref_norm, gamma=gamma, mask=mask, suffix="_norm"))
    return metrics
