"""QLoRA at the model level (issue 17): the frozen decoder weights stored quantised (nf4, int8), LoRA on top.

References: the float model run with the weights dequantised by a plain NumPy decoder of the stored codes and scales
(the quantised forward must be exactly that model), the float model itself (the quantisation error, reported), the
loop/scan and single-device/sharded forms, the gradients of the float model with the same dequantised weights and
adapters, transformers on the merged export, and greedy generation with the dequantised model.

The tiny Llama here has intermediate_size 128 (not hf_tiny's 96), so that the default block of 64 divides every
projection's input dimension.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cpo_jax.errors import ConfigError
from cpo_jax.hf.peft import add_adapter
from cpo_jax.hf.pretrained import from_pretrained, save_pretrained
from cpo_jax.models.generate import generate
from cpo_jax.models.layers import QuantFormat, QuantizedWeight
from cpo_jax.models.lora import LoraSpec, has_lora, merge_lora, remove_lora
from cpo_jax.models.quantize import decoder_linears, dequantize_model, is_quantized, quantize_model
from cpo_jax.models.transformer import Transformer
from cpo_jax.ops.quant import NF4_CODEBOOK, quantize
from tests.hf_tiny import COMMON

torch = pytest.importorskip("torch")

IDS = np.random.RandomState(0).randint(3, 256, (2, 9))
MASK = np.ones_like(IDS)
MASK[1, :3] = 0  # left padding
BYTES_PER_PARAM = {"nf4": 0.5 + 4 / 64, "int8": 1 + 4 / 64}  # codes + one float32 scale per 64 weights


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """A tiny random Llama (hidden 64, intermediate 128, 2 layers, untied), perturbed norms as in hf_tiny."""
    import transformers

    directory = tmp_path_factory.mktemp("hf_tiny_qlora") / "llama128"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**COMMON, "intermediate_size": 128, "tie_word_embeddings": False})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.eval().save_pretrained(directory)
    return directory


def _logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))


def _real(logits: np.ndarray) -> np.ndarray:
    return logits[MASK.astype(bool)]


def np_dequantize(codes, scales, fmt: QuantFormat) -> np.ndarray:
    """The weight ``[..., in, out]`` from stored codes and scales, in float64, written plainly: nf4 byte ``m`` holds
    rows ``2m`` (high nibble) and ``2m + 1`` (low); int8 values are ``code / 127``; each value times its block's
    absmax (``block_size`` consecutive rows of one column)."""
    codes, scales = np.asarray(codes), np.asarray(scales, np.float64)
    if fmt.kind == "nf4":
        packed = codes.astype(np.int64)
        idx = np.stack([packed >> 4, packed & 15], axis=-2)  # [..., in/2, 2, out]
        values = NF4_CODEBOOK.astype(np.float64)[idx.reshape(*packed.shape[:-2], -1, packed.shape[-1])]
    else:
        values = codes.astype(np.float64) / 127
    return values * np.repeat(scales, fmt.block_size, axis=-2)


def _with_dequantised_kernels(float_model, quantised):
    """``float_model`` with every decoder kernel set to the NumPy dequantisation of ``quantised``'s codes."""
    for (_, lin), (_, qlin) in zip(decoder_linears(float_model), decoder_linears(quantised), strict=True):
        w = np_dequantize(qlin.kernel_codes[...], qlin.kernel_scales[...], qlin.quant)
        lin.kernel.set_value(jnp.asarray(w, lin.kernel[...].dtype))
    return float_model


