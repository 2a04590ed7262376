"""Small helpers shared by the pairwise losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def at_least_f32(x: Array) -> Array:
    """Casts to at least float32: bf16/fp16 inputs are computed in float32, float64 stays float64."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x.astype(jnp.float32)


def require(value: Array | None, name: str, loss: str) -> Array:
    """Returns ``value`` as float32, or raises a ValueError naming the missing input."""
    if value is None:
        raise ValueError(f"loss {loss!r} needs {name}")
    return at_least_f32(value)


def per_token(logps: Array, lengths: Array | None, *, name: str, loss: str) -> Array:
    """Summed log-probs ``[B]`` -> per-token averages, dividing by ``lengths`` (at least 1)."""
    lengths = require(lengths, name, loss)
    return at_least_f32(logps) / jnp.maximum(lengths, 1.0)


def smoothed_sigmoid_loss(logits: Array, label_smoothing: float = 0.0) -> Array:
    """``-(1 - eps) * log sigmoid(x) - eps * log sigmoid(-x)``: conservative DPO's label smoothing."""
    loss = -jax.nn.log_sigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-logits)
    return loss


def log1mexp(x: Array) -> Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012)."""
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
