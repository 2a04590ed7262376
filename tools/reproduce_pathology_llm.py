"""The paper's failure mode on a real language model (issue 7, Part B): SmolLM2-135M-Instruct, verifiable arithmetic.

    python tools/reproduce_pathology_llm.py all --update-docs   # mine, audit, train 5 runs, report
                                                                # (~50 min on 2 CPU cores)
    python tools/reproduce_pathology_llm.py mine                # 1. score candidate wrong answers with the reference
    python tools/reproduce_pathology_llm.py train               # 2. cpo-jax audit + cpo-jax train for every config
    python tools/reproduce_pathology_llm.py report              # 3. curves + table from the runs' metrics

Mining keeps the problems on which SmolLM2 itself prefers a wrong answer (delta_ref < 0 in summed and in per-token
average log-probs) and, for contrast, problems where it prefers the correct one. Every run trains with the same
budget from the same reference, with the configs in ``configs/paper/``, through the ``cpo-jax`` command line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "paper_llm"
DATA = OUT / "data"
DOC = ROOT / "docs" / "paper_reproduction.md"
FIGURES = ROOT / "docs" / "figures" / "pathology_llm"
BEGIN, END = "<!-- llm-table:begin -->", "<!-- llm-table:end -->"
RUNS = ["dpo_violated", "cpo_violated", "cpo_summed_violated", "dpo_contrast", "cpo_contrast"]


def _length_policy() -> tuple[int, int]:
    """``(max_length, max_prompt_length)`` of the paper configs: mining and the audit see what training sees."""
    from omegaconf import OmegaConf

    policies = {
        (int(c.data.max_length), int(c.data.max_prompt_length))
        for c in (OmegaConf.load(ROOT / "configs" / "paper" / f"{run}.yaml") for run in RUNS)
    }
    if len(policies) != 1:
        from cpo_jax.errors import ConfigError

        raise ConfigError(
            f"the paper configs disagree on (data.max_length, data.max_prompt_length): {sorted(policies)}",
            where=f"configs/paper/{{{','.join(RUNS)}}}.yaml",
            hint="mining and the audit must see what training sees: give every paper config the same two values",
        )
    return policies.pop()


def mine(train_problems: int, eval_problems: int, seed: int, eval_size: int, contrast_eval_size: int) -> dict:
    """Scores every candidate wrong answer with SmolLM2 and writes the mined train/held-out files into ``DATA``.

    Training pairs come from training questions and held-out pairs from held-out ones
    (:func:`cpo_jax.data.bundled.question_split`), each question once, so no held-out question is ever trained on.
    """
    max_length, max_prompt_length = _length_policy()
    import numpy as np
    from transformers import AutoTokenizer

    from cpo_jax.data import BatchConfig, TokenizeConfig, arithmetic_candidates, write_jsonl
    from cpo_jax.experiments import mining
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.hf.resolve import resolve_model_path
    from cpo_jax.train.reference_cache import compute_reference_logps

    start = time.perf_counter()
    splits = {
        "train": mining.distinct_questions(arithmetic_candidates(train_problems, seed=seed, split="train")),
        "eval": mining.distinct_questions(arithmetic_candidates(eval_problems, seed=seed, split="eval")),
    }
    candidates = splits["train"] + splits["eval"]
    scores = DATA / f"candidate_scores_{train_problems}_{eval_problems}_{seed}.npz"  # the slow part (~4 pairs/s), kept
    if scores.is_file():
        cached = np.load(scores)
        logps, lengths = cached["logps"], cached["lengths"]
    else:
        path = resolve_model_path("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = from_pretrained(path)
        logps, lengths = compute_reference_logps(
            model, candidates, [f"candidate:{i}" for i in range(len(candidates))], tokenizer,
            TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length,
                           vocab_size=model.config.vocab_size),
            BatchConfig(pairs_per_batch=16, max_length=max_length, pad_id=tokenizer.pad_token_id or 0),
            return_lengths=True,
        )  # fmt: skip
        DATA.mkdir(parents=True, exist_ok=True)
        np.savez(scores.with_suffix(".tmp.npz"), logps=logps, lengths=lengths)
        scores.with_suffix(".tmp.npz").replace(scores)
    n_train = len(splits["train"])
    mined_train = mining.select_pairs(splits["train"], logps[:n_train], lengths[:n_train])
    mined_eval = mining.select_pairs(splits["eval"], logps[n_train:], lengths[n_train:])
    violated_eval, contrast_eval = mined_eval.violated[:eval_size], mined_eval.contrast[:contrast_eval_size]
    files = {
        "violated_train.jsonl": mined_train.violated,
        "violated_eval.jsonl": violated_eval,
        "violated_eval_prompts.jsonl": mining.prompt_records(violated_eval),
        "contrast_train.jsonl": mined_train.contrast,
        "contrast_eval.jsonl": contrast_eval,
        "contrast_eval_prompts.jsonl": mining.prompt_records(contrast_eval),
    }
    DATA.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_jsonl(records, DATA / name)
    stats = {
        "train": mined_train.stats,
        "eval": mined_eval.stats,
        "problems": mined_train.stats["problems"] + mined_eval.stats["problems"],
        "candidates": len(candidates),
        "candidates_ref_prefers_wrong": (
            mined_train.stats["candidates_ref_prefers_wrong"] + mined_eval.stats["candidates_ref_prefers_wrong"]
        ),
        "problems_with_a_preferred_wrong_answer": len(mined_train.violated) + len(mined_eval.violated),
        "split": "question_split (SHA-256 of the question; train and held-out questions disjoint)",
        "seed": seed,
        "max_length": max_length,
        "sizes": {name: len(records) for name, records in files.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (DATA / "mining_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))
    return stats


def _cli(*args: str) -> None:
    command = [str(pathlib.Path(sys.executable).parent / "cpo-jax"), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def train(runs: list[str]) -> None:
    """``cpo-jax audit`` on both training sets, then ``cpo-jax train configs/paper/<run>.yaml`` for each run."""
    max_length, max_prompt_length = _length_policy()
    for dataset in ("violated", "contrast"):
        _cli(
            "audit",
            "smollm2",
            str(DATA / f"{dataset}_train.jsonl"),
            "--out",
            str(OUT / f"audit_{dataset}"),
            "--max-length",
            str(max_length),
            "--max-prompt-length",
            str(max_prompt_length),
        )
    for run in runs:
        start = time.perf_counter()
        _cli("train", f"configs/paper/{run}.yaml")
        (OUT / run / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")


def _metrics(run: str) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` from a run's metrics.jsonl (eval rows carry ``eval/`` keys)."""
    from cpo_jax.train.metrics_writer import read_metrics  # tolerates a torn last line (a kill during a write)

    rows = read_metrics(OUT / run / "metrics.jsonl")
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    trains = [r for r in rows if not any(k.startswith("eval/") for k in r)]
    return trains, evals