def _randomize(model, seed: int = 0, std: float = 0.2):
    lora = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(nnx.to_flat_state(lora))))
    draw = lambda v: jax.device_put((std * jax.random.normal(next(keys), v.shape)).astype(v.dtype), v.sharding)
    nnx.update(model, jax.tree.map(draw, lora))
    return model


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_forward_is_the_float_model_with_dequantised_weights(kind, path):
    want_float = _logits(from_pretrained(path))
    model = from_pretrained(path)
    kernels = {p: np.asarray(lin.kernel[...]) for p, lin in decoder_linears(model)}
    quantize_model(model, kind)
    assert len(kernels) == 2 * 7  # q, k, v, o, gate, up, down per layer; not the embedding or lm_head
    for p, lin in decoder_linears(model):
        assert lin.kernel is None and lin.quant == QuantFormat(kind, 64, np.dtype("float32"), kernels[p].shape)
        assert isinstance(lin.kernel_codes, QuantizedWeight) and isinstance(lin.kernel_scales, QuantizedWeight)
        q = quantize(jnp.asarray(kernels[p]), kind, 64)  # the stored codes quantise that very kernel, unpermuted
        assert np.array_equal(lin.kernel_codes[...], q.codes) and np.array_equal(lin.kernel_scales[...], q.scales)
    assert model.lm_head.quant is None and model.lm_head.kernel is not None

    got = _logits(model)
    reference = _logits(_with_dequantised_kernels(from_pretrained(path), model))
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)

    # The quantisation error itself (reported; the bounds only catch gross mistakes): the relative weight error is
    # that of tests/test_quant.py, and this random model (weights ~N(0, 0.15^2)) amplifies it more than trained ones.
    err = np.abs(got - want_float).max()
    rel = np.linalg.norm(got - want_float) / np.linalg.norm(want_float)
    dequantised = {
        p: np_dequantize(lin.kernel_codes[...], lin.kernel_scales[...], lin.quant) for p, lin in decoder_linears(model)
    }
    w_rel = np.mean([np.linalg.norm(dequantised[p] - w) / np.linalg.norm(w) for p, w in kernels.items()])
    print(
        f"\n{kind}: max |dlogits| {err:.4f}, relative {rel:.4f} (logits max |.| {np.abs(want_float).max():.2f}); "
        f"relative weight error {w_rel:.4f}"
    )
    assert 0 < rel < {"nf4": 0.5, "int8": 0.05}[kind] and w_rel < {"nf4": 0.12, "int8": 0.01}[kind]


def test_scan_equals_loop_and_abstract_quantisation(path):
    loop = quantize_model(from_pretrained(path), "nf4")
    scan = quantize_model(from_pretrained(path, scan_layers=True), "nf4")
    q = scan.layers.attn.q
    assert q.kernel_codes[...].shape == (2, 32, 64) and q.kernel_scales[...].shape == (2, 1, 64)
    assert q.kernel_codes.get_metadata()["out_sharding"] == ("layers", "embed", "heads") and q.kernel_shape == (
        2,
        64,
        64,
    )
    for name in ("attn.q", "mlp.down"):
        stacked = dict(decoder_linears(scan))[f"layers.{name}"]
        for i in range(2):
            per_layer = dict(decoder_linears(loop))[f"layers.{i}.{name}"]
            assert np.array_equal(stacked.kernel_codes[...][i], per_layer.kernel_codes[...])
    np.testing.assert_allclose(_logits(scan), _logits(loop), atol=1e-5, rtol=0)

    # quantising an abstract model (nnx.eval_shape) gives the structure of the concrete one
    abstract = nnx.eval_shape(lambda: quantize_model(Transformer(scan.config, rngs=nnx.Rngs(0)), "nf4"))
    shapes = lambda m: {p: (v.shape, v.dtype, type(v)) for p, v in nnx.to_flat_state(nnx.state(m))}
    assert shapes(abstract) == shapes(scan) and nnx.graphdef(abstract) == nnx.graphdef(scan)


