"""Weighted sums of registered pairwise losses (TRL 1.x ``loss_type=[...]`` with ``loss_weights``)."""

from __future__ import annotations

import inspect
from typing import Sequence

from cpo_jax.losses._common import Array
from cpo_jax.losses.pair import PairLogps
from cpo_jax.losses.registry import PairwiseLoss, accept_legacy_arrays, couples_batch, get


def combine(weighted_losses: Sequence[tuple[str, float]]) -> PairwiseLoss:
    """Returns the pairwise loss ``sum_k w_k * loss_k`` ``[B]``, called as ``combined(logps, **hparams)``.

    E.g. MPO (Wang et al. 2024): ``combine([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])``.
    Each keyword hyperparameter of a call goes to every component whose signature has it (so
    ``beta`` is shared, as in TRL); one that no component takes is a TypeError naming it. The sum
    couples the batch (``combined.couples_batch``) when any component does; each honours ``logps.mask``.
    """
    if not weighted_losses:
        raise ValueError("combine needs at least one (loss name, weight) pair")
    components = [(name, get(name), float(weight)) for name, weight in weighted_losses]
    accepted = {name: set(inspect.signature(fn).parameters) for name, fn, _ in components}

    def combined(logps: PairLogps, **kwargs) -> Array:
        unknown = set(kwargs) - set().union(*accepted.values())
        if unknown:
            raise TypeError(f"no loss in {[n for n, _, _ in components]} takes {sorted(unknown)}")
        total = 0.0
        for name, fn, weight in components:
            own = {key: value for key, value in kwargs.items() if key in accepted[name]}
            total = total + weight * fn(logps, **own)
        return total

    combined.__doc__ = " + ".join(f"{w} * {n}" for n, _, w in components)
    wrapped = accept_legacy_arrays(combined)
    wrapped.couples_batch = any(couples_batch(n) for n, _, _ in components)
    return wrapped
