"""Name -> pairwise loss function registry: ``cpo_jax.losses.get("sigmoid")``.

Every registered loss has the pairwise signature::

    loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
         reference_rejected_logps=None, *, chosen_lengths=None, rejected_lengths=None,
         **hyperparameters) -> [B] per-pair losses

with ``[B]`` *summed* completion log-probs and integer/float token counts. Losses that do not
use the reference or the lengths accept and ignore them.
"""

from __future__ import annotations

import inspect
from typing import Callable, Protocol

import jax

Array = jax.Array


class PairwiseLoss(Protocol):
    """The common signature of every registered pairwise loss."""

    def __call__(
        self,
        policy_chosen_logps: Array,
        policy_rejected_logps: Array,
        reference_chosen_logps: Array | None = None,
        reference_rejected_logps: Array | None = None,
        *,
        chosen_lengths: Array | None = None,
        rejected_lengths: Array | None = None,
        **hyperparameters,
    ) -> Array: ...


_REGISTRY: dict[str, PairwiseLoss] = {}
_NOT_OURS = {
    "contrastive_cpo": "TRL's CPOTrainer loss (Xu et al. 2024) is registered here as 'contrastive'",
    "kto": "KTO takes unpaired data; call cpo_jax.losses.kto_loss directly",
}


def register(name: str) -> Callable[[PairwiseLoss], PairwiseLoss]:
    """Decorator that registers a pairwise loss under ``name``."""

    def wrap(fn: PairwiseLoss) -> PairwiseLoss:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def get(name: str) -> PairwiseLoss:
    """Returns the pairwise loss registered as ``name``; unknown names list what exists."""
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = f" ({_NOT_OURS[name]})" if name in _NOT_OURS else ""
        raise KeyError(f"unknown loss {name!r}{hint}; available: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    """Sorted names of all registered pairwise losses."""
    return sorted(_REGISTRY)


def hyperparameters(name: str) -> dict[str, object]:
    """The keyword hyperparameters of loss ``name`` and their defaults (for config validation)."""
    skip = {"chosen_lengths", "rejected_lengths"}
    params = inspect.signature(get(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip}
