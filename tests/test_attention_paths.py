"""Every ``attention_impl`` path against the einsum (``"xla"``) reference: values and gradients, for causal,
right-padded, packed and windowed masks with grouped-query heads, and a whole Transformer.

``"splash"`` runs its TPU kernel in Pallas interpret mode on the CPU. ``"cudnn"`` cannot run here: its pure
decision function (:func:`plan_attention`) is tested case by case, the CPU fallback is tested for equality and a
single log line, and the fused run is skipped with the reason when there is no GPU.

Only real tokens are compared: the paths give padding queries different (finite) rows, which no loss reads.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpo_jax.errors import ConfigError
from cpo_jax.models.config import ATTENTION_IMPLS, FULL, SLIDING, TransformerConfig
from cpo_jax.models.transformer import Transformer, init_cache
from cpo_jax.ops import attention
from cpo_jax.ops.attention import (
    IMPLEMENTATIONS,
    MaskSpec,
    attention_mask,
    dot_product_attention,
    plan_attention,
    splash_block_size,
    splash_interpret,
)
from cpo_jax.train.config import ModelConfig, from_dict

B, T, N, K, H = 2, 20, 4, 2, 16  # grouped-query: two query heads per key/value head
SCALE = H**-0.5
SEGMENTS = np.array([[1] * 7 + [2] * 9 + [3] * 2 + [0] * 2, [1] * 15 + [0] * 5])  # 0 = padding
CASES = {
    "causal": dict(),
    "right_padded": dict(valid=SEGMENTS[1:2].repeat(2, 0) > 0),
    "packed": dict(valid=SEGMENTS > 0, segments=SEGMENTS),
    "windowed": dict(window=5),
    "packed_windowed": dict(valid=SEGMENTS > 0, segments=SEGMENTS, window=4),
}


def _spec(valid=None, segments=None, window=None) -> MaskSpec:
    return MaskSpec(
        query_slots=jnp.arange(T),
        key_slots=jnp.arange(T),
        key_valid=None if valid is None else jnp.asarray(valid),
        segment_ids=None if segments is None else jnp.asarray(segments),
        window=window,
        causal=True,
    )


def _inputs(seed=0, dtype=jnp.float32):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, T, K, H), dtype)
    v = jax.random.normal(kv, (B, T, K, H), dtype)
    return q, k, v, jax.random.normal(kc, (B, T, N, H), jnp.float32)


def _value_and_grads(spec, q, k, v, cotangent, impl, **kw):
    """Output and d(<out, cotangent> over real query rows)/d(q, k, v[, sinks]), jitted inside interpret mode."""
    real = (jnp.ones((B, T)) if spec.key_valid is None else spec.key_valid)[:, :, None, None]
    wrt = (0, 1, 2, 3) if kw.get("sinks") is not None else (0, 1, 2)

    def loss(q, k, v, sinks):
        out = dot_product_attention(q, k, v, spec, scale=SCALE, implementation=impl, **{**kw, "sinks": sinks})
        return jnp.sum(out.astype(jnp.float32) * cotangent * real), out

    with splash_interpret():
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=wrt, has_aux=True))(q, k, v, kw.get("sinks"))
    return out * real.astype(out.dtype), grads


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)))) for x, y in zip(a, b))


@functools.cache
def _reference(case: str):
    """The einsum path's output and gradients for ``case`` (computed once for the three paths compared with it)."""
    return _value_and_grads(_spec(**CASES[case]), *_inputs(), "xla")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["auto", "cudnn", "splash"])
def test_each_path_matches_the_einsum_path(impl, case):
    ref_out, ref_grads = _reference(case)
    out, grads = _value_and_grads(_spec(**CASES[case]), *_inputs(), impl)
    assert _max_diff([out], [ref_out]) < 2e-6
    assert _max_diff(grads, ref_grads) < 2e-5
    assert float(jnp.max(jnp.abs(ref_grads[1]))) > 0.1  # the gradients are not trivially zero


