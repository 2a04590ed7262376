"""Time the jitted DPO/CPO train step, and TRL's DPOTrainer on the same model, data and batch.

Both run in this one process, one after the other, on the same checkpoint (policy + frozen reference,
float32 unless --dtype says otherwise), the bundled arithmetic + chat data, the same pairs per step and
max_length. Reported: median step time after warm-up, tokens/s (real tokens, no padding), achieved
TFLOP/s and MFU (``cpo_jax/train/flops.py``: 6N + 2N per token for policy fwd/bwd + reference fwd, plus
attention), and peak memory (device memory stats where the backend has them, else the process's peak RSS).

Usage::

    python tools/bench_train_step.py [--model tiny|smollm2|DIR] [--pairs 4] [--max-length 256]
        [--steps 6] [--mesh data=-1,fsdp=1,tensor=1] [--dtype float32|bfloat16] [--no-trl] [--lora RANK]

TRL comes from the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

WARMUP = 2


def _tiny_model(root: Path) -> Path:
    """A 4-layer, D=256 Llama with the byte tokenizer (vocab 260)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cpo_jax.data import byte_chat_tokenizer

    path = root / "tiny-llama-d256"
    if not (path / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=260,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=3,
            pad_token_id=0,
        )
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        byte_chat_tokenizer().save_pretrained(path)
    return path


def _peak_memory_gib() -> tuple[float, str]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def _lora(args) -> dict:
    """The model.lora section of ``--lora RANK`` (alpha = 2 * rank, every decoder projection), or nothing."""
    return {"lora": {"rank": args.lora, "alpha": 2 * args.lora}} if args.lora else {}


def bench_ours(path: Path, data: Path, args) -> dict:
    import jax

    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.trainer import Trainer

    mesh = dict(item.split("=") for item in args.mesh.split(","))
    out = Path(tempfile.mkdtemp(prefix="bench_ours_"))
    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(out),
            "model": {"path": str(path), "dtype": args.dtype, **_lora(args)},
            "data": {"train_files": [str(data)], "max_length": args.max_length, "pairs_per_batch": args.pairs},
            "loss": {"name": "sigmoid", "hparams": {"beta": 0.1}, "reference": "base" if args.lora else "separate"},
            "optim": {"learning_rate": 1e-6},
            "steps": WARMUP + args.steps,
            "save_every": 10**9,
            "progress_bar": False,
            "tensorboard": False,
            "export_hf": False,
            "mesh": {k: int(v) for k, v in mesh.items()},
            "peak_tflops_per_device": args.peak_tflops,
        },
    )
    trainer = Trainer(cfg)
    history = trainer.run().history[WARMUP:]
    times = [h["step_time"] for h in history]
    tokens = statistics.mean(h["tokens"] for h in history)
    mem, kind = _peak_memory_gib()
    return {
        "step_time": statistics.median(times),
        "tokens": tokens,
        "tflops": statistics.median(h["tflops_per_sec"] for h in history),
        "mfu": statistics.median(h["mfu"] for h in history) if "mfu" in history[0] else None,
        "memory": f"{mem:.2f} GiB ({kind})",
        "devices": jax.device_count(),
    }


def bench_trl(path: Path, data: Path, args, tokens_per_step: float) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from cpo_jax.data import load_records

    records = load_records(data).records
    dataset = datasets.Dataset.from_list(records)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=args.pairs,
        max_length=args.max_length,
        max_steps=WARMUP + args.steps,
        learning_rate=1e-6,
        beta=0.1,
        loss_type=["sigmoid"],
        use_cpu=not torch.cuda.is_available(),
        bf16=args.dtype == "bfloat16",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    peft_config = None
    if args.lora:  # TRL's PEFT path: adapters on every linear projection, the reference = adapters disabled
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear", lora_dropout=0.0)
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Timer()],
        peft_config=peft_config,
    )
    trainer.train()
    step = statistics.median(times[WARMUP:])
    return {"step_time": step, "tokens": tokens_per_step, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak, for MFU on unknown devices")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning); TRL runs with PEFT")
    args = parser.parse_args()

    import jax

    from cpo_jax.data import arithmetic_preferences, tiny_chat, write_jsonl
    from cpo_jax.hf.resolve import cache_dir, resolve_model_path

    path = _tiny_model(cache_dir()) if args.model == "tiny" else resolve_model_path(args.model)
    data = write_jsonl(arithmetic_preferences(400, seed=0) + tiny_chat() * 4, Path(tempfile.mkdtemp()) / "d.jsonl")
    ours = bench_ours(path, data, args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = jax.devices()[0]
    print(
        f"model {path.name}, {'LoRA r%d, ' % args.lora if args.lora else 'full fine-tuning, '}"
        f"{args.pairs} pairs x max_length {args.max_length}, {args.dtype}, mesh {args.mesh} "
        f"({ours['devices']} {device.platform} device(s): {device.device_kind}), commit {commit}"
    )
    print("| framework | step (s) | tokens/s | TFLOP/s | MFU | memory |")
    print("|---|---|---|---|---|---|")
    mfu = f"{ours['mfu']:.1%}" if ours["mfu"] is not None else "n/a"
    print(
        f"| cpo_jax | {ours['step_time']:.3f} | {ours['tokens'] / ours['step_time']:,.0f} | {ours['tflops']:.3f} | "
        f"{mfu} | {ours['memory']} |"
    )
    if not args.no_trl:
        trl = bench_trl(path, data, args, ours["tokens"])
        flops_per_sec = ours["tflops"] * ours["step_time"] / trl["step_time"]
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"| TRL DPOTrainer ({trl['threads']} torch threads) | {trl['step_time']:.3f} | "
            f"{trl['tokens'] / trl['step_time']:,.0f} | {flops_per_sec:.3f} | n/a | {mem:.2f} GiB (process peak "
            f"RSS, both runs) |"
        )
        print(f"speed-up (TRL step time / cpo_jax step time): {trl['step_time'] / ours['step_time']:.2f}x")


if __name__ == "__main__":
    main()
