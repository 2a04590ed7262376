"""The one prepared accelerator check (issue 19): train-step speed and MFU against TRL, log-prob and 8B LoRA/QLoRA
memory, and KV-cache generation speed, in one run that prints a markdown table and writes JSON.

Sections (each in its own subprocess, so every peak-memory figure is that section's alone):

0. ``parity``: the suite's GPU-only tests (``GPU_TESTS``: cuDNN attention's values and gradients against the
   einsum path), through pytest; they skip without a GPU.
1. ``step``: the DPO/CPO train step (:func:`cpo_jax.train.step.train_step`, jitted as the trainer does) on a
   Llama-3.2-1B-shaped model with random weights (``configs/shapes/llama-3.2-1b``), bf16, sequence 2048, 4 pairs,
   reference ``separate`` and ``precomputed``, ``attention_impl`` ``xla`` and ``cudnn`` (cuDNN's fused attention
   through ``jax.nn.dot_product_attention(implementation="cudnn")``; each row records the path the call took, and
   the reason of a fallback, from :func:`cpo_jax.ops.attention.plan_attention`). Step time, tokens/s, TFLOP/s and
   MFU (FLOPs of ``train/flops.py``: policy forward + backward, plus the reference forward for ``separate``).
2. ``trl``: TRL's DPOTrainer on the same device, shape, batch and length (bf16, sdpa attention): step time and the
   tokens/s ratio against cpo_jax's ``separate`` + ``cudnn`` step.
3. ``logprobs``: peak device memory (``memory_stats``) of the value-and-grad of summed log-probs, chunked against
   naive, at B=4, T=2048, V=128256, D=2048.
4. ``generate``: KV-cache greedy generation tokens/s at batch 1 and 64 (128-token prompts, 128 new tokens).
5. ``lora8b``: peak memory and step time of a Llama-3.1-8B-shaped step with LoRA r16 (bf16 base) and QLoRA NF4,
   reference = base.

``--dry-run`` runs every section on tiny shapes on the CPU (the default test suite does, so this cannot rot).

    python tools/device_check.py [--dry-run] [--out DIR] [--sections parity,step,trl,logprobs,generate,lora8b]
        [--remat none|full] [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("parity", "step", "trl", "logprobs", "generate", "lora8b")
#: Tests of the suite that skip without a GPU: the device check runs them where one is.
GPU_TESTS = ("tests/test_attention_paths.py::test_cudnn_fused_run_matches_xla_on_a_gpu",)
TINY = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
GIB = 1024**3


def sizes(dry: bool) -> dict:
    """Shapes of every section: the issue's on a device, tiny ones for the dry run."""
    if dry:
        return {
            "length": 64,
            "pairs": 2,
            "steps": 2,
            "warmup": 1,
            "lp": (2, 64, 64, 512),
            "prompt": 8,
            "new": 8,
            "gen_batches": (1, 4),
        }
    return {
        "length": 2048,
        "pairs": 4,
        "steps": 5,
        "warmup": 2,
        "lp": (4, 2048, 2048, 128256),
        "prompt": 128,
        "new": 128,
        "gen_batches": (1, 64),
    }


def hf_config(name: str, dry: bool) -> dict:
    if dry:
        return dict(TINY)
    return json.loads((REPO / "configs" / "shapes" / name / "config.json").read_text())


def peak_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None


def bytes_in_use() -> int | None:
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("bytes_in_use")


def step_gib(memory) -> float | None:
    """The compiled step's own footprint: its arguments, outputs (less those aliased to donated arguments) and
    temporaries, from XLA's buffer assignment. Unlike the process peak it leaves out whatever set-up (random
    initialisation, quantising the base) held before the first step."""
    if memory is None:
        return None
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    return (total + memory.temp_size_in_bytes) / GIB