def test_sharded_codes_follow_the_kernel(path, caplog):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
    from cpo_jax.parallel import make_mesh
    from cpo_jax.parallel.sharding import param_shardings

    mesh = make_mesh({"fsdp": 4, "tensor": 2}, jax.devices()[:8])
    batch = NamedSharding(mesh, P("fsdp", None))
    ids = jax.device_put(jnp.asarray(np.tile(IDS, (2, 1))), batch)
    mask = jax.device_put(jnp.asarray(np.tile(MASK, (2, 1))), batch)
    forward = nnx.jit(lambda m, i, a: m(i, a))

    def check(model, block, fallback=()):
        specs = {p: lin.kernel[...].sharding.spec for p, lin in decoder_linears(model)}
        quantize_model(model, "nf4", block_size=block)
        for p, lin in decoder_linears(model):
            want = specs[p]
            if any(p.endswith(name) for name in fallback):  # in replicated, out still sharded
                want = P(*want[:-2], None, want[-1])
            assert lin.kernel_codes[...].sharding.spec == want, p
            assert lin.kernel_scales[...].sharding.spec == want, p
        metadata = param_shardings(nnx.state(model, QuantizedWeight), mesh)  # re-placing from metadata agrees
        for (p, s), (_, v) in zip(nnx.to_flat_state(metadata), nnx.to_flat_state(nnx.state(model, QuantizedWeight))):
            assert s.spec == v[...].sharding.spec, p
        single = _logits(
            quantize_model(from_pretrained(path, scan_layers=model.config.scan_layers), "nf4", block_size=block)
        )
        got = np.asarray(forward(model, ids, mask))
        np.testing.assert_allclose(got[:2], single, atol=1e-5, rtol=0)

    for scan in (False, True):  # blocks of 16 rows: every shard holds whole blocks
        model = from_pretrained(path, mesh=mesh, scan_layers=scan)
        assert model.layers[0].attn.q.kernel[...].sharding.spec == P("fsdp", "tensor") if not scan else True
        check(model, 16)

    # blocks of 64: the embed-sharded kernels (64 rows / fsdp 4 = 16) and attn.o (64 / tensor 2 = 32) cannot keep
    # their `in` sharding; mlp.down (128 / tensor 2 = 64) can.
    with caplog.at_level(logging.WARNING, logger="cpo_jax.models.quantize"):
        check(from_pretrained(path, mesh=mesh), 64, fallback=("q", "k", "v", "o", "gate", "up"))
    (warning,) = [r.getMessage() for r in caplog.records if "replicated along `in`" in r.getMessage()]
    assert "12 projection(s)" in warning and "layers.0.attn.q" in warning and "mlp.down" not in warning


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
def test_lora_on_a_quantised_base(scan, remat, path):
    model = quantize_model(from_pretrained(path, scan_layers=scan, remat=remat), "nf4")
    add_adapter(model, LoraSpec(rank=4, alpha=8), rngs=nnx.Rngs(0))
    weights = jnp.asarray(np.random.RandomState(1).randn(*IDS.shape, 256).astype(np.float32))

    def loss(m):
        return jnp.sum(m(jnp.asarray(IDS), jnp.asarray(MASK)) * weights)

    grad = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
    flat = nnx.to_flat_state(grad(model))
    assert len(flat) == 2 * 7 * (1 if scan else 2) and all(isinstance(g, nnx.LoRAParam) for _, g in flat)
    for p, g in flat:  # fresh adapters: B = 0, so dL/dA = 0 exactly and dL/dB is not
        value = np.asarray(g[...])
        assert np.isfinite(value).all(), p
        assert (np.abs(value).max() > 1e-3) if p[-1] == "lora_b" else not value.any(), p

    # randomised adapters: the gradients are those of the float model with the dequantised weights
    _randomize(model, seed=2)
    reference = dequantize_model(nnx.clone(model))
    assert not is_quantized(reference) and has_lora(reference)
    ours, theirs = nnx.to_flat_state(grad(model)), nnx.to_flat_state(grad(reference))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (p, a), (_, b) in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-4, atol=1e-4, err_msg=str(p))

    # the frozen part holds no float kernel of the decoder layers: only codes, scales and norm vectors
    _, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    layers = [(p, v) for p, v in nnx.to_flat_state(frozen) if p[0] == "layers"]
    assert all(isinstance(v, QuantizedWeight) or v[...].ndim == 1 + scan for p, v in layers)
    stored = sum(v[...].nbytes for _, v in layers if isinstance(v, QuantizedWeight))
    params = sum(math.prod(lin.kernel_shape) for _, lin in decoder_linears(model))
    assert stored / params == BYTES_PER_PARAM["nf4"]
    assert not any(isinstance(v, QuantizedWeight) for _, v in nnx.to_flat_state(lora))
    assert not any(isinstance(v, QuantizedWeight) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))

    if not scan:  # the backward pass keeps codes and scales, never a dequantised [in, out] weight
        shapes = {f"f32[{','.join(map(str, lin.kernel_shape))}]" for _, lin in decoder_linears(model)}
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda lo: loss(nnx.merge(graphdef, lo, rest)), lora)
        saved = [line for line in out.getvalue().splitlines() if "argument" not in line]
        assert saved and not [line for line in saved if line.split(" ")[0] in shapes], saved


