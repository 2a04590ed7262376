"""Per-token and per-sequence log-probabilities of target tokens.

Two paths compute the same numbers:

* from logits ``[B, T, V]`` (:func:`token_logps`), the plain ``log_softmax`` path;
* from final hidden states ``[B, T, D]`` and the unembedding matrix ``[D, V]``
  (:func:`chunked_token_logps`), which never materialises the full ``[B, T, V]``
  float32 logits; the peak extra memory is about ``chunk_size * V`` float32 values.

The forward walks over chunks of ``chunk_size`` tokens and keeps only the per-token log-prob
and logsumexp. The backward (a custom VJP) walks over blocks of the *vocabulary*, sized so
that ``[N, block]`` holds about ``chunk_size * V`` floats: each block recomputes its logits for
all N tokens, writes its slice of the unembedding gradient in place (so there is no
``[D, V]`` float32 accumulator or per-chunk ``[D, V]`` temporary), and adds its share into a
float32 ``[N, D]`` hidden-state gradient.

Cost for N = B*T tokens: forward 2*N*D*V FLOPs (one matmul); backward 6*N*D*V FLOPs
(logit recompute + the two gradient matmuls): one matmul more than the naive path, which
keeps the logits, in exchange for O(chunk_size * V) instead of O(N * V) activation memory.

Alignment convention: ``targets[b, t]`` is the token whose probability is read from
position ``t``. Use :func:`next_token_targets` to build ``(targets, mask)`` from
``input_ids`` and a completion mask for causal LMs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_CHUNK_SIZE = 1024


class SequenceLogps(NamedTuple):
    """Masked reductions of per-token log-probs, all float32 ``[B]``."""

    sum: Array  # summed log-prob of the masked tokens
    mean: Array  # per-token average (0 where the mask is empty)
    count: Array  # number of masked tokens


def next_token_targets(input_ids: Array, loss_mask: Array, pad_id: int = 0) -> tuple[Array, Array]:
    """Shifts ``input_ids``/``loss_mask`` ``[B, T]`` left by one for next-token scoring.

    Returns ``(targets, mask)``, both ``[B, T]``: position ``t`` scores token ``t + 1``.
    The last position gets ``pad_id`` and mask 0, so shapes stay static.
    """
    pad = jnp.full_like(input_ids[:, :1], pad_id)
    targets = jnp.concatenate([input_ids[:, 1:], pad], axis=1)
    mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, mask


def _transform_logits(logits: Array, temperature: float, logit_softcap: float | None) -> Array:
    """float32 logits -> soft-capped (Gemma 2 style) and temperature-scaled logits."""
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _gather_targets(values: Array, targets: Array) -> Array:
    """values ``[..., V]``, targets ``[...]`` (clipped into range) -> ``[...]``."""
    safe = jnp.clip(targets, 0, values.shape[-1] - 1)
    return jnp.take_along_axis(values, safe[..., None], axis=-1)[..., 0]


def token_logps(
    logits: Array,
    targets: Array,
    *,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
) -> Array:
    """log p(targets) from logits ``[B, T, V]`` and targets ``[B, T]`` -> float32 ``[B, T]``.

    The plain path: the log-softmax is taken over the full vocabulary in float32.
    Targets outside ``[0, V)`` (e.g. ``-100`` padding) are clipped; mask them out.
    """
    logits = _transform_logits(logits.astype(jnp.float32), temperature, logit_softcap)
    return _gather_targets(logits, targets) - jax.nn.logsumexp(logits, axis=-1)


def reduce_sequence(token_logps_: Array, mask: Array) -> SequenceLogps:
    """Masked sum, mean and count over the last axis of ``[B, T]`` token log-probs."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(token_logps_.astype(jnp.float32) * mask, axis=-1)
    count = jnp.sum(mask, axis=-1)
    return SequenceLogps(sum=total, mean=total / jnp.maximum(count, 1.0), count=count)


def sequence_logps(
    logits: Array,
    targets: Array,
    mask: Array,
    *,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
) -> SequenceLogps:
    """Summed and mean log-probs of ``targets`` ``[B, T]`` under ``mask`` from logits ``[B, T, V]``."""
    per_token = token_logps(logits, targets, temperature=temperature, logit_softcap=logit_softcap)
    return reduce_sequence(per_token, mask)