def synthetic_batch(pairs: int, length: int, vocab: int, *, precomputed: bool, seed: int = 0) -> dict:
    """One micro-batch ``[1, 2P, L]`` in the layout of :mod:`cpo_jax.data.batching`: row ``2p`` chosen, ``2p+1``
    rejected, the first half of each row the prompt, the second half the completion."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = 2 * pairs
    ids = rng.integers(3, vocab, size=(rows, length), dtype=np.int32)
    ids[1::2, : length // 2] = ids[0::2, : length // 2]  # chosen and rejected share the prompt
    targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    loss_mask = np.zeros((rows, length), np.float32)
    loss_mask[:, length // 2 - 1 : length - 1] = 1.0
    batch = {
        "input_ids": ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        "segment_ids": np.ones((rows, length), np.int32),
        "sequence_ids": np.repeat(np.arange(rows, dtype=np.int32)[:, None], length, axis=1),
        "pair_mask": np.ones((pairs,), bool),
        "index": np.arange(pairs, dtype=np.int32),
    }
    if precomputed:
        batch["ref_chosen"] = rng.normal(-3.0 * length, 1.0, size=(pairs,)).astype(np.float32)
        batch["ref_rejected"] = rng.normal(-3.0 * length, 1.0, size=(pairs,)).astype(np.float32)
    return {k: v[None] for k, v in batch.items()}


def time_steps(fn, state, args, steps: int, warmup: int):
    """Median seconds of ``state, metrics = fn(state, *args)`` after ``warmup`` calls (results blocked on)."""
    import jax

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = fn(state, *args)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return state, statistics.median(times)


def train_step_run(
    hf: dict, *, reference: str, attention: str, s: dict, lora: dict | None = None, quantize: str = "none"
) -> dict:
    """Time the jitted train step of one configuration on random weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cpo_jax.hf.pretrained import config_from_hf
    from cpo_jax.models.transformer import Transformer
    from cpo_jax.ops.attention import machine_facts, plan_attention
    from cpo_jax.train import TrainConfig, flops, from_dict
    from cpo_jax.train.loop import adapt_policy
    from cpo_jax.train.optim import learning_rate_schedule, make_optimizer
    from cpo_jax.train.step import init_state, jit_train_step

    model_cfg = {
        "path": "random",
        "dtype": "bfloat16",
        "param_dtype": "bfloat16",
        "attention_impl": attention,
        "scan_layers": True,
        "remat": "full" if lora else s["remat"],
        "quantize": quantize,
    }
    if lora:
        model_cfg["lora"] = lora
    cfg = from_dict(
        TrainConfig,
        {
            "model": model_cfg,
            "loss": {"name": "cpo", "hparams": {"beta": 0.1, "gamma": 0.5}, "reference": reference},
            "data": {"train_files": ["random"], "max_length": s["length"]},
            "optim": {"learning_rate": 1e-6},
            "steps": 100,
        },
    )
    arch = config_from_hf(hf, dtype=jnp.bfloat16, scan_layers=True, remat=model_cfg["remat"], attention_impl=attention)
    model = Transformer(arch, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    adapt_policy(model, cfg)  # as the trainer does: adapters, then the quantised base
    num_params = flops.count_params(model)  # a quantised kernel counts its weights, not its packed codes
    if lora:
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    else:
        (graphdef, trainable), frozen = nnx.split(model), None
    ref = {"model": jax.tree.map(jnp.copy, trainable)} if reference == "separate" else None
    del model
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    state = jax.jit(lambda p: init_state(p, optimizer, 0))({"model": trainable})
    batch = {
        k: jnp.asarray(v)
        for k, v in synthetic_batch(
            s["pairs"], s["length"], arch.vocab_size, precomputed=reference == "precomputed"
        ).items()
    }
    shard = lambda tree: None if tree is None else jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    step = jit_train_step(
        cfg,
        graphdef,
        optimizer,
        learning_rate_schedule(cfg.optim, cfg.steps),
        shard(state),
        shard(batch),
        shard(ref),
        shard(frozen),
    )
    resident = bytes_in_use()  # weights, optimiser state, reference and batch: what the step starts from
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, ref, frozen).compile()
    state, metrics = compiled(state, batch, ref, frozen)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    state, seconds = time_steps(compiled, state, (batch, ref, frozen), s["steps"], s["warmup"])
    memory = compiled.memory_analysis()
    tokens = 2 * s["pairs"] * s["length"]
    step_flops = flops.step_flops(
        arch,
        num_params,
        tokens,
        s["length"],
        reference_forward=reference in ("separate", "base"),
        frozen_base=bool(lora),
    )
    plan = plan_attention(
        attention,
        **machine_facts(),
        padded=True,  # pairs are right-padded to the batch length
        dtype=jnp.bfloat16,
        head_dim=arch.head_dim,
    )
    peak = flops.peak_tflops(jax.devices()[0].device_kind)
    return {
        "reference": reference,
        "attention": attention,
        "remat": model_cfg["remat"],
        "attention_path": plan.path,
        "attention_reason": plan.reason,
        "lora": bool(lora),
        "quantize": quantize,
        "step_s": seconds,
        "compile_s": compile_s,
        "tokens_per_s": tokens / seconds,
        "tflops": step_flops / seconds / 1e12,
        "mfu": step_flops / seconds / (peak * 1e12) if peak else None,
        "loss": float(metrics["loss"]),
        "peak_gib": peak_gib(),
        "resident_gib": None if resident is None else resident / GIB,
        "step_gib": step_gib(memory),
        "params": num_params,
    }