@pytest.mark.parametrize("case", ["causal", "packed_windowed"])
def test_splash_computes_softcap_and_sinks_in_the_kernel(case):
    spec = _spec(**CASES[case])
    q, k, v, cot = _inputs(1)
    kw = dict(softcap=2.0, sinks=jnp.linspace(-1.0, 1.5, N))
    ref_out, ref_grads = _value_and_grads(spec, q, k, v, cot, "xla", **kw)
    out, grads = _value_and_grads(spec, q, k, v, cot, "splash", **kw)
    assert _max_diff([out], [ref_out]) < 2e-6
    assert _max_diff(grads, ref_grads) < 2e-5  # q, k, v and the sink logits


def test_a_traced_window_flag_selects_the_window_under_jit():
    """``scan_layers`` over sliding and full layers: ``window_if(flag)`` equals the static spec on each side."""
    q, k, v, _ = _inputs(2)
    sliding = _spec(**CASES["packed_windowed"])
    full = _spec(valid=SEGMENTS > 0, segments=SEGMENTS)
    for impl in ("xla", "splash"):
        run = jax.jit(
            lambda flag: dot_product_attention(q, k, v, sliding.window_if(flag), scale=SCALE, implementation=impl)
        )
        with splash_interpret():
            on, off = run(True), run(False)
        real = (SEGMENTS > 0)[:, :, None, None]
        assert _max_diff([on * real], [dot_product_attention(q, k, v, sliding, scale=SCALE) * real]) < 2e-6
        assert _max_diff([off * real], [dot_product_attention(q, k, v, full, scale=SCALE) * real]) < 2e-6


def test_the_spec_derives_exactly_the_dense_mask():
    spec = _spec(**CASES["packed_windowed"])
    expected = attention_mask(
        jnp.arange(T),
        jnp.arange(T),
        jnp.asarray(SEGMENTS > 0),
        query_segments=jnp.asarray(SEGMENTS),
        sliding_window=4,
    )
    np.testing.assert_array_equal(np.asarray(spec.dense()), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(spec.window_if(jnp.asarray(True)).dense()), np.asarray(expected))
    # a dense mask argument still works on the XLA paths (the public signature of existing callers)
    q, k, v, _ = _inputs(3)
    for impl in ("xla", "auto"):
        dense = dot_product_attention(q, k, v, expected, scale=SCALE, implementation=impl)
        real = (SEGMENTS > 0)[:, :, None, None]
        assert _max_diff([dense * real], [dot_product_attention(q, k, v, spec, scale=SCALE) * real]) < 2e-6


GPU = dict(platform="gpu", compute_capability="9.0", dtype=jnp.bfloat16, head_dim=128)


@pytest.mark.parametrize(
    "facts,path,form,reason",
    [
        (dict(), "cudnn", "causal", None),
        (dict(padded=True), "cudnn", "masked", None),
        (dict(packed=True, padded=True), "cudnn", "masked", None),
        (dict(dtype=jnp.float16, head_dim=256), "cudnn", "causal", None),
        (dict(platform="cpu"), "xla", "", "needs an NVIDIA GPU; this machine's platform is cpu"),
        (dict(cudnn_available=False), "xla", "", "needs cuDNN"),
        (dict(structured=False), "xla", "", "dense mask argument"),
        (dict(causal=False), "xla", "", "KV-cache attention"),
        (dict(softcap=True), "xla", "", "soft-capping (Gemma 2) is not supported by cuDNN"),
        (dict(sinks=True), "xla", "", "attention sinks (gpt-oss) are not supported by cuDNN"),
        (dict(dtype=jnp.float32), "xla", "", "bfloat16 or float16 inputs, got float32"),
        (dict(head_dim=36), "xla", "", "multiple of 8 up to 256, got 36"),
        (dict(head_dim=256, compute_capability="8.0"), "xla", "", "multiple of 8 up to 128, got 256"),
        (dict(compute_capability="7.5"), "xla", "", "compute capability 8.0 or newer, got 7.5"),
    ],
)
def test_cudnn_decides_fused_or_fallback(facts, path, form, reason):
    plan = plan_attention("cudnn", **{**GPU, **facts})
    assert (plan.path, plan.form) == (path, form)
    if reason is None:
        assert plan.reason is None
    else:
        assert reason in plan.reason


