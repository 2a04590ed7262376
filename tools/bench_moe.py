"""Benchmark: one MoE layer's experts, grouped (sorted by expert) vs a dense all-experts reference.

For ``N`` tokens, ``E`` experts, top-``k`` routing, model width ``D`` and expert width ``F``:

* ``dense``: every expert on every token (``einsum`` over ``[E, N, D]``), combined with the mostly-zero routing
  weights: ``6 N E D F`` FLOPs, the cost a capacity-free MoE must avoid.
* ``blocked``: :func:`cpo_jax.models.moe.sparse_moe` with ``impl="blocked"``: tokens sorted by expert, each
  expert's rows padded to ``--block`` rows, a scan over blocks (empty ones skipped): ``6 D F * sum_e ceil(g_e / B) B``
  FLOPs, ``g_e`` the tokens routed to expert ``e`` (``sum_e g_e = N k``).
* ``ragged``: the same with :func:`jax.lax.ragged_dot`. On TPU that is a native grouped matmul (``6 N k D F``);
  XLA's CPU lowering masks the sorted rows into a dense ``[E, N k, D]`` product, ``6 N k E D F`` FLOPs.

The FLOPs column is that count for the routing of the random inputs; ``XLA FLOPs`` is the compiled module's
cost analysis (it counts a loop body once, so it undercounts ``blocked``). Time is the median of ``--repeats`` runs
after a warm-up (forward only, or value-and-grad with ``--grad``).

    python tools/bench_moe.py                       # E=8, top-2, D=512, F=1024, 4096 tokens, float32, CPU
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/bench_moe.py --expert-parallel 8 --grad

``--expert-parallel N`` also times the blocked path with the experts sharded over an ``expert`` mesh axis of ``N``
devices (the tokens sharded over the same axis, as the trainer's ``batch`` rule does with ``mesh.expert``), against
the same computation on one device, twice: traced without a mesh context (GSPMD partitions the layer), and inside
:func:`cpo_jax.parallel.activation_sharding` as the trainers trace their steps (the explicit ``shard_map`` path of
:mod:`cpo_jax.models.moe`: local experts, one ``psum``). It counts the collectives one run executes and their bytes
(:mod:`cpo_jax.parallel.hlo`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.models.moe import route, sparse_moe


def dense_moe(x, router, gate, up, down, *, top_k):
    weights, experts, probs = route(x @ router, top_k, normalize=True)
    dense_w = jnp.zeros_like(probs).at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate)) * jnp.einsum("nd,edf->enf", x, up)
    return jnp.einsum("ne,end->nd", dense_w, jnp.einsum("enf,efd->end", h, down))


def grouped_moe(impl, block):
    def fn(x, router, gate, up, down, *, top_k):
        return sparse_moe(x, router, gate, up, down, top_k=top_k, normalize=True, impl=impl, block_size=block)[0]

    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grad", action="store_true", help="time value_and_grad w.r.t. the input and the experts")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--expert-parallel", type=int, default=0, metavar="N", help="also time experts sharded on N devices"
    )
    args = parser.parse_args()

    n, e, k, d, f = args.tokens, args.experts, args.top_k, args.dim, args.ffn
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d), dtype)
    router = (jax.random.normal(keys[1], (d, e)) * d**-0.5).astype(dtype)
    gate, up = ((jax.random.normal(kk, (e, d, f)) * d**-0.5).astype(dtype) for kk in keys[2:4])
    down = (jax.random.normal(keys[4], (e, f, d)) * f**-0.5).astype(dtype)
    operands = (x, router, gate, up, down)

    _, experts, _ = route(x @ router, k, normalize=True)
    groups = np.bincount(np.asarray(experts).ravel(), minlength=e)
    padded_rows = int(np.sum(-(-groups // args.block) * args.block))
    per_row = 6 * d * f  # gate, up and down matmuls, 2 FLOPs per multiply-add
    flops = {"dense": per_row * n * e, "blocked": per_row * padded_rows}
    flops["ragged"] = per_row * n * k * (e if jax.default_backend() != "tpu" else 1)
    if args.grad:  # the backward pass multiplies twice per forward matmul (input and weight gradients)
        flops = {name: 3 * count for name, count in flops.items()}

    variants = {
        "dense": dense_moe,
        "blocked": grouped_moe("blocked", args.block),
        "ragged": grouped_moe("ragged", args.block),
    }
    outputs, rows = {}, []
    for name, fn in variants.items():
        forward = jax.tree_util.Partial(fn, top_k=k)
        if args.grad:
            run = jax.jit(
                jax.value_and_grad(lambda *a, g=forward: jnp.sum(g(*a).astype(jnp.float32)), argnums=(0, 2, 3, 4))
            )
        else:
            run = jax.jit(forward)
        compiled = run.lower(*operands).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        outputs[name] = jax.block_until_ready(compiled(*operands))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*operands))
            times.append(time.perf_counter() - start)
        rows.append((name, flops[name], float(cost.get("flops", float("nan"))), statistics.median(times)))

    pick = (lambda out: out[1][0]) if args.grad else (lambda out: out)  # d(sum)/dx with --grad, else the output
    ref = pick(outputs["dense"])
    useful = per_row * n * k * (3 if args.grad else 1)
    print(
        f"MoE experts, {jax.default_backend()}, {args.dtype}: N={n} tokens, E={e}, top-{k}, D={d}, F={f}, "
        f"block {args.block}; {'value_and_grad' if args.grad else 'forward'}; tokens per expert {groups.tolist()}; "
        f"useful FLOPs {'3 x ' if args.grad else ''}6NkDF = {useful / 1e9:.1f} G\n"
    )
    diff_of = "dx" if args.grad else "output"
    print(f"| path | FLOPs (G) | XLA FLOPs (G) | time (ms) | speed-up vs dense | max abs diff of {diff_of} vs dense |")
    print("|---|---|---|---|---|---|")
    dense_time = rows[0][3]
    for name, count, xla, seconds in rows:
        out = pick(outputs[name])
        diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        print(
            f"| {name} | {count / 1e9:.1f} | {xla / 1e9:.1f} | {seconds * 1e3:.0f} | {dense_time / seconds:.2f}x | "
            f"{diff:.1e} |"
        )

    if args.expert_parallel:
        expert_parallel(args, operands, variants["blocked"], k)


def _timed(compiled, operands, repeats):
    jax.block_until_ready(compiled(*operands))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*operands))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def expert_parallel(args, operands, fn, k):
    """The blocked MoE layer with experts (and tokens) sharded over ``args.expert_parallel`` devices vs one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from cpo_jax.parallel import activation_sharding, make_mesh
    from cpo_jax.parallel.hlo import KINDS, collective_bytes, count_collectives

    n = args.expert_parallel
    if len(jax.devices()) < n:
        raise SystemExit(
            f"--expert-parallel {n} needs {n} devices, found {len(jax.devices())}; on the CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    mesh = make_mesh({"expert": n}, devices=jax.devices()[:n])
    specs = (P("expert", None), P(), P("expert"), P("expert"), P("expert"))  # x, router, gate, up, down
    forward = jax.tree_util.Partial(fn, top_k=k)
    if args.grad:
        body = jax.value_and_grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)), argnums=(0, 2, 3, 4))
    else:
        body = forward
    single = jax.jit(body).lower(*operands).compile()
    placed = tuple(jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(operands, specs))
    gspmd = jax.jit(body).lower(*placed).compile()  # no mesh context: GSPMD partitions the layer
    with activation_sharding(mesh):  # the trainers' context: the shard_map path of cpo_jax.models.moe
        manual = jax.jit(body).lower(*placed).compile()
    t1 = _timed(single, operands, args.repeats)
    out1 = single(*operands)
    reference = out1[1][0] if args.grad else out1
    print(f"\nexpert parallel, blocked path, {'value_and_grad' if args.grad else 'forward'}:")
    print(
        "| layout | time (ms) | "
        + " | ".join(f"{kind} (n / KiB)" for kind in KINDS)
        + f" | max abs diff of {'dx' if args.grad else 'output'} |"
    )
    print("|---|---|" + "---|" * len(KINDS) + "---|")
    print(f"| 1 device | {t1 * 1e3:.0f} | " + " | ".join("0" for _ in KINDS) + " | - |")
    for name, compiled in ((f"expert={n}, GSPMD", gspmd), (f"expert={n}, shard_map", manual)):
        counts = count_collectives(compiled.as_text(), executed=True)
        sizes = collective_bytes(compiled.as_text(), executed=True)
        out = compiled(*placed)
        got = out[1][0] if args.grad else out
        diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - reference.astype(jnp.float32))))
        cells = " | ".join(f"{counts[kind]} / {sizes[kind] / 1024:,.0f}" for kind in KINDS)
        print(f"| {name} | {_timed(compiled, placed, args.repeats) * 1e3:.0f} | {cells} | {diff:.1e} |")


if __name__ == "__main__":
    main()