def section_step(s: dict, dry: bool) -> list[dict]:
    """Each configuration in its own process: its own memory peak, and one that fails (out of memory, say) leaves
    the others to run."""
    return [
        run_child("step_one", s, dry, reference=ref, attention=attn)
        for ref in ("separate", "precomputed")
        for attn in ("xla", "cudnn")
    ]


def step_one(s: dict, dry: bool, reference: str, attention: str) -> dict:
    return train_step_run(hf_config("llama-3.2-1b", dry), reference=reference, attention=attention, s=s)


def section_trl(s: dict, dry: bool) -> list[dict]:
    """TRL's DPOTrainer on a torch model of the same shape (random weights), rows of the same length."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    hf = hf_config("llama-3.2-1b", dry)
    cuda = torch.cuda.is_available()
    config = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    # Saved and reloaded: TRL builds its reference model from the policy's name_or_path.
    path = Path(tempfile.mkdtemp(prefix="trl_model_"))
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    tokenizer = _word_tokenizer(PreTrainedTokenizerFast, config.vocab_size)
    tokenizer.save_pretrained(path)
    half = s["length"] // 2 - 2
    words = lambda n, seed: " ".join(
        f"w{(seed * 7919 + i * 104729) % (config.vocab_size - 8)}"  # noqa: E731
        for i in range(n)
    )
    records = [
        {"prompt": words(half, 3 * p), "chosen": words(half, 3 * p + 1), "rejected": words(half, 3 * p + 2)}
        for p in range(s["pairs"] * (s["steps"] + s["warmup"] + 1))
    ]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_"),
        per_device_train_batch_size=s["pairs"],
        gradient_checkpointing=s["remat"] != "none",
        max_length=s["length"],
        max_steps=s["steps"] + s["warmup"],
        learning_rate=1e-6,
        beta=0.1,
        loss_type=["sigmoid"],
        use_cpu=not cuda,
        bf16=cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    seconds = statistics.median(times[s["warmup"] :])
    tokens = 2 * s["pairs"] * s["length"]
    return [
        {
            "step_s": seconds,
            "tokens_per_s": tokens / seconds,
            "torch": torch.__version__,
            "gradient_checkpointing": args.gradient_checkpointing,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        }
    ]


def _word_tokenizer(cls, vocab_size: int):
    """A word-level tokenizer with ``w0 .. w{V-9}`` and specials: one token per word, so rows have exact lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(vocab_size - 8)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return cls(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def section_logprobs(s: dict, dry: bool) -> list[dict]:
    """Peak memory of value-and-grad of summed log-probs, each path in its own process."""
    return [run_child("logprobs_one", s, dry, path=path) for path in ("chunked", "naive")]


def logprobs_one(s: dict, dry: bool, path: str) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO / "tools"))
    from bench_logprobs import chunked_logps, inputs, naive_logps

    b, t, d, v = s["lp"]
    fn = naive_logps if path == "naive" else chunked_logps(1024 if not dry else 16)
    args = inputs(b, t, d, v, jnp.bfloat16, abstract=False)
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    t0 = time.perf_counter()
    jax.block_until_ready(grad(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(grad(*args))
    return {
        "path": path,
        "shape": [b, t, d, v],
        "peak_gib": peak_gib(),
        "first_s": first,
        "step_s": time.perf_counter() - t0,
        "temp_gib": grad.lower(*args).compile().memory_analysis().temp_size_in_bytes / GIB,
    }


def section_parity(s: dict, dry: bool) -> list[dict]:
    """The suite's GPU-only tests (values and gradients of the fused paths against the einsum path), run with pytest
    in a fresh process; on a machine without a GPU they skip, and the row says so."""
    rows = []
    for test in GPU_TESTS:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else proc.stderr[-200:]
        outcome = (
            "passed"
            if proc.returncode == 0 and "passed" in summary
            else "skipped"
            if "skipped" in summary
            else "failed"
        )
        row = {"test": test.split("::")[-1], "outcome": outcome, "summary": summary[-200:]}
        if outcome == "failed":
            row["error"] = (proc.stdout + proc.stderr)[-2000:]
        rows.append(row)
    return rows


def section_generate(s: dict, dry: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cpo_jax.hf.pretrained import config_from_hf
    from cpo_jax.models.generate import generate
    from cpo_jax.models.transformer import Transformer

    arch = config_from_hf(hf_config("llama-3.2-1b", dry), dtype=jnp.bfloat16)
    model = Transformer(arch, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = []
    for batch in s["gen_batches"]:
        ids = jax.random.randint(jax.random.key(batch), (batch, s["prompt"]), 3, arch.vocab_size)
        mask = jnp.ones_like(ids)
        jax.block_until_ready(generate(model, ids, mask, max_new_tokens=s["new"]).tokens)  # compile
        t0 = time.perf_counter()
        result = generate(model, ids, mask, max_new_tokens=s["new"])
        jax.block_until_ready(result.tokens)
        seconds = time.perf_counter() - t0
        out.append(
            {"batch": batch, "new_tokens": s["new"], "seconds": seconds, "tokens_per_s": batch * s["new"] / seconds}
        )
    return out


def section_lora8b(s: dict, dry: bool) -> list[dict]:
    return [run_child("lora8b_one", s, dry, quantize=q) for q in ("none", "nf4")]


def lora8b_one(s: dict, dry: bool, quantize: str) -> dict:
    hf = hf_config("llama-3.1-8b", dry)
    if dry:  # NF4 blocks of 64 need in-features that 64 divides
        hf.update(hidden_size=128, intermediate_size=256, head_dim=32)
    return train_step_run(
        hf, reference="base", attention="cudnn", s=s, lora={"rank": 16, "alpha": 32}, quantize=quantize
    )


def run_child(function: str, s: dict, dry: bool, **kwargs) -> dict:
    """``function(**kwargs)`` of this file in a fresh process (its own device memory peak); its JSON result."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"function": function, "kwargs": kwargs})]
    cmd += ["--remat", s["remat"]]
    if dry:
        cmd.append("--dry-run")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "reason": failure_reason(proc.stderr), **kwargs}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def failure_reason(stderr: str) -> str:
    """One line for the table: the out-of-memory line if there is one, else the last exception line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "RESOURCE_EXHAUSTED" in line or "Out of memory" in line:
            return line[line.find("Out of memory") if "Out of memory" in line else 0 :][:160]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith(("Exception", "Killed"))]
    return (errors or lines or ["no output"])[-1][:160]


def table(results: dict) -> str:
    lines = []
    if "step" in results:
        lines += [
            "| cpo_jax step | reference | attention | remat | step s | tokens/s | TFLOP/s | MFU | step GiB"
            " | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["step"]:
            if "error" in r:
                reason = r.get("reason") or r["error"][-160:]
                lines.append(
                    f"| 1B | {r.get('reference')} | {r.get('attention')} | {r.get('remat', '')} | failed: {reason}"
                    " | | | | | |"
                )
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lines.append(
                f"| 1B | {r['reference']} | {r['attention']} ({r['attention_path']}) | {r['remat']} |"
                f" {r['step_s']:.3f} |"
                f" {r['tokens_per_s']:,.0f} |"
                f" {r['tflops']:.1f} | {mfu} | {_gib(r.get('step_gib'))} | {_gib(r['peak_gib'])} |"
            )
    for name, keys in (
        ("parity", ("test", "outcome", "summary")),
        ("trl", ("gradient_checkpointing", "step_s", "tokens_per_s", "peak_gib")),
        ("logprobs", ("path", "peak_gib", "temp_gib", "step_s")),
        ("generate", ("batch", "tokens_per_s", "seconds")),
        ("lora8b", ("quantize", "step_s", "tokens_per_s", "resident_gib", "step_gib", "peak_gib", "mfu")),
    ):
        if name not in results:
            continue
        lines += ["", f"| {name} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in results[name]:
            lines.append(
                f"| {name} | "
                + " | ".join(_cell(r.get(k)) for k in keys)
                + " |"
                + (f" failed: {r.get('reason') or r['error'][-160:]}" if "error" in r else "")
            )
    if "trl" in results and "step" in results:
        ours = [r for r in results["step"] if r.get("reference") == "separate" and r.get("attention") == "cudnn"]
        if ours and "tokens_per_s" in ours[0] and "tokens_per_s" in results["trl"][0]:
            lines.append(
                f"\ncpo_jax / TRL tokens/s (separate reference, cudnn attention): "
                f"{ours[0]['tokens_per_s'] / results['trl'][0]['tokens_per_s']:.2f}x"
            )
    return "\n".join(lines)


def _gib(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _cell(x) -> str:
    if isinstance(x, float):
        return f"{x:,.3f}"
    return "n/a" if x is None else str(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device_check_out")))
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument(
        "--remat",
        choices=("none", "full"),
        default="none",
        help="activation checkpointing of the full-model step rows, and TRL's gradient_checkpointing to match "
        "(TRL's DPOConfig turns it on by default); the LoRA rows always use full",
    )
    parser.add_argument(
        "--commit",
        help="the commit to record in the header (default: git rev-parse of the checkout; the device tool's copy "
        "carries a .git that can lag the working tree, so pass the commit from where the run was launched)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    s = sizes(args.dry_run) | {"remat": args.remat}
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(globals()[job["function"]](s, args.dry_run, **job["kwargs"])))
        return
    import jax

    device = jax.devices()[0]
    commit = args.commit or (
        subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        or "unknown"
    )
    header = (
        f"{time.strftime('%Y-%m-%d')}, {device.platform} {device.device_kind}, jax {jax.__version__}, "
        f"commit {commit}, remat {args.remat}{' (dry run)' if args.dry_run else ''}"
    )
    results: dict = {}
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; expected some of {SECTIONS}")
        t0 = time.perf_counter()
        if name in ("parity", "step", "logprobs", "lora8b"):
            results[name] = globals()[f"section_{name}"](s, args.dry_run)
        else:
            results[name] = _child_rows(name, s, args.dry_run)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    text = f"{header}\n\n{table(results)}"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps({"header": header, **results}, indent=2, default=str))
    (args.out / "device_check.md").write_text(text + "\n")


def _child_rows(name: str, s: dict, dry: bool) -> list[dict]:
    out = run_child("rows_of", s, dry, section=name)
    return out["rows"] if "rows" in out else [out]


def rows_of(s: dict, dry: bool, section: str) -> dict:
    return {"rows": globals()[f"section_{section}"](s, dry)}


if __name__ == "__main__":
    main()
