"""KTO: Kahneman-Tversky Optimization on unpaired data (Ethayarajh et al. 2024, arXiv 2402.01306)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from cpo_jax.losses._common import Array, at_least_f32


def kto_kl_estimate(policy_kl_logps: Array, reference_kl_logps: Array, mask: Array | None = None) -> Array:
    """KTO's reference point z0: ``max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))``, no gradient.

    Args: ``[B]`` summed log-probs of *mismatched* completions (each prompt paired with another
    example's completion, as TRL does); optional ``mask`` ``[B]`` of valid rows. Returns a scalar.
    Under data parallelism, average the masked sum and count over all devices before clamping.
    """
    difference = at_least_f32(policy_kl_logps) - at_least_f32(reference_kl_logps)
    mask = jnp.ones_like(difference) if mask is None else at_least_f32(mask)
    mean = jnp.sum(difference * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
    policy_logps: Array,
    reference_logps: Array,
    desirable: Array,
    *,
    kl: Array | float = 0.0,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto",
) -> Array:
    """Per-example KTO loss ``[B]`` (paper eq. 8; TRL ``KTOTrainer``).

    With ``u = log pi(y|x) - log pi_ref(y|x)`` (summed log-probs) and reference point ``z0 = kl``:
      * desirable:   ``w_d * (1 - sigma(beta (u - z0)))``
      * undesirable: ``w_u * (1 - sigma(beta (z0 - u)))``
    ``loss_type="apo_zero_unpaired"`` uses ``1 - sigma(beta u)`` and ``sigma(beta u)`` instead.

    Args: ``[B]`` summed log-probs, ``desirable`` ``[B]`` bool, ``kl`` from :func:`kto_kl_estimate`.
    """
    log_ratio = at_least_f32(policy_logps) - at_least_f32(reference_logps)
    desirable = jnp.asarray(desirable, bool)
    if loss_type == "kto":
        z0 = jax.lax.stop_gradient(at_least_f32(kl))
        good, bad = 1.0 - jax.nn.sigmoid(beta * (log_ratio - z0)), 1.0 - jax.nn.sigmoid(beta * (z0 - log_ratio))
    elif loss_type == "apo_zero_unpaired":
        good, bad = 1.0 - jax.nn.sigmoid(beta * log_ratio), jax.nn.sigmoid(beta * log_ratio)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected 'kto' or 'apo_zero_unpaired'")
    return jnp.where(desirable, desirable_weight * good, undesirable_weight * bad)