@pytest.mark.parametrize(
    "facts,path,reason",
    [
        (dict(platform="tpu"), "splash", None),
        (dict(platform="tpu", packed=True, padded=True, softcap=True, sinks=True), "splash", None),
        (dict(platform="cpu", interpret=True), "splash", None),
        (dict(platform="cpu"), "xla", "splash attention is a TPU kernel; this machine's platform is cpu"),
        (dict(platform="tpu", causal=False), "xla", "KV-cache attention"),
        (dict(platform="tpu", structured=False), "xla", "dense mask argument"),
        (dict(platform="tpu", mesh_devices=8), "xla", "8-device mesh needs shard_map"),
    ],
)
def test_splash_decides_fused_or_fallback(facts, path, reason):
    plan = plan_attention("splash", **facts)
    assert plan.path == path
    assert plan.reason is None if reason is None else reason in plan.reason


@pytest.mark.parametrize(
    "facts,path,form",
    [
        (dict(GPU), "cudnn", "causal"),
        (dict(GPU, padded=True), "cudnn", "masked"),
        (dict(GPU, dtype=jnp.float32), "xla", ""),  # cuDNN's flash attention takes half precision only
        (dict(GPU, causal=False), "xla", ""),  # a KV-cache call
        (dict(GPU, softcap=True), "xla", ""),
        (dict(GPU, compute_capability="7.5"), "xla", ""),
        (dict(platform="tpu"), "splash", ""),
        (dict(platform="tpu", mesh_devices=8), "xla", ""),
        (dict(platform="cpu"), "xla", ""),
        (dict(platform="cpu", interpret=True), "xla", ""),  # interpret mode is for asking for splash in tests
    ],
)
def test_best_takes_the_machines_fused_kernel_or_xla_quietly(facts, path, form):
    plan = plan_attention("best", **facts)
    assert (plan.path, plan.form, plan.reason) == (path, form, None)


def test_the_trainer_defaults_to_the_best_kernel_and_the_model_library_to_the_reference():
    from cpo_jax.models.config import TransformerConfig
    from cpo_jax.train.config import ModelConfig

    assert ModelConfig.__dataclass_fields__["attention_impl"].default == "best"
    assert TransformerConfig.__dataclass_fields__["attention_impl"].default == "xla"


def test_xla_and_auto_plans_and_unknown_names():
    assert plan_attention("xla", platform="gpu", softcap=True) == attention.AttentionPlan("xla")
    assert plan_attention("auto", platform="gpu").path == "auto"
    assert "soft-capping" in plan_attention("auto", platform="gpu", softcap=True).reason
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        plan_attention("flash", platform="cpu")
    assert tuple(IMPLEMENTATIONS) == tuple(ATTENTION_IMPLS)
    from typing import get_args

    from cpo_jax.train import config as train_config

    assert get_args(train_config.AttentionImpl) == tuple(IMPLEMENTATIONS)


def test_cudnn_fused_run_matches_xla_on_a_gpu():
    facts = attention.machine_facts()
    plan = plan_attention("cudnn", dtype=jnp.bfloat16, head_dim=64, packed=True, padded=True, **facts)
    if plan.path != "cudnn":
        pytest.skip(plan.reason)
    print(f"cuDNN plan: {plan}")
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape_q, shape_kv = (2, 256, 8, 64), (2, 256, 2, 64)
    q = jax.random.normal(kq, shape_q, jnp.bfloat16)
    k, v = (jax.random.normal(key, shape_kv, jnp.bfloat16) for key in (kk, kv))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 64, axis=1).reshape(1, 256).repeat(2, 0))
    for spec in (
        MaskSpec(jnp.arange(256), jnp.arange(256), causal=True),
        MaskSpec(jnp.arange(256), jnp.arange(256), seg > 0, seg, window=48, causal=True),
    ):
        real = (jnp.ones((2, 256)) if spec.key_valid is None else spec.key_valid)[:, :, None, None]

        def loss(q, k, v, impl, spec=spec, real=real):
            out = dot_product_attention(q, k, v, spec, scale=0.125, implementation=impl).astype(jnp.float32)
            return jnp.sum(out * real), out * real

        (_, ref), ref_g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)(q, k, v, "xla")
        (_, out), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)(q, k, v, "cudnn")
        assert _max_diff([out], [ref]) < 2e-2
        assert _max_diff(g, ref_g) < 2e-1


