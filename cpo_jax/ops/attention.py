"""Attention masks and the scaled dot-product attention core shared by all model families.

Layout: queries ``[B, T, N, H]``, keys and values ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query
attention). Masks are boolean ``[B, T, S]``: True where query ``t`` may attend to key ``s``.

Two paths compute the same function:

* ``"xla"``: plain einsums with a float32 softmax. It supports logit soft-capping (Gemma 2) and runs
  everywhere. It is the reference path and the default on the CPU.
* ``"auto"``: :func:`jax.nn.dot_product_attention`, which lets JAX choose cuDNN flash attention on a
  GPU where the inputs allow it. Soft-capping is not expressible there, so a soft-capped call always
  takes the XLA path.

Fully masked query rows (left padding) yield a uniform distribution over keys instead of NaN, so
padding never poisons later layers.

Attention sinks (gpt-oss): one learned logit per query head joins every row's softmax as an extra, value-less
key, ``p = softmax([scores, sink])[:-1]``, so a row may put weight on "nothing". Only the XLA path computes them.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "auto"]


def attention_mask(
    query_slots: jax.Array,
    key_slots: jax.Array,
    key_valid: jax.Array | None = None,
    *,
    query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
    sliding_window: int | jax.Array | None = None,
) -> jax.Array:
    """Causal mask with optional padding, packing segments and a sliding window.

    Args:
      query_slots: ``[B, T]`` or ``[T]`` int, the sequence (cache) slot of each query.
      key_slots: ``[S]`` int, the slot of each key.
      key_valid: ``[B, S]`` bool, False for padding keys.
      query_segments, key_segments: ``[B, T]`` and ``[B, S]`` int segment ids of packed sequences;
        a query only sees keys of its own segment.
      sliding_window: W; a query at slot ``q`` sees keys with ``q - W < s <= q`` (Mistral, Gemma 2).
        ``None`` or a value ``<= 0`` means no window. May be a traced scalar (layer scan).

    Returns:
      ``[B, T, S]`` bool (``[1, T, S]`` when nothing depends on the batch).
    """
    q = query_slots if query_slots.ndim == 2 else query_slots[None]
    q = q[:, :, None]
    s = key_slots[None, None, :]
    mask = s <= q
    if sliding_window is not None:
        window = jnp.asarray(sliding_window)
        in_window = s > q - window
        mask = mask & jnp.where(window > 0, in_window, True)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :].astype(bool)
    if query_segments is not None:
        if key_segments is None:
            key_segments = query_segments
        mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])
    return mask


def _xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: float | None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    big_negative = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask[:, None, None, :, :], scores, big_negative)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    else:
        # head n = kv_head * groups + g, as the reshape of q above
        sink = jnp.broadcast_to(
            sinks.astype(jnp.float32).reshape(1, kv_heads, n // kv_heads, 1, 1), (*scores.shape[:-1], 1)
        )
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1].astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
    implementation: AttentionImpl = "xla",
) -> jax.Array:
    """Masked multi-head attention with grouped-query support.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]`` with ``N % K == 0``.
      mask: ``[B or 1, T, S]`` bool from :func:`attention_mask`.
      scale: multiplier of ``q @ k`` (``H ** -0.5`` for most models).
      softcap: Gemma 2's ``softcap * tanh(scores / softcap)``, applied before masking.
      sinks: ``[N]`` per-head sink logits (gpt-oss), or None; a call with sinks takes the XLA path.
      implementation: ``"xla"`` (einsum reference) or ``"auto"`` (:func:`jax.nn.dot_product_attention`).

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    mask = jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:])
    if implementation == "xla" or softcap is not None or sinks is not None:
        return _xla_attention(q, k, v, mask, scale, softcap, sinks)
    if implementation == "auto":
        # Rows with no visible key: give them one (their output is discarded) to avoid NaN.
        empty = ~jnp.any(mask, axis=-1, keepdims=True)
        mask = mask | (empty & (jnp.arange(mask.shape[-1]) == 0))
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    raise ValueError(f"unknown attention implementation {implementation!r}; expected 'xla' or 'auto'")
