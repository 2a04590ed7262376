"""Name -> pairwise loss function registry: ``cpo_jax.losses.get("sigmoid")``.

Every registered loss has the pairwise signature::

    loss(logps: PairLogps, **hyperparameters) -> [B] per-pair losses

where :class:`~cpo_jax.losses.pair.PairLogps` holds ``[B]`` *summed* completion log-probs
(``chosen``, ``rejected``, optional ``ref_chosen``/``ref_rejected``), optional token counts
(``chosen_lengths``/``rejected_lengths``) and ``mask`` (True for real pairs). Losses that do not use
the reference or the lengths ignore them. Entries at masked (empty) slots are unspecified: callers
mask them. A loss registered with ``couples_batch=True`` computes something across pairs (a token
total, a sort); it uses only the real pairs, so padding never changes a real pair's loss.

Names: ``dpo`` is an alias of ``sigmoid`` (:data:`ALIASES`). A weighted sum of registered losses (TRL's
``loss_type=[...]`` with ``loss_weights``) is named by its terms, ``"0.8*sigmoid+0.2*bco_pair+1.0*sft"``
(:func:`combined_name`); :func:`get` builds it with :func:`cpo_jax.losses.combine`.

The legacy positional form ``loss(pc, pr, rc, rr, *, chosen_lengths=, rejected_lengths=, mask=, **hp)``
is still accepted: :func:`register` turns it into a ``PairLogps`` before calling the one implementation.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Protocol

import jax

from cpo_jax.losses.pair import PairLogps, from_arrays

Array = jax.Array


class PairwiseLoss(Protocol):
    """The common signature of every registered pairwise loss: ``[B]`` per-pair losses."""

    def __call__(self, logps: PairLogps, **hyperparameters) -> Array: ...


_REGISTRY: dict[str, PairwiseLoss] = {}
_COUPLES_BATCH: set[str] = set()
_NOT_OURS = {
    "contrastive_cpo": "TRL's CPOTrainer loss (Xu et al. 2024) is registered here as 'contrastive'",
    "kto": "KTO takes unpaired data; call cpo_jax.losses.kto_loss directly",
}
_LEGACY_KEYWORDS = ("chosen_lengths", "rejected_lengths", "mask")
#: Other names of registered losses: the names TRL users type.
ALIASES = {"dpo": "sigmoid"}
_COMBINED: dict[str, PairwiseLoss] = {}


def accept_legacy_arrays(fn: Callable[..., Array]) -> PairwiseLoss:
    """Wraps ``fn(logps: PairLogps, **hp)`` so that it also takes ``(pc, pr, rc=None, rr=None, *,
    chosen_lengths=None, rejected_lengths=None, mask=None, **hp)``; the signature shown is ``fn``'s."""

    @functools.wraps(fn)
    def loss(logps, *arrays, **hyperparameters) -> Array:
        legacy = {key: hyperparameters.pop(key) for key in _LEGACY_KEYWORDS if key in hyperparameters}
        if isinstance(logps, PairLogps):
            if arrays or legacy:
                raise TypeError(
                    f"{fn.__name__}: pass everything inside the PairLogps, not also "
                    f"{len(arrays)} arrays / {sorted(legacy)}"
                )
            return fn(logps, **hyperparameters)
        return fn(from_arrays(logps, *arrays, **legacy), **hyperparameters)

    return loss


def register(name: str, *, couples_batch: bool = False) -> Callable[[Callable[..., Array]], PairwiseLoss]:
    """Decorator that registers a pairwise loss under ``name``.

    ``couples_batch``: the loss computes something across the pairs of the batch (a token total, a sort),
    so its per-pair values depend on the other pairs; it must honour ``logps.mask``.
    """

    def wrap(fn: Callable[..., Array]) -> PairwiseLoss:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = wrapped = accept_legacy_arrays(fn)
        if couples_batch:
            _COUPLES_BATCH.add(name)
        return wrapped

    return wrap


def canonical(name: str) -> str:
    """``name`` with an alias replaced by the loss it names (``dpo`` -> ``sigmoid``); other names unchanged."""
    return ALIASES.get(name, name)


def combined_name(weighted_losses) -> str:
    """The registry name of ``sum_k w_k * loss_k`` for ``[(name, weight), ...]``: ``"0.8*sigmoid+1.0*sft"``.
    Aliases are replaced; one loss with weight 1 is just its name."""
    terms = [(canonical(name), float(weight)) for name, weight in weighted_losses]
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    return "+".join(f"{weight!r}*{name}" for name, weight in terms)


def components(name: str) -> list[tuple[str, float]]:
    """``[(registered name, weight), ...]`` of loss ``name``: one term for a plain name or alias, several for a
    weighted sum (:func:`combined_name`). Raises ``KeyError`` for a name that is neither."""
    if "+" not in name and "*" not in name:
        get(name)
        return [(canonical(name), 1.0)]
    terms = []
    for term in name.split("+"):
        weight, _, loss = term.strip().rpartition("*")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise KeyError(f"loss {name!r}: {weight!r} in {term!r} is not a weight") from None
        get(loss.strip())
        terms.append((canonical(loss.strip()), value))
    return terms


def get(name: str) -> PairwiseLoss:
    """Returns the pairwise loss registered as ``name`` (or an alias of it, or a weighted sum named as
    :func:`combined_name` writes it); unknown names list what exists."""
    try:
        return _REGISTRY[canonical(name)]
    except KeyError:
        pass
    if "+" in name or "*" in name:
        if name not in _COMBINED:
            from cpo_jax.losses.combine import combine

            _COMBINED[name] = combine(components(name))
        return _COMBINED[name]
    hint = f" ({_NOT_OURS[name]})" if name in _NOT_OURS else ""
    raise KeyError(
        f"unknown loss {name!r}{hint}; available: {', '.join(sorted(_REGISTRY))} (and the aliases "
        f"{', '.join(f'{a}={n}' for a, n in sorted(ALIASES.items()))})"
    )


def names() -> list[str]:
    """Sorted names of all registered pairwise losses."""
    return sorted(_REGISTRY)


def couples_batch(name: str) -> bool:
    """Whether loss ``name`` couples the pairs of a batch (and so depends on ``PairLogps.mask``)."""
    return any(part in _COUPLES_BATCH for part, _ in components(name))


def hyperparameters(name: str) -> dict[str, object]:
    """The keyword hyperparameters of loss ``name`` and their defaults (for config validation); for a weighted
    sum, those of every component (a shared one, such as ``beta``, with the first component's default)."""
    out: dict[str, object] = {}
    for part, _ in components(name):
        for p in inspect.signature(_REGISTRY[part]).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                out.setdefault(p.name, p.default)
    return out
