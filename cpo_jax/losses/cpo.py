"""Constrained Preference Optimization (CPO): the method of "Conditional Equivalence of DPO and
RLHF" (Yang et al., ICML 2026, arXiv 2605.20834), in the three variants of its released code.

Not to be confused with TRL's ``CPOTrainer`` (Contrastive Preference Optimization, Xu et al.
2024), which this package registers as ``contrastive``.

DPO is soft-margin ranking towards the target margin ``delta_ref``:
``(1/beta) * L_DPO -> max(0, delta_ref - delta_theta)`` as beta grows. When the reference
prefers the rejected answer (``delta_ref < 0``), DPO's loss can fall while the policy still
prefers it: the region ``U = {delta_ref < delta_theta < 0}``. CPO replaces the target ``delta_ref``
by a target ``t`` and minimises ``-log sigmoid(beta * (delta_theta - t))``:

* ``cpo`` (smooth): ``t = delta_ref + softplus(tau * (gamma - delta_ref)) / (tau * alpha)``.
  With alpha = 1, ``t >= max(delta_ref, gamma)``, and ``t -> max(delta_ref, gamma)`` as tau grows:
  the hinge limit enforces ``delta_theta >= gamma > 0``.
* ``cpo_clip``: ``t = max(delta_ref, 0)``.
* ``cpo_easy``: ``t = delta_ref + (gamma / beta) * (1 / ref_chosen_avg + 1 / ref_rejected_avg)``,
  with the reference's per-token average log-probs. These are negative, so this *lowers* the
  target; it does not enforce ``delta_theta > 0``. Implemented as released.

Inputs: a :class:`~cpo_jax.losses.pair.PairLogps`; every CPO loss is per pair (ignores the mask).

Units: as in the released code, every delta is computed from **length-normalised** (per-token
average) log-probs by default (``length_normalize=True``, which needs the lengths). Inputs are
always *summed* log-probs; the loss divides by the lengths itself. The target ``t`` is a
constant of the reference: no gradient flows through it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpo_jax.losses._common import Array
from cpo_jax.losses.pair import PairLogps
from cpo_jax.losses.registry import register

# |average log-prob| below this is treated as this, so cpo_easy's 1/avg stays finite.
EASY_MIN_ABS_AVG_LOGP = 1e-6


def preference_deltas(logps: PairLogps, *, length_normalize: bool, loss: str) -> tuple[Array, Array]:
    """``(delta_theta, delta_ref)`` ``[B]`` from summed log-probs, optionally length-normalised."""
    (pc, pr), (rc, rr) = logps.policy(), logps.reference(loss)
    if length_normalize:
        hint = " (or length_normalize=False)"
        (pc, pr), (rc, rr) = logps.per_token(pc, pr, loss, hint), logps.per_token(rc, rr, loss, hint)
    return pc - pr, rc - rr


def smooth_target(delta_ref: Array, *, gamma: float = 0.5, tau: float = 2.0, alpha: float = 1.0) -> Array:
    """``t = delta_ref + softplus(tau * (gamma - delta_ref)) / (tau * alpha)`` ``[B]``."""
    return delta_ref + jax.nn.softplus(tau * (gamma - delta_ref)) / (tau * alpha)


def clip_target(delta_ref: Array) -> Array:
    """``t = max(delta_ref, 0)`` ``[B]``."""
    return jnp.maximum(delta_ref, 0.0)


def easy_target(
    delta_ref: Array, reference_chosen_avg: Array, reference_rejected_avg: Array, *, beta: float, gamma: float
) -> Array:
    """``t = delta_ref + (gamma / beta) * (1 / ref_chosen_avg + 1 / ref_rejected_avg)`` ``[B]``.

    The averages are per-token log-probs (< 0); magnitudes below 1e-6 are clamped to -1e-6.
    """
    chosen = jnp.minimum(reference_chosen_avg, -EASY_MIN_ABS_AVG_LOGP)
    rejected = jnp.minimum(reference_rejected_avg, -EASY_MIN_ABS_AVG_LOGP)
    return delta_ref + (gamma / beta) * (1.0 / chosen + 1.0 / rejected)


def _target_margin_loss(delta_theta: Array, target: Array, beta: float) -> Array:
    """``-log sigmoid(beta * (delta_theta - stop_gradient(t)))``."""
    return -jax.nn.log_sigmoid(beta * (delta_theta - jax.lax.stop_gradient(target)))


@register("cpo")
def cpo_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    tau: float = 2.0,
    alpha: float = 1.0,
    length_normalize: bool = True,
) -> Array:
    """CPO, smooth variant (Yang et al. 2026, released code's smooth target) ``[B]``.

    ``L = -log sigmoid(beta * (delta_theta - t))``,
    ``t = delta_ref + softplus(tau * (gamma - delta_ref)) / (tau * alpha)``.
    Deltas from per-token average log-probs unless ``length_normalize=False``.
    """
    delta_theta, delta_ref = preference_deltas(logps, length_normalize=length_normalize, loss="cpo")
    return _target_margin_loss(delta_theta, smooth_target(delta_ref, gamma=gamma, tau=tau, alpha=alpha), beta)


@register("cpo_clip")
def cpo_clip_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    length_normalize: bool = True,
) -> Array:
    """CPO, clip variant (released code's default; same loss as HyPO, arXiv 2602.11902) ``[B]``.

    ``L = -log sigmoid(beta * (delta_theta - max(delta_ref, 0)))``.
    Deltas from per-token average log-probs unless ``length_normalize=False``.
    """
    delta_theta, delta_ref = preference_deltas(logps, length_normalize=length_normalize, loss="cpo_clip")
    return _target_margin_loss(delta_theta, clip_target(delta_ref), beta)


@register("cpo_easy")
def cpo_easy_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    length_normalize: bool = True,
) -> Array:
    """CPO, easy variant (released code; its demo config uses beta 2.5, gamma 0.05) ``[B]``.

    ``L = -log sigmoid(beta * (delta_theta - t))``,
    ``t = delta_ref + (gamma / beta) * (1 / ref_chosen_avg + 1 / ref_rejected_avg)``.
    The correction always uses per-token averages, so the lengths are required; the deltas are
    length-normalised unless ``length_normalize=False``. It lowers the target (averages are
    negative) and does not enforce ``delta_theta > 0``.
    """
    delta_theta, delta_ref = preference_deltas(logps, length_normalize=length_normalize, loss="cpo_easy")
    ref_chosen_avg, ref_rejected_avg = logps.per_token(*logps.reference("cpo_easy"), "cpo_easy")
    target = easy_target(delta_ref, ref_chosen_avg, ref_rejected_avg, beta=beta, gamma=gamma)
    return _target_margin_loss(delta_theta, target, beta)
