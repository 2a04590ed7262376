"""Benchmark: chunked log-probs from hidden states vs the naive log_softmax path.

Measures, for ``value_and_grad`` of the summed completion log-probs w.r.t. the hidden states and
the unembedding (what a training step needs), and for the forward pass alone:

* the XLA compiled memory statistics (temporary, argument and output bytes): exact on every
  backend, and all we can get on the CPU;
* on GPU/TPU, the allocator's peak bytes in use (``device.memory_stats()``);
* wall time (median of ``--repeats`` runs after one warm-up).

Default sizes are the brief's: B = 4, T = 2048, V = 128256 (Llama 3), D = 2048, bf16. On a
2-core CPU one naive value-and-grad at that size takes minutes, so ``--time-length`` lets the
timing run on shorter sequences while memory is still compiled at full size.

    python tools/bench_logprobs.py                      # memory at full size, timing at full size
    python tools/bench_logprobs.py --time-length 256    # CPU-friendly timing
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from cpo_jax import ops

GIB = 1024**3


def naive_logps(hidden, unembedding, targets, mask):
    """Full [B, T, V] logits in the compute dtype, then a float32 log_softmax."""
    logits = jnp.einsum("btd,dv->btv", hidden, unembedding)
    return jnp.sum(ops.sequence_logps(logits, targets, mask).sum)


def chunked_logps(chunk_size):
    def fn(hidden, unembedding, targets, mask):
        return jnp.sum(ops.sequence_logps_from_hidden(hidden, unembedding, targets, mask, chunk_size=chunk_size).sum)

    return fn


def inputs(batch, length, dim, vocab, dtype, *, abstract):
    shapes = {
        "hidden": ((batch, length, dim), dtype),
        "unembedding": ((dim, vocab), dtype),
        "targets": ((batch, length), jnp.int32),
        "mask": ((batch, length), jnp.float32),
    }
    if abstract:
        return tuple(jax.ShapeDtypeStruct(s, d) for s, d in shapes.values())
    keys = jax.random.split(jax.random.key(0), 2)
    hidden = jax.random.normal(keys[0], shapes["hidden"][0], dtype)
    unembedding = (jax.random.normal(keys[1], shapes["unembedding"][0]) * dim**-0.5).astype(dtype)
    targets = jax.random.randint(keys[0], (batch, length), 0, vocab)
    return hidden, unembedding, targets, jnp.ones((batch, length), jnp.float32)


def compiled_memory(fn, args) -> dict[str, float]:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    temp = stats.temp_size_in_bytes
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + temp
    return {"temp_gib": temp / GIB, "peak_gib": total / GIB}


def time_it(fn, args, repeats) -> float:
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-size", type=int, default=ops.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--time-length", type=int, default=None, help="sequence length for timing (default: --length)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-time", action="store_true", help="only report compiled memory")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(
        f"B={args.batch} T={args.length} D={args.dim} V={args.vocab} dtype={args.dtype} chunk={args.chunk_size}; "
        f"one [B,T,V] float32 buffer = {args.batch * args.length * args.vocab * 4 / GIB:.2f} GiB"
    )
    paths = {"naive": naive_logps, "chunked": chunked_logps(args.chunk_size)}
    abstract = inputs(args.batch, args.length, args.dim, args.vocab, dtype, abstract=True)
    print(f"\ncompiled memory at T={args.length} (GiB)")
    print(f"{'path':<8} {'mode':<15} {'temp':>8} {'peak':>8}")
    for name, fn in paths.items():
        for mode, wrapped in (("forward", fn), ("value_and_grad", jax.value_and_grad(fn, argnums=(0, 1)))):
            mem = compiled_memory(wrapped, abstract)
            print(f"{name:<8} {mode:<15} {mem['temp_gib']:>8.3f} {mem['peak_gib']:>8.3f}")

    if args.no_time:
        return
    length = args.time_length or args.length
    concrete = inputs(args.batch, length, args.dim, args.vocab, dtype, abstract=False)
    tokens = args.batch * length
    print(f"\nwall time at T={length} (median of {args.repeats}, seconds)")
    print(f"{'path':<8} {'mode':<15} {'seconds':>9} {'TFLOP/s':>8} {'device peak GiB':>16}")
    for name, fn in paths.items():
        for mode, wrapped, matmuls in (
            ("forward", fn, 1),
            ("value_and_grad", jax.value_and_grad(fn, argnums=(0, 1)), 3 if name == "naive" else 4),
        ):
            seconds = time_it(wrapped, concrete, args.repeats)
            flops = matmuls * 2 * tokens * args.dim * args.vocab
            peak = device_peak_gib()
            peak_text = "n/a (CPU)" if peak is None else f"{peak:.2f}"
            print(f"{name:<8} {mode:<15} {seconds:>9.3f} {flops / seconds / 1e12:>8.2f} {peak_text:>16}")


if __name__ == "__main__":
    main()
