"""cpo_jax.ops.quant: blockwise NF4/int8 weight quantisation against a float64 NumPy reference, the NF4
construction from normal quantiles, closed-form error bounds, bitsandbytes (when installed), jit, sharding on
the 8 host CPU devices (tests/conftest.py), a layer scan, bad inputs and the stored bytes."""

from __future__ import annotations

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cpo_jax.ops.quant import NF4_CODEBOOK, QuantizedTensor, dequantize, nbytes, quantize, quantized_matmul

NF4 = NF4_CODEBOOK.astype(np.float64)


def _weight(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# float64 reference, written plainly: block b of column j is rows b*B .. (b+1)*B - 1 of column j.


def ref_quantize(w, kind, block):
    """(codes [in, out] int64 unpacked, absmax [in // block, out]) in float64."""
    w = np.asarray(w, np.float64)
    n_in, n_out = w.shape
    codes = np.zeros((n_in, n_out), np.int64)
    absmax = np.zeros((n_in // block, n_out))
    for b in range(n_in // block):
        rows = slice(b * block, (b + 1) * block)
        a = np.abs(w[rows]).max(axis=0)
        absmax[b] = a
        normed = w[rows] / np.where(a == 0, 1.0, a)
        if kind == "int8":
            codes[rows] = np.round(normed * 127)
        else:  # nearest codebook value; argmin takes the lower code on a tie
            codes[rows] = np.argmin(np.abs(normed[..., None] - NF4), axis=-1)
    return codes, absmax


def ref_dequantize(codes, absmax, kind, block):
    values = codes.astype(np.float64) / 127 if kind == "int8" else NF4[codes]
    return values * np.repeat(absmax, block, axis=0)


def unpack_nf4(packed):
    """uint8 [in // 2, out] -> codes [in, out]: row 2m in the high nibble, row 2m + 1 in the low one."""
    packed = np.asarray(packed).astype(np.int64)
    codes = np.zeros((2 * packed.shape[0], packed.shape[1]), np.int64)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 15
    return codes


def unpacked_codes(q):
    return unpack_nf4(q.codes) if q.kind == "nf4" else np.asarray(q.codes).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# The NF4 codebook.


def test_nf4_codebook_equals_normal_quantile_construction():
    """QLoRA Appendix E / bitsandbytes create_normal_map: 8 positive values from N(0, 1) quantiles at 9 evenly
    spaced probabilities from 0.9677083 down to 0.5 (the last, 0.5, dropped), 7 negative ones from 8 spaced
    probabilities, plus 0, divided by the largest."""
    offset = 0.9677083
    ppf = NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    derived = np.sort(np.array(positive + [0.0] + negative))
    derived /= derived.max()
    # bitsandbytes spaced the probabilities in float32: 1e-6 covers that.
    np.testing.assert_allclose(NF4_CODEBOOK, derived, rtol=0, atol=1e-6)
    assert NF4_CODEBOOK.dtype == np.float32 and np.all(np.diff(NF4_CODEBOOK) > 0)
    assert NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[-1] == 1 and NF4_CODEBOOK[7] == 0
    assert (NF4_CODEBOOK > 0).sum() == 8 and (NF4_CODEBOOK < 0).sum() == 7


# ---------------------------------------------------------------------------------------------------------------
# Against the reference, error bounds, accuracy.


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("block", [64, 32])
def test_matches_float64_reference(kind, block):
    w = _weight((256, 96), seed=1)
    w[:block, 3] = 0.0  # an all-zero block
    w[block : 2 * block, 4] = -0.75  # a constant block: every value is the absmax
    q = quantize(jnp.asarray(w), kind, block)
    codes, absmax = ref_quantize(w, kind, block)

    assert q.shape == (256, 96) and q.block_size == block and q.kind == kind and q.dtype == np.float32
    assert q.codes.shape == ((128, 96) if kind == "nf4" else (256, 96))
    assert q.codes.dtype == (jnp.uint8 if kind == "nf4" else jnp.int8)
    assert q.scales.shape == (256 // block, 96) and q.scales.dtype == jnp.float32
    np.testing.assert_array_equal(unpacked_codes(q), codes)
    np.testing.assert_array_equal(np.asarray(q.scales), absmax)
    np.testing.assert_allclose(np.asarray(dequantize(q)), ref_dequantize(codes, absmax, kind, block), rtol=1e-6)
    assert np.all(np.asarray(dequantize(q))[:block, 3] == 0)
    np.testing.assert_array_equal(np.asarray(dequantize(q))[block : 2 * block, 4], -0.75)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_round_trip_error_within_closed_form_bound(kind):
    w = _weight((512, 64), seed=2) * np.exp(np.random.RandomState(3).randn(1, 64)).astype(np.float32)
    q = quantize(jnp.asarray(w), kind, 64)
    err = np.abs(np.asarray(dequantize(q), np.float64) - w).reshape(8, 64, 64)  # [block, row, column]
    absmax = np.abs(w.astype(np.float64)).reshape(8, 64, 64).max(axis=1, keepdims=True)
    if kind == "int8":
        bound = absmax / 127 / 2  # half a step
    else:
        bound = absmax * np.diff(NF4).max() / 2  # half the widest codebook gap
    assert np.all(err <= bound * (1 + 1e-5))
    # NF4 is also the nearest codebook value, i.e. within half its own gap.
    if kind == "nf4":
        normed = w.reshape(8, 64, 64) / absmax
        picked = NF4[unpacked_codes(q).reshape(8, 64, 64)]
        nearest = NF4[np.argmin(np.abs(normed[..., None] - NF4), axis=-1)]
        np.testing.assert_allclose(np.abs(normed - picked), np.abs(normed - nearest), atol=1e-6)


def test_relative_error_on_normal_weights_and_matmul():
    w = jnp.asarray(_weight((256, 512), seed=4))
    x = jnp.asarray(_weight((3, 5, 256), seed=5))
    errors, matmul_diff = {}, {}
    for kind in ("nf4", "int8"):
        q = quantize(w, kind)
        deq = dequantize(q)
        errors[kind] = float(jnp.linalg.norm(deq - w) / jnp.linalg.norm(w))
        got = jax.jit(quantized_matmul)(x, q)
        assert got.shape == (3, 5, 512) and got.dtype == jnp.float32
        want = np.asarray(x, np.float64) @ np.asarray(deq, np.float64)
        matmul_diff[kind] = float(np.abs(np.asarray(got) - want).max())
        assert matmul_diff[kind] < 1e-4
        # bfloat16 compute: x and the weight rounded to bfloat16, the result rounded to bfloat16 (8 bits).
        got16 = quantized_matmul(x.astype(jnp.bfloat16), q)
        assert got16.dtype == jnp.bfloat16
        want16 = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(dequantize(q, jnp.bfloat16), np.float64)
        np.testing.assert_allclose(np.asarray(got16, np.float64), want16, rtol=2**-7, atol=1e-2)
    print(
        f"\nN(0, 1) [256, 512], block 64: relative Frobenius error {errors}; "
        f"max |quantized_matmul - x @ dequantize| (float32 vs float64) {matmul_diff}"
    )
    assert 0.08 < errors["nf4"] < 0.11
    assert 0.004 < errors["int8"] < 0.01


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_matmul_materialises_at_most_one_dequantised_weight(kind):
    """The unpack/lookup/scale is one fusion feeding the dot: the compiled program's temporary memory is the
    dequantised [in, out] operand (float32 on CPU) plus the small activations, not copies of the weight."""
    n_in, n_out = 1024, 2048
    q = jax.eval_shape(lambda w: quantize(w, kind), jax.ShapeDtypeStruct((n_in, n_out), jnp.bfloat16))
    x = jax.ShapeDtypeStruct((8, n_in), jnp.bfloat16)
    temp = jax.jit(quantized_matmul).lower(x, q).compile().memory_analysis().temp_size_in_bytes
    assert temp <= n_in * n_out * 4 + 8 * (n_in + n_out) * 4 + 4096, temp


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantising_holds_at_most_one_float32_copy_of_the_weight(kind):
    """Quantising one [in, out] matrix needs its float32 blocks and nothing the weight's size beyond them (the
    codes are 1 B or less per weight): searchsorted's [in, out, 15] comparisons used 6x that."""
    n_in, n_out = 1024, 2048

    def codes_and_scales(w):
        q = quantize(w, kind)
        return q.codes, q.scales

    w = jax.ShapeDtypeStruct((n_in, n_out), jnp.bfloat16)
    temp = jax.jit(codes_and_scales).lower(w).compile().memory_analysis().temp_size_in_bytes
    assert temp <= n_in * n_out * (4 + 1) + 4096, temp


def test_matches_bitsandbytes():
    """Bit for bit: bitsandbytes quantises W = w.T [out, in] flattened, so its bytes are our arrays transposed."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = _weight((256, 128), seed=6)
    wt = torch.from_numpy(np.ascontiguousarray(w.T))

    q = quantize(jnp.asarray(w), "nf4", 64)
    packed, state = bnb.quantize_4bit(wt, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(q.codes).T.ravel(), packed.numpy().ravel())
    np.testing.assert_array_equal(np.asarray(q.scales).T.ravel(), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(dequantize(q)).T, bnb.dequantize_4bit(packed, state).numpy())
    np.testing.assert_array_equal(NF4_CODEBOOK, bnb.get_4bit_type("nf4", device="cpu").numpy())

    # LLM.int8's row-wise absmax quantisation is our int8 with one block per column.
    q8 = quantize(jnp.asarray(w), "int8", 256)
    codes, row_absmax, _ = bnb.int8_vectorwise_quant(wt)
    ours, theirs = np.asarray(q8.codes).T.astype(int), codes.numpy().astype(int)
    # bitsandbytes' float32 w * (127 / absmax) can land on the other side of a .5 tie than the exact value.
    exact = w.T.astype(np.float64) * 127 / np.abs(w.astype(np.float64)).max(axis=0)[:, None]
    differ = ours != theirs
    assert np.all(np.abs(ours - theirs) <= 1) and differ.sum() <= 2
    assert np.all(np.abs(np.abs(exact[differ] % 1) - 0.5) < 1e-5)
    np.testing.assert_array_equal(ours, np.round(exact))
    np.testing.assert_array_equal(np.asarray(q8.scales)[0], row_absmax.numpy())


def test_dtypes():
    w = jnp.asarray(_weight((128, 32), seed=7)).astype(jnp.bfloat16)
    q = quantize(w, "nf4")
    assert q.dtype == jnp.bfloat16 and dequantize(q).dtype == jnp.bfloat16
    assert dequantize(q, jnp.float32).dtype == jnp.float32
    # bfloat16 scales: normalised by the rounded scale, so codes stay valid and the error barely moves.
    w32 = w.astype(jnp.float32)
    for kind in ("nf4", "int8"):
        q32, q16 = quantize(w32, kind), quantize(w32, kind, scale_dtype=jnp.bfloat16)
        assert q16.scales.dtype == jnp.bfloat16
        e32, e16 = (float(jnp.linalg.norm(dequantize(a) - w32)) for a in (q32, q16))
        assert e16 < 1.1 * e32


# ---------------------------------------------------------------------------------------------------------------
# jit, sharding, scan.


def _tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_jit_matches_eager(kind):
    w = jnp.asarray(_weight((128, 64), seed=8))
    q = quantize(w, kind, 32)
    qj = jax.jit(quantize, static_argnames=("kind", "block_size"))(w, kind=kind, block_size=32)
    assert isinstance(qj, QuantizedTensor) and _tree_equal(q, qj)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(q)), np.asarray(dequantize(q)))


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))


def _collectives(lowered):
    hlo = lowered.compile().as_text()
    return [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter") if c in hlo]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("spec", [P("fsdp", None), P(None, "tensor"), P("fsdp", "tensor")], ids=str)
def test_sharded_weight_matches_unsharded(kind, spec, mesh):
    """in = 256 over fsdp = 4 is 64 rows a shard, one block of 64: quantize and dequantize are shard-local (no
    collectives in the compiled program) and give the unsharded numbers."""
    w = jnp.asarray(_weight((256, 128), seed=9))
    x = jnp.asarray(_weight((8, 256), seed=10))
    sharding = NamedSharding(mesh, spec)
    ws = jax.device_put(w, sharding)
    quant = jax.jit(quantize, static_argnames=("kind", "block_size"))

    qs = quant(ws, kind=kind, block_size=64)
    assert qs.codes.sharding.spec == spec and qs.scales.sharding.spec == spec
    assert _tree_equal(qs, quantize(w, kind, 64))
    assert _collectives(quant.lower(ws, kind=kind, block_size=64)) == []
    assert _collectives(jax.jit(dequantize).lower(qs)) == []
    if spec[0] == "fsdp":  # the check has teeth: blocks of 128 rows straddle the 64-row shards
        assert _collectives(quant.lower(ws, kind=kind, block_size=128)) != []

    deq = jax.jit(dequantize)(qs)
    assert deq.sharding.spec == spec
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(dequantize(quantize(w, kind, 64))))
    xs = jax.device_put(x, NamedSharding(mesh, P()))
    got = jax.jit(quantized_matmul)(xs, qs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ deq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_scan_over_stacked_layers_matches_loop(kind):
    n_layers, d = 3, 128
    ws = jnp.asarray(_weight((n_layers, d, d), seed=11)) / np.sqrt(d)
    per_layer = [quantize(ws[i], kind) for i in range(n_layers)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    assert _tree_equal(stacked, quantize(ws, kind))  # quantising the stack is quantising each layer
    np.testing.assert_array_equal(
        np.asarray(dequantize(stacked)), np.stack([np.asarray(dequantize(q)) for q in per_layer])
    )

    x = jnp.asarray(_weight((4, d), seed=12))

    @jax.jit
    def scanned(x, stacked):
        return jax.lax.scan(lambda h, q: (jnp.tanh(quantized_matmul(h, q)), None), x, stacked)[0]

    want = x
    for q in per_layer:
        want = jnp.tanh(quantized_matmul(want, q))
    np.testing.assert_allclose(np.asarray(scanned(x, stacked)), np.asarray(want), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs and memory.


@pytest.mark.parametrize(
    ("w", "kwargs", "match"),
    [
        (np.ones((64, 8), np.float32), {"kind": "nf3"}, "unknown quantisation kind 'nf3'"),
        (np.ones((96, 8), np.float32), {"block_size": 64}, "block_size 64 does not divide the input .* 96"),
        (np.ones((64, 8), np.float32), {"block_size": 0}, "positive int"),
        (np.ones((64, 8), np.float32), {"block_size": 3, "kind": "nf4"}, "must be even"),
        (np.ones((64, 8), np.int32), {}, "floating-point weight, got dtype int32"),
        (np.ones((64,), np.float32), {}, r"at least 2-D\), got shape \(64,\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(jnp.asarray(w), **kwargs)


def test_quantized_matmul_rejects_stacks_and_wrong_features():
    q = quantize(jnp.ones((2, 64, 8)), "int8")
    with pytest.raises(ValueError, match="stack with leading axes"):
        quantized_matmul(jnp.ones((1, 64)), q)
    with pytest.raises(ValueError, match="x has 32 features but the weight has in=64"):
        quantized_matmul(jnp.ones((1, 32)), quantize(jnp.ones((64, 8)), "int8"))


def test_nbytes_closed_form():
    n, block = 4096, 64
    spec = jax.ShapeDtypeStruct((n, n), jnp.bfloat16)
    shapes = {
        (kind, sd): jax.eval_shape(lambda w, k=kind, s=sd: quantize(w, k, block, scale_dtype=s), spec)
        for kind in ("nf4", "int8")
        for sd in (jnp.float32, jnp.bfloat16)
    }
    assert nbytes(shapes["nf4", jnp.float32]) == n * n // 2 + n * n // block * 4  # 0.5625 B/param
    assert nbytes(shapes["nf4", jnp.bfloat16]) == n * n // 2 + n * n // block * 2  # 0.53125 B/param
    assert nbytes(shapes["int8", jnp.float32]) == n * n + n * n // block * 4  # 1.0625 B/param
    assert nbytes(shapes["nf4", jnp.float32]) / (n * n) == 0.5625
    q = quantize(jnp.ones((256, 32)), "nf4")
    assert nbytes(q) == q.codes.nbytes + q.scales.nbytes == 256 * 32 // 2 + 4 * 32 * 4
