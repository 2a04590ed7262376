"""Collectives of the compiled train step on the 8-CPU-device mesh: the counter on hand-written HLO (closed form),
the activation constraints (a no-op without a mesh context, and unable to change a result), and a regression bound
on the collectives of the step in each layout of ``tools/count_collectives.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpo_jax.parallel import activation_sharding, constrain, make_mesh
from cpo_jax.parallel.hlo import KINDS, collective_bytes, collectives, count_collectives, shape_bytes
from tools.count_collectives import LAYOUTS, MOE_LAYOUTS, compiled_text, setup_step

# What one step of the DPO step (tiny Llama, 8 pairs x 64 tokens, separate reference, AdamW) executes with the
# activation constraints on, measured at 2026-11-29 (jax 0.10.2, XLA:CPU, 8 host devices): per kind, collectives
# executed (``count_collectives(text, executed=True)``), and the bytes they produce per device, summed over kinds.
# The test fails when a count or the bytes grow. To update after a change that lowers them (or one that must raise
# them, with the reason in docs/benchmarks.md), run
#   XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/count_collectives.py --only constrained
# (add --scan for the "+scan" entries: scan_layers, where a collective in the layer loop counts once per layer)
# and copy each layout's "counts" and the sum of its "bytes" here.
BASELINE = {
    "fsdp8": {
        "counts": {"all-gather": 33, "all-reduce": 21, "reduce-scatter": 0, "all-to-all": 3, "collective-permute": 11},
        "bytes": 1_189_916,
    },
    "fsdp4_tensor2": {
        "counts": {"all-gather": 35, "all-reduce": 41, "reduce-scatter": 0, "all-to-all": 3, "collective-permute": 14},
        "bytes": 2_153_688,
    },
    "data2_fsdp4": {
        "counts": {"all-gather": 35, "all-reduce": 11, "reduce-scatter": 0, "all-to-all": 2, "collective-permute": 11},
        "bytes": 1_439_772,
    },
    "expert4_fsdp2": {
        "counts": {
            "all-gather": 326,
            "all-reduce": 174,
            "reduce-scatter": 0,
            "all-to-all": 8,
            "collective-permute": 48,
        },
        "bytes": 17_729_720,
    },
    "fsdp8+scan": {
        "counts": {"all-gather": 47, "all-reduce": 9, "reduce-scatter": 0, "all-to-all": 3, "collective-permute": 11},
        "bytes": 1_484_709,
    },
}
DEFAULT_LAYOUT = "fsdp8"
LAYOUT_PARAMS = [
    pytest.param(name, marks=() if name == DEFAULT_LAYOUT else pytest.mark.slow, id=name) for name in LAYOUTS
]


@pytest.fixture(autouse=True)
def _eight_devices(request):
    if "layout" in request.fixturenames and jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")


# ------------------------------------------------------------------------------------------------------------------
# The counter, on hand-written HLO
HLO = """\
HloModule jit_step, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %m = f32[8,8]{1,0} multiply(%p0, %p1)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %all-reduce.7 = f32[4,8]{1,0} all-reduce(%x), channel_id=5, replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %all-reduce.7)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%never (p: f32[2,8]) -> f32[2,8] {
  %p = f32[2,8]{1,0} parameter(0)
  ROOT %cp = f32[2,8]{1,0} collective-permute(%p), channel_id=9, source_target_pairs={{0,1}}
}

