"""Device memory of one DPO train step at 8B scale, from XLA's buffer assignment, without allocating the model.

The real jitted :func:`cpo_jax.train.step.train_step` is lowered on abstract shapes (``jax.ShapeDtypeStruct``) of
a Llama-3-8B-shaped model (or any HF ``config.json``) and compiled for this machine's backend; the compiled
executable's ``memory_analysis()`` gives the bytes of its arguments (parameters, optimiser state, frozen base,
reference, batch), outputs and temporaries (activations, gradients). Nothing of model size is allocated, so this runs
on a laptop CPU; on a GPU it reports the GPU compiler's figure. The CPU compiler's temporaries are an estimate of the
GPU's: fusion and remat decisions differ, so treat the total as a guide within some tens of percent, and the
argument bytes (weights, optimiser state) as exact.

Configurations: full fine-tuning with a separate reference (as TRL's DPOTrainer without PEFT), LoRA with the base as
the reference (no second copy), and QLoRA (nf4/int8 base) where :mod:`cpo_jax.models.quantize` exists.

Usage::

    python tools/estimate_step_memory.py [--config llama3-8b|DIR] [--pairs 1] [--length 2048] [--rank 16]
        [--modes full,lora,qlora-nf4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

LLAMA3_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
GIB = 1024**3


def _hf_config(name: str) -> dict:
    if name == "llama3-8b":
        return dict(LLAMA3_8B)
    return json.loads((Path(name) / "config.json").read_text())


def _batch(pairs: int, length: int):
    import jax
    import jax.numpy as jnp

    from cpo_jax.data.batching import ROW_KEYS

    rows = 2 * pairs
    batch = {k: jax.ShapeDtypeStruct((1, rows, length), jnp.dtype(v)) for k, v in ROW_KEYS.items()}
    batch["pair_mask"] = jax.ShapeDtypeStruct((1, pairs), jnp.bool_)
    batch["index"] = jax.ShapeDtypeStruct((1, pairs), jnp.int32)
    return batch


def measure(hf: dict, mode: str, *, pairs: int, length: int, rank: int) -> dict:
    """Compile one train step of ``mode`` (``full``, ``lora``, ``qlora-nf4``, ``qlora-int8``) and read its memory."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cpo_jax.hf.peft import add_adapter
    from cpo_jax.hf.pretrained import config_from_hf
    from cpo_jax.models.lora import LoraSpec
    from cpo_jax.models.transformer import Transformer
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.optim import learning_rate_schedule, make_optimizer
    from cpo_jax.train.step import init_state, train_step

    arch = config_from_hf(hf, dtype=jnp.bfloat16, scan_layers=True, remat="full")
    adapters = mode != "full"
    model_cfg = {"path": "x", "dtype": "bfloat16", "param_dtype": "bfloat16", "scan_layers": True, "remat": "full"}
    if adapters:
        model_cfg["lora"] = {"rank": rank, "alpha": 2 * rank}
    cfg = from_dict(
        TrainConfig,
        {"model": model_cfg, "data": {"train_files": ["x"], "max_length": length}, "optim": {"learning_rate": 1e-5}},
    )

    def build():
        model = Transformer(arch, rngs=nnx.Rngs(0))
        if mode.startswith("qlora"):
            from cpo_jax.models.quantize import quantize_model

            quantize_model(model, mode.split("-")[1])
        if adapters:
            add_adapter(model, LoraSpec(rank=rank, alpha=2 * rank), rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    # Weights as from_pretrained(param_dtype=bfloat16) loads them (quantised codes keep their integer types).
    bf16 = lambda s: (
        jax.ShapeDtypeStruct(s.shape, jnp.bfloat16)  # noqa: E731
        if jnp.issubdtype(s.dtype, jnp.floating)
        else s
    )
    nnx.update(model, jax.tree.map(bf16, nnx.state(model)))
    if adapters:
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
        ref = None
    else:
        graphdef, trainable = nnx.split(model)
        frozen, ref = None, {"model": trainable}
    optimizer = make_optimizer(cfg.optim, 100)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), {"model": trainable})
    step = functools.partial(
        train_step, cfg=cfg, graphdef=graphdef, optimizer=optimizer, schedule=learning_rate_schedule(cfg.optim, 100)
    )
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, _batch(pairs, length), ref, frozen).compile()
    stats = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    return {
        "mode": mode,
        "compile_s": time.perf_counter() - t0,
        "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
        "weights_gib": (nbytes(trainable) + nbytes(frozen) + nbytes(ref)) / GIB,
        "optimizer_gib": nbytes(state.opt_state) / GIB,
        "arguments_gib": stats.argument_size_in_bytes / GIB,
        "temporaries_gib": stats.temp_size_in_bytes / GIB,
        "outputs_gib": stats.output_size_in_bytes / GIB,
        "aliased_gib": stats.alias_size_in_bytes / GIB,
        "peak_gib": (
            stats.argument_size_in_bytes
            + stats.temp_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
        )
        / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama3-8b")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import jax

    hf = _hf_config(args.config)
    rows = [measure(hf, mode, pairs=args.pairs, length=args.length, rank=args.rank) for mode in args.modes.split(",")]
    print(
        f"{args.config}, {args.pairs} pair(s) x {args.length} tokens, bf16, remat full, scan; "
        f"backend {jax.default_backend()}"
    )
    print("| mode | trainable params | weights GiB | optimiser GiB | arguments GiB | temporaries GiB | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['trainable_params'] / 1e6:,.1f}M | {r['weights_gib']:.2f} | "
            f"{r['optimizer_gib']:.2f} | {r['arguments_gib']:.2f} | {r['temporaries_gib']:.2f} | "
            f"{r['peak_gib']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
