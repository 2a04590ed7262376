"""Metrics that carry their denominators (as Tunix's ``WeightedMetric``), so every reduction is exact and
written once.

A metric over examples is a :class:`Weighted` pair ``(total, count)``: the sum over the counted examples and
how many there were. Micro-batches of one step, batches of an evaluation and the mini-batches of an RL update
are combined by adding both parts (:func:`add`); only :func:`means` divides. Combining means instead would
weight a micro-batch holding 1 real pair like one holding 8 (a short last eval batch, a packed batch with empty
slots). Across hosts nothing more is needed: the steps are global jitted computations, so a ``total`` is
already the sum over every process's examples.

Plain (non-:class:`Weighted`) entries of a metrics dict are step-level values (``grad_norm``,
``learning_rate``) and pass through :func:`means` unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weighted:
    """``total``: sum of a per-example quantity over the counted examples; ``count``: how many (both scalars)."""

    total: Any
    count: Any


def from_mean(mean, count) -> Weighted:
    """A mean over ``count`` examples as a :class:`Weighted` (``total = mean * count``)."""
    return Weighted(mean * count, count)


def from_means(metrics: Mapping[str, Any], count) -> dict[str, Weighted]:
    """Every entry of ``metrics`` (means over the same ``count`` examples) as a :class:`Weighted`."""
    return {key: from_mean(value, count) for key, value in metrics.items()}


def is_weighted(x) -> bool:
    return isinstance(x, Weighted)


def add(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Combine two metric dicts of the same structure: totals and counts add."""
    return jax.tree.map(lambda x, y: x + y, dict(a), dict(b))


def total(trees: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """:func:`add` over a sequence of metric dicts (``{}`` for none)."""
    out: dict[str, Any] = {}
    for tree in trees:
        out = add(out, tree) if out else dict(tree)
    return out


def sum_over(tree: Mapping[str, Any], axis: int = 0) -> dict[str, Any]:
    """Metrics stacked on ``axis`` (the output of a ``lax.scan``) combined along it."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=axis), dict(tree))


def means(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``total / count`` for each :class:`Weighted` (0 where nothing was counted); other entries as they are."""
    return {
        key: (value.total / jnp.maximum(value.count, 1) if is_weighted(value) else value) for key, value in tree.items()
    }
