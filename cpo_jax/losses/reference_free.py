"""Losses without a reference model: ``sft``, ``simpo``, ``orpo`` and ``contrastive``.

They take a :class:`~cpo_jax.losses.pair.PairLogps` and ignore its reference log-probs.
``contrastive`` is Contrastive Preference Optimization (Xu et al. 2024), which TRL ships as
``CPOTrainer``; this package's ``cpo`` is a different method (see :mod:`cpo_jax.losses.cpo`).

The NLL term of ``sft``, ``orpo`` and ``contrastive`` comes, by default, from the summed chosen
completion log-probs and lengths. With ``nll_normalization="batch_tokens"`` (TRL's) the per-pair
values are scaled so that their mean over the pairs with a non-empty completion equals the
token-mean NLL over the batch, ``sum(-logp_w) / sum(n_w)``, both over the real pairs only
(``logps.mask``): these three losses couple the batch. ``"sequence"`` gives each pair its own
per-token NLL. Pass ``chosen_nll`` ``[B]`` to supply another NLL (ORPO's paper includes the prompt).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from cpo_jax.losses._common import Array, at_least_f32, log1mexp, per_token, require, smoothed_sigmoid_loss
from cpo_jax.losses.pair import PairLogps, masked_sum
from cpo_jax.losses.registry import register

NllNormalization = Literal["batch_tokens", "sequence"]


def chosen_nll(logps: PairLogps, *, normalization: NllNormalization = "batch_tokens", loss: str = "sft") -> Array:
    """Per-pair NLL ``[B]`` of the chosen completions from summed log-probs (see module docstring).

    ``"batch_tokens"``: ``-log pi(y_w) * P / N`` with ``N = sum n_w`` and ``P`` the number of pairs with
    ``n_w > 0``, both over the real pairs only (``logps.mask``), so empty slots change nothing.
    """
    lengths = require(logps.chosen_lengths, "chosen_lengths", loss)
    if normalization == "sequence":
        return -per_token(logps.chosen, lengths, name="chosen_lengths", loss=loss)
    if normalization == "batch_tokens":
        real = logps.real()
        pairs = jnp.sum(real & (lengths > 0))
        return -at_least_f32(logps.chosen) * pairs / jnp.maximum(masked_sum(lengths, real), 1.0)
    raise ValueError(f"unknown nll_normalization {normalization!r}; expected 'batch_tokens' or 'sequence'")


def _nll(logps: PairLogps, override, normalization, loss) -> Array:
    if override is not None:
        return at_least_f32(override)
    return chosen_nll(logps, normalization=normalization, loss=loss)


@register("sft", couples_batch=True)
def sft_loss(
    logps: PairLogps,
    *,
    chosen_nll: Array | None = None,
    nll_normalization: NllNormalization = "batch_tokens",
) -> Array:
    """Negative log-likelihood of the chosen completion (TRL ``sft`` loss_type, e.g. in MPO/RPO).

    ``-log pi(y_w) / n_w`` in TRL's batch token-mean normalisation by default. Couples the batch under
    ``nll_normalization="batch_tokens"``: the token total is over the real pairs (``logps.mask``) only.
    """
    return _nll(logps, chosen_nll, nll_normalization, "sft")


@register("simpo")
def simpo_loss(
    logps: PairLogps,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> Array:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6): ``-log sigma(beta (avg_w - avg_l) - gamma)``.

    ``avg`` are per-token average log-probs (the lengths are required). TRL's
    ``CPOTrainer(loss_type="simpo")`` is the same with ``simpo_gamma = gamma``. Defaults are the
    paper's Mistral-Base setting (beta 2.0, gamma/beta 0.5); TRL's are beta 0.1, gamma 0.5.
    """
    chosen, rejected = logps.per_token(logps.chosen, logps.rejected, "simpo")
    return smoothed_sigmoid_loss(beta * (chosen - rejected) - gamma, label_smoothing)


@register("orpo", couples_batch=True)
def orpo_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    chosen_nll: Array | None = None,
    nll_normalization: NllNormalization = "batch_tokens",
) -> Array:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 6-7; TRL ``ORPOTrainer``).

    ``NLL_w - beta * log sigma(log odds(y_w) - log odds(y_l))`` with
    ``log odds(y) = avg - log(1 - exp(avg))`` on per-token average log-probs; ``beta`` is the
    paper's lambda. TRL's NLL also covers the prompt tokens: pass ``chosen_nll`` for that. Couples the
    batch through the NLL under ``nll_normalization="batch_tokens"`` (real pairs only, see :func:`chosen_nll`).
    """
    chosen, rejected = logps.per_token(logps.chosen, logps.rejected, "orpo")
    # avg < 0 strictly for log1mexp; a zero average (probability 1) is clipped just below.
    chosen, rejected = jnp.minimum(chosen, -1e-7), jnp.minimum(rejected, -1e-7)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    nll = _nll(logps, chosen_nll, nll_normalization, "orpo")
    return nll - beta * jax.nn.log_sigmoid(log_odds)


@register("contrastive", couples_batch=True)
def contrastive_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    nll_coef: float = 1.0,
    chosen_nll: Array | None = None,
    nll_normalization: NllNormalization = "batch_tokens",
) -> Array:
    """Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417, eq. 3; TRL
    ``CPOTrainer`` with ``loss_type="sigmoid"``; ``nll_coef`` is TRL's ``cpo_alpha``).

    ``-(1-eps) log sigma(beta (logp_w - logp_l)) - eps log sigma(-beta (...)) + nll_coef * NLL_w``
    on summed log-probs. Not this package's ``cpo`` (Constrained Preference Optimization). Couples the
    batch through the NLL under ``nll_normalization="batch_tokens"`` (real pairs only, see :func:`chosen_nll`).
    """
    policy_chosen, policy_rejected = logps.policy()
    margin = policy_chosen - policy_rejected
    loss = smoothed_sigmoid_loss(beta * margin, label_smoothing)
    if nll_coef:
        loss = loss + nll_coef * _nll(logps, chosen_nll, nll_normalization, "contrastive")
    return loss