def test_a_fallback_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_LOGGED", set())
    q, k, v, _ = _inputs(4)
    spec = _spec(**CASES["packed"])
    with caplog.at_level(logging.WARNING, logger="cpo_jax.ops.attention"):
        for _ in range(3):  # three layers, or three traces
            dot_product_attention(q, k, v, spec, scale=SCALE, implementation="cudnn")
    lines = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(lines) == 1  # float32 inputs: no cuDNN on any machine
    assert lines[0].startswith("attention_impl='cudnn' falls back to the XLA path: ")


@pytest.mark.parametrize(
    "length,expected",
    [(1, (128, 128)), (128, (128, 128)), (200, (256, 256)), (384, (384, 128)), (640, (640, 128)), (2048, (2048, 512))],
)
def test_splash_pads_to_its_lanes_and_picks_the_largest_block(length, expected):
    assert splash_block_size(length) == expected


def test_config_names_the_key_of_an_unknown_implementation():
    base = dict(
        family="llama",
        model_type="llama",
        vocab_size=11,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
    )
    for impl in ATTENTION_IMPLS:
        assert TransformerConfig(**base, attention_impl=impl).attention_impl == impl
    with pytest.raises(ConfigError, match="attention_impl: unknown attention_impl 'flash'"):
        TransformerConfig(**base, attention_impl="flash")
    assert from_dict(ModelConfig, {"attention_impl": "splash"}).attention_impl == "splash"
    with pytest.raises(ValueError, match="config key model.attention_impl='flash'"):
        from_dict(ModelConfig, {"attention_impl": "flash"}, "model")


# ---------------------------------------------------------------------------------------------------------------------
TINY = dict(
    family="llama",
    model_type="llama",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    layer_types=(FULL, SLIDING),
    sliding_window=4,
)


@pytest.mark.parametrize("scan", [False, True])
def test_transformer_gives_the_same_logits_and_gradients_on_every_path(scan):
    """A sliding and a full layer, packed segments with padding: splash (interpret) against xla, looped and scanned
    (where the window is a traced per-layer flag). ``auto`` and ``cudnn`` are compared op by op above."""
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 61, (B, T)))
    seg = jnp.asarray(SEGMENTS)
    real = seg > 0

    def loss(model):
        logits = model(ids, attention_mask=real, segment_ids=seg)
        return jnp.sum(jnp.where(real[..., None], logits, 0.0) ** 2) * 1e-2, logits

    results = {}
    for impl in ("xla", "splash"):
        model = Transformer(TransformerConfig(**TINY, scan_layers=scan, attention_impl=impl), rngs=nnx.Rngs(0))
        with splash_interpret():
            (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        results[impl] = (logits, jax.tree.leaves(nnx.state(grads, nnx.Param)))
    (ref_logits, ref_grads), (logits, grads) = results["xla"], results["splash"]
    assert _max_diff([jnp.where(real[..., None], logits, 0)], [jnp.where(real[..., None], ref_logits, 0)]) < 1e-5
    assert _max_diff(grads, ref_grads) < 1e-5
    assert max(float(jnp.max(jnp.abs(g))) for g in ref_grads) > 1e-3


def test_kv_cache_calls_fall_back_to_xla():
    prompt = jnp.asarray(np.random.default_rng(1).integers(1, 61, (B, 6)))
    outs = {}
    for impl in ("xla", "splash"):
        model = Transformer(TransformerConfig(**TINY, attention_impl=impl), rngs=nnx.Rngs(0))
        with splash_interpret():
            outs[impl], _ = nnx.jit(lambda m, ids, c: m.forward(ids, cache=c))(
                model, prompt, init_cache(model.config, B, 8)
            )
    assert _max_diff([outs["splash"]], [outs["xla"]]) == 0.0