def _to_chunks(x: Array, chunk_size: int) -> Array:
    """``[N, ...]`` -> ``[N_pad / chunk_size, chunk_size, ...]``, zero-padded."""
    pad = (-x.shape[0]) % chunk_size
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((-1, chunk_size) + x.shape[1:])


def _chunk_logits(h: Array, unembedding: Array, temperature: float, logit_softcap: float | None) -> Array:
    """h ``[C, D]`` @ unembedding ``[D, V]`` with float32 accumulation -> transformed float32 ``[C, V]``."""
    logits = jnp.dot(h, unembedding, preferred_element_type=jnp.float32)
    return _transform_logits(logits, temperature, logit_softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flat_chunked_logps(h, unembedding, targets, chunk_size, temperature, logit_softcap):
    logps, _ = _flat_chunked_fwd(h, unembedding, targets, chunk_size, temperature, logit_softcap)
    return logps


def _flat_chunked_fwd(h, unembedding, targets, chunk_size, temperature, logit_softcap):
    n = h.shape[0]

    def body(_, xs):
        h_c, y_c = xs
        logits = _chunk_logits(h_c, unembedding, temperature, logit_softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return None, (_gather_targets(logits, y_c) - lse, lse)

    _, (logps, lse) = jax.lax.scan(body, None, (_to_chunks(h, chunk_size), _to_chunks(targets, chunk_size)))
    logps, lse = logps.reshape(-1)[:n], lse.reshape(-1)[:n]
    return logps, (h, unembedding, targets, lse)


def _vocab_block(n_tokens: int, vocab: int, chunk_size: int) -> int:
    """Columns per backward block, so that ``[n_tokens, block]`` holds about ``chunk_size * vocab`` floats,
    like the forward's ``[chunk_size, vocab]`` chunk (a multiple of 128, at least 128, at most V)."""
    block = (chunk_size * vocab) // max(n_tokens, 1)
    return int(min(vocab, max(128, block // 128 * 128)))


def _flat_chunked_bwd(chunk_size, temperature, logit_softcap, residuals, g):
    """Backward pass over *vocabulary* blocks (see :func:`_vocab_block` for their width).

    For block ``v``: ``Z_v = H @ W[:, v]`` (recomputed for all N tokens), ``dZ_v = g * (onehot_v - softmax_v)``
    with the saved logsumexp, then ``dW[:, v] = H^T dZ_v`` is final (written in place, no ``[D, V]``
    accumulator) and ``dH += dZ_v @ W[:, v]^T`` accumulates in a float32 ``[N, D]`` buffer. The last
    block is shifted left to end at V; its columns already seen are masked out of ``dH``.
    """
    h, unembedding, targets, lse = residuals
    n, dim = h.shape
    vocab = unembedding.shape[1]
    block = _vocab_block(n, vocab, chunk_size)
    n_blocks = -(-vocab // block)
    g = g.astype(jnp.float32)
    safe_targets = jnp.clip(targets, 0, vocab - 1)
    contract_last = (((1,), (1,)), ((), ()))  # [N, Vb] x [D, Vb] -> [N, D], no transpose copy of W

    def body(carry, i):
        d_h, d_unembedding = carry
        start = jnp.minimum(i * block, vocab - block)
        w_v = jax.lax.dynamic_slice_in_dim(unembedding, start, block, axis=1)
        raw = jnp.dot(h, w_v, preferred_element_type=jnp.float32)
        logits, transform_vjp = jax.vjp(lambda z: _transform_logits(z, temperature, logit_softcap), raw)
        columns = start + jnp.arange(block)
        onehot = (columns[None, :] == safe_targets[:, None]).astype(jnp.float32)
        (d_raw,) = transform_vjp(g[:, None] * (onehot - jnp.exp(logits - lse[:, None])))
        d_w_v = jnp.dot(h.T, d_raw.astype(h.dtype), preferred_element_type=jnp.float32)
        d_unembedding = jax.lax.dynamic_update_slice_in_dim(
            d_unembedding, d_w_v.astype(unembedding.dtype), start, axis=1
        )
        fresh = jnp.where(columns >= i * block, d_raw, 0.0).astype(unembedding.dtype)
        d_h = d_h + jax.lax.dot_general(fresh, w_v, contract_last, preferred_element_type=jnp.float32)
        return (d_h, d_unembedding), None

    init = (jnp.zeros((n, dim), jnp.float32), jnp.zeros_like(unembedding))
    (d_h, d_unembedding), _ = jax.lax.scan(body, init, jnp.arange(n_blocks))
    return d_h.astype(h.dtype), d_unembedding, None


_flat_chunked_logps.defvjp(_flat_chunked_fwd, _flat_chunked_bwd)


def chunked_token_logps(
    hidden: Array,
    unembedding: Array,
    targets: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
) -> Array:
    """log p(targets) from final hidden states without materialising ``[B, T, V]`` logits.

    Args:
      hidden: ``[B, T, D]`` final (post-norm) hidden states, any float dtype.
      unembedding: ``[D, V]`` output projection (pass ``embedding.T`` for tied weights).
      targets: ``[B, T]`` int token ids; out-of-range ids are clipped (mask them out).
      chunk_size: tokens per forward chunk; both passes hold a few ``chunk_size * V`` float32 buffers.
      temperature: logits are divided by it before the softmax.
      logit_softcap: if set, logits become ``cap * tanh(logits / cap)`` first (Gemma 2).

    Returns:
      float32 ``[B, T]`` log-probs, equal to :func:`token_logps` on ``hidden @ unembedding``
      up to float32 rounding. Gradients flow to ``hidden`` and ``unembedding``; matmuls
      accumulate in float32, and the hidden-state gradient is summed in float32.
    """
    batch, length, dim = hidden.shape
    if unembedding.shape[0] != dim:
        raise ValueError(f"unembedding must be [D, V] with D={dim}; got shape {unembedding.shape}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if batch * length <= chunk_size:
        # One chunk holds everything: chunking saves no memory, and plain autodiff skips the
        # backward's recomputation of the logits (one [N, D] x [D, V] matmul fewer).
        logits = jnp.dot(hidden, unembedding, preferred_element_type=jnp.float32)
        return token_logps(logits, targets, temperature=temperature, logit_softcap=logit_softcap)
    flat = _flat_chunked_logps(
        hidden.reshape(batch * length, dim),
        unembedding,
        targets.reshape(batch * length),
        chunk_size,
        float(temperature),
        None if logit_softcap is None else float(logit_softcap),
    )
    return flat.reshape(batch, length)


def sequence_logps_from_hidden(
    hidden: Array,
    unembedding: Array,
    targets: Array,
    mask: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
) -> SequenceLogps:
    """Summed and mean log-probs of ``targets`` under ``mask`` from hidden ``[B, T, D]``, chunked."""
    per_token = chunked_token_logps(
        hidden,
        unembedding,
        targets,
        chunk_size=chunk_size,
        temperature=temperature,
        logit_softcap=logit_softcap,
    )
    return reduce_sequence(per_token, mask)


def chunked_token_entropy(
    hidden: Array,
    unembedding: Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
) -> Array:
    """Entropy of the next-token distribution at every position, ``[B, T, D]`` -> float32 ``[B, T]``.

    Works through ``chunk_size`` tokens at a time (a ``[chunk_size, V]`` float32 buffer), so no ``[B, T, V]``
    logits are formed. A metric: gradients are stopped.
    """
    batch, length, dim = hidden.shape
    cap = None if logit_softcap is None else float(logit_softcap)

    def chunk_entropy(h):
        logp = jax.nn.log_softmax(_chunk_logits(h, unembedding, float(temperature), cap), axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    flat = jax.lax.stop_gradient(hidden.reshape(batch * length, dim))
    chunks = _to_chunks(flat, max(1, min(chunk_size, batch * length)))
    entropy = jax.lax.map(chunk_entropy, chunks).reshape(-1)[: batch * length]
    return entropy.reshape(batch, length)