COLUMNS = [
    ("diagnostics/frac_in_U", "frac_in_U", "{:.3f}"),
    ("diagnostics/abs_accuracy", "abs. accuracy", "{:.3f}"),
    ("diagnostics/frac_in_U_norm", "frac_in_U (per-token)", "{:.3f}"),
    ("diagnostics/abs_accuracy_norm", "abs. accuracy (per-token)", "{:.3f}"),
    ("logps/chosen", "chosen log-lik.", "{:.2f}"),
    ("logps/rejected", "rejected log-lik.", "{:.2f}"),
    ("generation/accuracy", "generation acc.", "{:.3f}"),
]


def audit_table() -> str:
    """The ``cpo-jax audit`` view of both training sets and the mining counts; copies the audit histograms."""
    import shutil

    stats = json.loads((DATA / "mining_stats.json").read_text())
    lines = [
        f"Mining: {stats['problems']} problems, {stats['candidates']} candidate wrong answers scored in "
        f"{stats['seconds']:.0f} s; the reference prefers the wrong answer on "
        f"{stats['candidates_ref_prefers_wrong']} "
        f"candidates, covering {stats['problems_with_a_preferred_wrong_answer']} problems "
        f"({stats['problems_with_a_preferred_wrong_answer'] / stats['problems']:.0%}).",
        "",
        "| `cpo-jax audit` before training | pairs | δref < 0 (summed) | δref < 0 (per token) | median δref | "
        "median δref per token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dataset in ("violated", "contrast"):
        report_path = OUT / f"audit_{dataset}" / "audit.json"
        if not report_path.is_file():
            continue
        audit = json.loads(report_path.read_text())
        lines.append(
            f"| {dataset}_train | {audit['num_scored']} | {audit['frac_ref_prefers_rejected']:.3f} | "
            f"{audit['frac_ref_prefers_rejected_norm']:.3f} | {audit['delta_ref']['q50']:.2f} | "
            f"{audit['delta_ref_norm']['q50']:.3f} |"
        )
        shutil.copyfile(OUT / f"audit_{dataset}" / "delta_ref_hist.png", FIGURES / f"audit_{dataset}.png")
    return "\n".join(lines)


def report(update_docs: bool) -> str:
    """Writes the curves and the before/after table; optionally rewrites the table in the docs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if (OUT / r / "summary.json").is_file()]
    lines = [
        "| run | held-out set | metric | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|---|---|" + "---:|" * len(COLUMNS),
    ]
    for run in runs:
        summary = json.loads((OUT / run / "summary.json").read_text())
        for when in ("before", "after"):
            cells = [fmt.format(summary[when][key]) if key in summary[when] else "–" for key, _, fmt in COLUMNS]
            held_out = run.rsplit("_", 1)[1]
            lines.append(f"| {run} | {held_out} | {when} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n\n" + audit_table()

    panels = [
        ("eval/diagnostics/frac_in_U", "held-out frac_in_U"),
        ("eval/diagnostics/abs_accuracy", "held-out abs. accuracy (δθ > 0)"),
        ("eval/logps/chosen", "held-out chosen log-likelihood"),
        ("train/loss", "training loss"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4))
    for run in runs:
        trains, evals = _metrics(run)
        style = "-" if run.endswith("violated") else ":"
        for ax, (key, title) in zip(axes, panels):
            rows = trains if key.startswith("train/") else evals
            short = key.split("/", 1)[1] if key.startswith("train/") else key
            points = [(r["step"], r[short]) for r in rows if short in r]
            if points:
                ax.plot(*zip(*points), style, marker="." if rows is evals else None, label=run)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURES / "curves.png", dpi=110)
    plt.close(fig)
    (FIGURES / "table.md").write_text(table + "\n")
    if update_docs:
        from cpo_jax.report import replace_marked

        replace_marked(DOC, BEGIN, END, table)
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["mine", "train", "report", "all"])
    parser.add_argument("--train-problems", type=int, default=240, help="problems drawn from training questions")
    parser.add_argument("--eval-problems", type=int, default=110, help="problems drawn from held-out questions")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--eval-size", type=int, default=64, help="held-out violated pairs")
    parser.add_argument("--contrast-eval-size", type=int, default=48, help="held-out contrast pairs")
    parser.add_argument("--runs", nargs="*", default=RUNS, choices=RUNS)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    if args.stage in ("mine", "all"):
        mine(args.train_problems, args.eval_problems, args.seed, args.eval_size, args.contrast_eval_size)
    if args.stage in ("train", "all"):
        train(args.runs)
    if args.stage in ("report", "all"):
        report(args.update_docs)


if __name__ == "__main__":
    from cpo_jax.errors import run_tool

    sys.exit(run_tool(main))
