"""Weighted sums of registered pairwise losses (TRL 1.x ``loss_type=[...]`` with ``loss_weights``)."""

from __future__ import annotations

import inspect
from typing import Sequence

from cpo_jax.losses._common import Array
from cpo_jax.losses.registry import PairwiseLoss, get


def combine(weighted_losses: Sequence[tuple[str, float]]) -> PairwiseLoss:
    """Returns the pairwise loss ``sum_k w_k * loss_k`` ``[B]``.

    E.g. MPO (Wang et al. 2024): ``combine([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])``.
    Each keyword hyperparameter of a call goes to every component whose signature has it (so
    ``beta`` is shared, as in TRL); one that no component takes is a TypeError naming it.
    """
    if not weighted_losses:
        raise ValueError("combine needs at least one (loss name, weight) pair")
    components = [(name, get(name), float(weight)) for name, weight in weighted_losses]
    accepted = {name: set(inspect.signature(fn).parameters) for name, fn, _ in components}

    def combined(
        policy_chosen_logps: Array,
        policy_rejected_logps: Array,
        reference_chosen_logps: Array | None = None,
        reference_rejected_logps: Array | None = None,
        **kwargs,
    ) -> Array:
        unknown = set(kwargs) - set().union(*accepted.values())
        if unknown:
            raise TypeError(f"no loss in {[n for n, _, _ in components]} takes {sorted(unknown)}")
        logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        total = 0.0
        for name, fn, weight in components:
            own = {key: value for key, value in kwargs.items() if key in accepted[name]}
            total = total + weight * fn(*logps, **own)
        return total

    combined.__doc__ = " + ".join(f"{w} * {n}" for n, _, w in components)
    return combined
