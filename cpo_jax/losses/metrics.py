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
from cpo_jax.losses.pair import PairLogps, masked_sum
from cpo_jax.losses.registry import accept_legacy_arrays


def _mean(x: Array, real: Array) -> Array:
    """Mean of ``x`` over the real pairs (0 if there are none)."""
    return masked_sum(at_least_f32(x), real) / jnp.maximum(jnp.sum(real), 1)


def _diagnostics(delta_theta, delta_ref, *, gamma, real, suffix) -> dict[str, Array]:
    out = {
        "diagnostics/abs_accuracy": _mean(delta_theta > 0, real),
        "diagnostics/delta_theta_mean": _mean(delta_theta, real),
    }
    if delta_ref is not None:
        out["diagnostics/frac_in_U"] = _mean((delta_ref < delta_theta) & (delta_theta < 0), real)
        out["diagnostics/frac_ref_prefers_rejected"] = _mean(delta_ref < 0, real)
        out["diagnostics/delta_ref_mean"] = _mean(delta_ref, real)
        if gamma is not None:
            out["diagnostics/frac_ref_below_gamma"] = _mean(delta_ref < gamma, real)
    return {key + suffix: value for key, value in out.items()}


@accept_legacy_arrays
def preference_metrics(logps: PairLogps, *, beta: float = 0.1, gamma: float | None = None) -> dict[str, Array]:
    """TRL's reward/logp metrics and the paper's diagnostics, as scalar means over the real pairs.

    Args:
      logps: ``[B]`` summed completion log-probs (:class:`~cpo_jax.losses.pair.PairLogps`). Without a
        reference (reference-free losses), rewards are ``beta * log pi`` as in TRL's CPO/ORPO trainers,
        and only the reference-free diagnostics are returned. With both lengths, adds the ``*_norm``
        diagnostics. Every mean is over the pairs with ``logps.mask`` set (all if ``None``).
      beta: scales the rewards.
      gamma: CPO's margin; adds ``diagnostics/frac_ref_below_gamma``.
    """
    real = logps.real()
    pc, pr = logps.policy()
    has_reference = logps.ref_chosen is not None and logps.ref_rejected is not None
    rc, rr = (at_least_f32(logps.ref_chosen), at_least_f32(logps.ref_rejected)) if has_reference else (0.0, 0.0)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    metrics = {
        "rewards/chosen": _mean(chosen_rewards, real),
        "rewards/rejected": _mean(rejected_rewards, real),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards, real),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards, real),
        "logps/chosen": _mean(pc, real),
        "logps/rejected": _mean(pr, real),
    }
    delta_ref = rc - rr if has_reference else None
    metrics.update(_diagnostics(pc - pr, delta_ref, gamma=gamma, real=real, suffix=""))
    if logps.chosen_lengths is not None and logps.rejected_lengths is not None:
        n_c = jnp.maximum(at_least_f32(logps.chosen_lengths), 1.0)
        n_r = jnp.maximum(at_least_f32(logps.rejected_lengths), 1.0)
        delta_ref_norm = rc / n_c - rr / n_r if has_reference else None
        metrics.update(_diagnostics(pc / n_c - pr / n_r, delta_ref_norm, gamma=gamma, real=real, suffix="_norm"))
    return metrics