def test_int8_frozen_bytes_and_adapters_before_quantising(path):
    adapted_first = _randomize(add_adapter(from_pretrained(path), LoraSpec(rank=4, alpha=8), rngs=nnx.Rngs(0)))
    quantize_model(adapted_first, "int8")
    adapted_after = add_adapter(
        quantize_model(from_pretrained(path), "int8"), LoraSpec(rank=4, alpha=8), rngs=nnx.Rngs(0)
    )
    nnx.update(adapted_after, nnx.state(adapted_first, nnx.LoRAParam))
    np.testing.assert_allclose(_logits(adapted_after), _logits(adapted_first), atol=1e-6, rtol=0)
    stored = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(adapted_after, QuantizedWeight)))
    assert stored / sum(math.prod(lin.kernel_shape) for _, lin in decoder_linears(adapted_after)) == 1.0625


def test_merge_dequantises_and_exports(path, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _randomize(
        add_adapter(quantize_model(from_pretrained(path), "nf4"), LoraSpec(rank=4, alpha=8), rngs=nnx.Rngs(0))
    )
    want = _logits(model)
    merged = merge_lora(model)
    assert is_quantized(model) and has_lora(model)  # unchanged
    assert not is_quantized(merged) and not has_lora(merged)
    for (p, lin), (_, mlin) in zip(decoder_linears(model), decoder_linears(merged), strict=True):
        w = np_dequantize(lin.kernel_codes[...], lin.kernel_scales[...], lin.quant)
        w = w + lin.lora_scale * np.asarray(lin.lora_a[...], np.float64) @ np.asarray(lin.lora_b[...], np.float64)
        kernel = mlin.kernel
        assert isinstance(kernel, nnx.Param) and kernel[...].dtype == jnp.float32, p
        assert kernel.get_metadata()["out_sharding"] == lin.kernel_codes.get_metadata()["kernel_axes"], p
        np.testing.assert_allclose(np.asarray(kernel[...]), w, atol=1e-6, rtol=0, err_msg=p)
    np.testing.assert_allclose(_logits(merged), want, atol=5e-5, rtol=0)

    save_pretrained(merged, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    positions = np.maximum(np.cumsum(MASK, axis=-1) - 1, 0)
    with torch.no_grad():
        theirs = (
            hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), position_ids=torch.tensor(positions))
            .logits.float()
            .numpy()
        )
    np.testing.assert_allclose(_real(theirs), _real(want), atol=1e-4, rtol=0)

    with pytest.raises(ValueError, match="LoRA adapters"):
        save_pretrained(model, tmp_path / "unmerged")
    with pytest.raises(ValueError, match=re.escape("stored quantised (QLoRA): export merge_lora(model)")):
        save_pretrained(remove_lora(nnx.clone(model)), tmp_path / "quantised")
    assert not (tmp_path / "quantised").exists()


def test_greedy_generation_matches_the_dequantised_model(path):
    model = quantize_model(from_pretrained(path, scan_layers=True), "nf4")
    plain = dequantize_model(nnx.clone(model))
    ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)
    ours = generate(model, ids, mask, max_new_tokens=6)
    theirs = generate(plain, ids, mask, max_new_tokens=6)
    assert np.array_equal(ours.tokens, theirs.tokens) and np.array_equal(ours.mask, theirs.mask)
    assert np.asarray(ours.mask).sum() == 12


def test_bad_inputs(path):
    model = from_pretrained(path)
    cases = [
        (dict(kind="fp4"), r"(?s)model.quantize: unknown quantisation kind 'fp4'.*nf4, int8"),
        (
            dict(kind="nf4", block_size=48),
            r"(?s)layers\.0\.attn\.k\.kernel \[64, 32\]: block_size 48 does not divide the input dimension 64"
            r".*e\.g\. 64",
        ),
        (dict(kind="nf4", block_size=3), "block_size must be even"),
        (dict(kind="int8", block_size=0), "block_size must be a positive integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            quantize_model(model, **kwargs)
        assert not is_quantized(model) and all(lin.kernel is not None for _, lin in decoder_linears(model))
    quantize_model(model, "int8", block_size=32)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(model, "nf4")
    with pytest.raises(ValueError, match="not quantised"):
        model.lm_head.quantized_kernel()
