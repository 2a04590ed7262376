"""Sequence log-probs: float64 NumPy reference, chunked vs naive agreement, and memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import ops
from tests import reference_np as ref


def problem(seed, batch=2, length=13, dim=24, vocab=97, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (batch, length, dim), dtype)
    unembedding = (jax.random.normal(keys[1], (dim, vocab)) / np.sqrt(dim)).astype(dtype)
    targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
    mask = (jax.random.uniform(keys[3], (batch, length)) > 0.3).astype(jnp.float32)
    return hidden, unembedding, targets, mask


def test_token_logps_match_float64_log_softmax():
    hidden, unembedding, targets, mask = problem(0)
    logits = hidden @ unembedding
    got = np.asarray(ops.token_logps(logits, targets))
    want = np.take_along_axis(ref.log_softmax(np.asarray(logits)), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    seq = ops.sequence_logps(logits, targets, mask)
    np.testing.assert_allclose(np.asarray(seq.sum), (want * np.asarray(mask)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(seq.mean), (want * np.asarray(mask)).sum(-1) / np.asarray(mask).sum(-1), rtol=1e-5
    )


def test_empty_mask_gives_zero_mean_not_nan():
    seq = ops.reduce_sequence(jnp.ones((2, 3)), jnp.zeros((2, 3)))
    assert np.all(np.asarray(seq.mean) == 0) and np.all(np.asarray(seq.count) == 0)


@pytest.mark.parametrize("chunk_size", [1, 5, 26, 1000])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (3.0, 0.7)])
@pytest.mark.parametrize("vocab", [97, 300])
def test_chunked_matches_naive_values_and_gradients(chunk_size, softcap, temperature, vocab):
    """Values and gradients agree to 1e-5 relative in float32, for chunks that do and don't divide
    B*T; V=300 makes the backward walk three 128-column vocabulary blocks, the last one shifted."""
    hidden, unembedding, targets, mask = problem(1, vocab=vocab)
    weights = jnp.linspace(0.5, 1.5, hidden.shape[0])

    def naive(h, w):
        seq = ops.sequence_logps(
            jnp.einsum("btd,dv->btv", h, w), targets, mask, temperature=temperature, logit_softcap=softcap
        )
        return jnp.sum(weights * seq.sum)

    def chunked(h, w):
        seq = ops.sequence_logps_from_hidden(
            h, w, targets, mask, chunk_size=chunk_size, temperature=temperature, logit_softcap=softcap
        )
        return jnp.sum(weights * seq.sum)

    v1, (gh1, gw1) = jax.value_and_grad(naive, argnums=(0, 1))(hidden, unembedding)
    v2, (gh2, gw2) = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, unembedding)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
    for got, want in ((gh2, gh1), (gw2, gw1)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * scale)


def test_chunked_per_token_values_match_naive():
    hidden, unembedding, targets, _ = problem(2)
    naive = ops.token_logps(jnp.einsum("btd,dv->btv", hidden, unembedding), targets)
    chunked = ops.chunked_token_logps(hidden, unembedding, targets, chunk_size=7)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(naive), rtol=1e-5, atol=1e-5)


def test_chunked_bf16_inputs_accumulate_in_float32():
    """bf16 hidden/unembedding: the chunked path equals the naive path on the same bf16 values,
    and its gradients keep the input dtypes."""
    hidden, unembedding, targets, mask = problem(3, dtype=jnp.bfloat16)
    naive = ops.sequence_logps(
        jnp.einsum("btd,dv->btv", hidden, unembedding, preferred_element_type=jnp.float32), targets, mask
    )
    chunked = ops.sequence_logps_from_hidden(hidden, unembedding, targets, mask, chunk_size=8)
    assert chunked.sum.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(chunked.sum), np.asarray(naive.sum), rtol=1e-5)
    gh, gw = jax.grad(
        lambda h, w: ops.sequence_logps_from_hidden(h, w, targets, mask, chunk_size=8).sum.sum(), argnums=(0, 1)
    )(hidden, unembedding)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16


def test_chunked_rejects_mismatched_unembedding():
    hidden, unembedding, targets, _ = problem(4)
    with pytest.raises(ValueError, match=r"\[D, V\]"):
        ops.chunked_token_logps(hidden, unembedding.T, targets)


def test_next_token_targets_shift():
    ids = jnp.array([[5, 6, 7, 8]])
    loss_mask = jnp.array([[0, 0, 1, 1]])
    targets, mask = ops.next_token_targets(ids, loss_mask, pad_id=0)
    np.testing.assert_array_equal(np.asarray(targets), [[6, 7, 8, 0]])
    np.testing.assert_array_equal(np.asarray(mask), [[0, 1, 1, 0]])


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_path_never_materialises_full_logits():
    """Compiled temporary memory of value-and-grad: chunked stays far below one [B,T,V] float32 buffer."""
    batch, length, dim, vocab, chunk = 2, 512, 32, 8192, 64
    hidden = jax.ShapeDtypeStruct((batch, length, dim), jnp.bfloat16)
    unembedding = jax.ShapeDtypeStruct((dim, vocab), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.float32)

    def naive(h, w, y, m):
        logits = jnp.einsum("btd,dv->btv", h, w)
        return ops.sequence_logps(logits, y, m).sum.sum()

    def chunked(h, w, y, m):
        return ops.sequence_logps_from_hidden(h, w, y, m, chunk_size=chunk).sum.sum()

    full_logits_f32 = batch * length * vocab * 4
    naive_bytes = _temp_bytes(jax.value_and_grad(naive, argnums=(0, 1)), hidden, unembedding, targets, mask)
    chunked_bytes = _temp_bytes(jax.value_and_grad(chunked, argnums=(0, 1)), hidden, unembedding, targets, mask)
    assert naive_bytes >= full_logits_f32
    # A few [chunk, V] float32 buffers plus the float32 unembedding-gradient accumulator.
    assert chunked_bytes <= 6 * chunk * vocab * 4 + dim * vocab * 4 + 4 * batch * length * dim * 4
    assert chunked_bytes * 8 < naive_bytes