ENTRY %main.1 (x: f32[2,8], y: bf16[16], z: f32[4,8]) -> f32[8,8] {
  %x = f32[2,8]{1,0} parameter(0)
  %y = bf16[16]{0} parameter(1)
  %z = f32[4,8]{1,0} parameter(2)
  %all-gather = f32[8,8]{1,0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%x), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  %ars = bf16[16]{0} all-reduce-start(%y), channel_id=3, replica_groups={{0,1}}, to_apply=%add
  %ard = bf16[16]{0} all-reduce-done(%ars)
  rs = bf16[4]{0} reduce-scatter(%ard), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %a2a = (f32[2,8]{1,0}, f32[2,8]{1,0}) all-to-all(%x, %x), channel_id=6, replica_groups={{0,1}}
  %cps = (f32[2,8]{1,0}, f32[2,8]{1,0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %cpd = f32[2,8]{1,0} collective-permute-done(%cps)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}) tuple(%zero, %z)
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %f = f32[8,8]{1,0} fusion(%all-gather, %agd), kind=kLoop, calls=%fused
}
"""


def test_count_collectives_closed_form():
    # async pairs once (at -done), operands named "all-gather" not counted, the "%" optional
    assert count_collectives(HLO) == {
        "all-gather": 2,
        "all-reduce": 2,
        "reduce-scatter": 1,
        "all-to-all": 1,
        "collective-permute": 2,
    }
    # one run: the loop body's all-reduce 3 times, the never-called computation's permute not at all
    assert count_collectives(HLO, executed=True) == {
        "all-gather": 2,
        "all-reduce": 1 + 3,
        "reduce-scatter": 1,
        "all-to-all": 1,
        "collective-permute": 1,
    }
    f32_2x8 = 2 * 8 * 4
    assert collective_bytes(HLO) == {
        "all-gather": 2 * 8 * 8 * 4,
        "all-reduce": 16 * 2 + 4 * 8 * 4,
        "reduce-scatter": 4 * 2,
        "all-to-all": 2 * f32_2x8,
        "collective-permute": 2 * f32_2x8,
    }
    assert collective_bytes(HLO, executed=True)["all-reduce"] == 16 * 2 + 3 * 4 * 8 * 4
    assert collective_bytes(HLO, executed=True)["collective-permute"] == f32_2x8
    assert {(c.opcode, c.computation, c.executions) for c in collectives(HLO) if c.kind == "all-reduce"} == {
        ("all-reduce-done", "main.1", 1),
        ("all-reduce", "body", 3),
    }


def test_shape_bytes_closed_form():
    assert shape_bytes("f32[8,16]{1,0}") == 512
    assert shape_bytes("(f32[2]{0}, bf16[4]{0})") == 16
    assert shape_bytes("pred[]") == 1 and shape_bytes("f32[]") == 4
    assert shape_bytes("s4[3]{0}") == 2  # 12 bits, rounded up to whole bytes
    assert shape_bytes("(token[], f32[2,0]{1,0})") == 0


def test_counter_reads_a_real_compiled_module():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = make_mesh({"fsdp": 8}, jax.devices()[:8])
    sharding = jax.sharding.NamedSharding(mesh, P("fsdp", None))
    a = jax.device_put(jnp.ones((64, 32)), sharding)
    b = jax.device_put(jnp.ones((32, 16)), sharding)
    text = jax.jit(lambda a, b: jnp.sum(a @ b, axis=0)).lower(a, b).compile().as_text()
    counts = count_collectives(text)
    assert counts["all-gather"] + counts["all-reduce"] >= 1  # b is gathered (or partial sums reduced)
    assert counts["all-reduce"] >= 1  # the sum over the sharded rows


# ------------------------------------------------------------------------------------------------------------------
# constrain()
def test_constrain_is_a_no_op_without_activation_sharding():
    x = jnp.ones((8, 4, 16))
    names = ("batch", "length", "embed")
    assert constrain(x, names) is x
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda a: constrain(a, names))(x))
    if jax.device_count() < 8:
        return
    mesh = make_mesh({"data": 2, "fsdp": 4}, jax.devices()[:8])
    with jax.set_mesh(mesh):  # a mesh alone, without the rules: still a no-op
        assert constrain(x, names) is x
    with activation_sharding(mesh):
        assert "sharding_constraint" in str(jax.make_jaxpr(lambda a: constrain(a, names))(x))
        out = jax.jit(lambda a: constrain(a * 2, names))(x)
        with pytest.raises(ValueError, match="do not match"):
            constrain(x, ("batch", "embed"))
        # 3 rows do not divide over (data, fsdp): they stay whole, and "embed" takes the fsdp axis the batch left
        odd = jax.jit(lambda a: constrain(a + 1, names))(jnp.ones((3, 4, 16)))
    assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.ones((8, 4, 16)))
    assert odd.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(None, None, "fsdp")), 3)
    assert constrain(x, names) is x  # the context is gone


# ------------------------------------------------------------------------------------------------------------------
# The train step
@pytest.mark.parametrize("layout", [*LAYOUT_PARAMS, pytest.param("fsdp8+scan", marks=pytest.mark.slow)])
def test_step_collectives_do_not_regress(layout):
    mesh, scan = layout.removesuffix("+scan"), layout.endswith("+scan")
    text = compiled_text(setup_step(LAYOUTS[mesh], moe=mesh in MOE_LAYOUTS, scan_layers=scan))
    counts = count_collectives(text, executed=True)
    total = sum(collective_bytes(text, executed=True).values())
    want = BASELINE[layout]
    grown = {k: f"{want['counts'][k]} -> {counts[k]}" for k in KINDS if counts[k] > want["counts"][k]}
    assert not grown, f"{layout}: more collectives per step than the baseline: {grown} (all: {counts})"
    assert total <= want["bytes"], f"{layout}: collectives produce {total} bytes per device, baseline {want['bytes']}"


def _leaves(tree) -> list[np.ndarray]:
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]  # copies: the step donates the state


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_constrained_sharded_step_equals_single_device(layout):
    """Two steps of SGD with learning rate 1 and no clipping: each update is minus the gradient, so comparing the
    parameters after each step compares the gradients of the sharded step (constraints on) and the single-device
    one. The first step's loss is log 2 whatever the weights (the reference is the policy); the second's is not."""
    moe = layout in MOE_LAYOUTS
    single = setup_step({"fsdp": 1}, moe=moe, optimizer="sgd", constrained=False, devices=jax.devices()[:1])
    sharded = setup_step(LAYOUTS[layout], moe=moe, optimizer="sgd")
    runs = []
    for setup in (single, sharded):
        state, history = setup.state, [(None, _leaves(setup.state.params))]
        for _ in range(2):
            state, metrics = setup.call(state)
            history.append((jax.device_get(metrics), _leaves(state.params)))
        runs.append(history)
    (want, got) = runs
    for x, y in zip(got[0][1], want[0][1]):
        np.testing.assert_array_equal(x, y)  # the same initial weights
    for step in (1, 2):
        (m_want, p_want), (m_got, p_got) = want[step], got[step]
        assert m_got["finite"] and m_want["finite"]
        np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=1e-5)
        np.testing.assert_allclose(m_got["grad_norm"], m_want["grad_norm"], rtol=1e-5)
        grads_want = [a - b for a, b in zip(want[step - 1][1], p_want)]
        grads_got = [a - b for a, b in zip(got[step - 1][1], p_got)]
        scale = max(float(np.abs(g).max()) for g in grads_want)
        assert scale > 0
        for g, w in zip(grads_got, grads_want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)
    assert abs(float(want[2][0]["loss"]) - np.log(2)) > 1e-3  # the second step measures a real loss
