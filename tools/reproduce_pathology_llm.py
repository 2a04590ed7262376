"""The paper's failure mode on a real language model (issue 7, Part B): SmolLM2-135M-Instruct, verifiable arithmetic.

    python tools/reproduce_pathology_llm.py all --update-docs   # mine, audit, train 5 runs, report
                                                                # (~50 min on 2 CPU cores)
    python tools/reproduce_pathology_llm.py mine                # 1. score candidate wrong answers with the reference
    python tools/reproduce_pathology_llm.py train               # 2. cpo-jax audit + cpo-jax train for every config
    python tools/reproduce_pathology_llm.py report              # 3. curves + table from the kept results

Mining keeps the problems on which SmolLM2 itself prefers a wrong answer (delta_ref < 0 in summed and in per-token
average log-probs) and, for contrast, problems where it prefers the correct one. Every run trains with the same
budget from the same reference, with the configs in ``configs/paper/``, through the ``cpo-jax`` command line.

What the report needs is kept in git, in ``docs/results/pathology_llm/``: the mining counts (``mining.json``), each
``cpo-jax audit`` (``audit_<set>.json``) and each run's before/after metrics and curve (``runs/<run>.json``). So the
report can be rebuilt on any checkout. A run kept under the same config and data is skipped on the next ``train``;
one kept under others is refused (``--force`` reruns it). Models and logs stay in ``runs/``, which git ignores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import time

from cpo_jax.experiments.kept import KeptResults, portable, sha256_of, without_execution_keys

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "paper_llm"
DATA = OUT / "data"
RESULTS = ROOT / "docs" / "results" / "pathology_llm"  # tracked: the numbers behind the doc's table
RERUN = "python tools/reproduce_pathology_llm.py train"
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
    scoring_seconds = None  # known only when scored in this call (or kept with the same mined files, below)
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
        scoring_seconds = round(time.perf_counter() - start, 1)
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
        "sha256": {name: sha256_of(DATA / name) for name in files},
        "seconds": scoring_seconds,
    }
    kept = _kept().load("mining")
    if scoring_seconds is None and kept and kept["stats"]["sha256"] == stats["sha256"]:
        stats["seconds"] = kept["stats"]["seconds"]  # the same mined files: the kept scoring time stands
    (DATA / "mining_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    _kept().save("mining", {"spec": {"problems": [train_problems, eval_problems], "seed": seed}, "stats": stats})
    print(json.dumps(stats, indent=1))
    return stats


def _kept() -> KeptResults:
    """The kept mining counts and audits (``mining.json``, ``audit_<set>.json``)."""
    return KeptResults(RESULTS, RERUN)


def _kept_runs() -> KeptResults:
    """The kept runs, ``runs/<run>.json`` each."""
    return KeptResults(RESULTS / "runs", RERUN)


def _run_spec(run: str) -> dict:
    """What a run's kept result depends on: its resolved config and the SHA-256 of every data file it reads."""
    from cpo_jax.cli import load_config

    cfg = load_config(ROOT / "configs" / "paper" / f"{run}.yaml")
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    config.pop("output_dir", None)
    files = [*cfg.data.train_files, *cfg.data.eval_files, cfg.eval_generation_prompts]
    data = {str(f): sha256_of(ROOT / f) for f in files if f}
    return portable({"run": run, "config": config, "data_sha256": data}, ROOT)


def _cli(*args: str) -> None:
    command = [str(pathlib.Path(sys.executable).parent / "cpo-jax"), *args]
    print("+", " ".join(command), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:  # its own message is printed above
        from cpo_jax.errors import UserError

        raise UserError(
            f"`cpo-jax {args[0]}` failed (its message is above); nothing of it was kept",
            hint="fix what it names and rerun: what is kept so far is skipped",
        )


def train(runs: list[str], force: bool = False) -> None:
    """``cpo-jax audit`` on both training sets, then ``cpo-jax train configs/paper/<run>.yaml`` for each run not yet
    kept; each audit and each run's metrics are kept in ``RESULTS``."""
    max_length, max_prompt_length = _length_policy()
    for dataset in ("violated", "contrast"):
        data = DATA / f"{dataset}_train.jsonl"
        if not data.is_file():
            from cpo_jax.errors import UserError

            raise UserError(
                f"{data} is missing", hint="mine the pairs first: python tools/reproduce_pathology_llm.py mine"
            )
        spec = portable({"data": str(data), "sha256": sha256_of(data), "max_length": max_length,
                         "max_prompt_length": max_prompt_length}, ROOT)  # fmt: skip
        if _kept().finished(f"audit_{dataset}", spec, force=force):
            continue
        out = OUT / f"audit_{dataset}"
        _cli("audit", "smollm2", str(data), "--out", str(out), "--max-length", str(max_length),
             "--max-prompt-length", str(max_prompt_length))  # fmt: skip
        _kept().save(f"audit_{dataset}", {"spec": spec, "audit": json.loads((out / "audit.json").read_text())})
        FIGURES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "delta_ref_hist.png", FIGURES / f"audit_{dataset}.png")
    for run in runs:
        spec = _run_spec(run)
        if _kept_runs().finished(run, spec, force=force, comparable=without_execution_keys):
            print(f"{run}: kept, skipped", flush=True)
            continue
        if (OUT / run).exists():  # no kept result: an interrupted attempt, ours to replace
            print(f"{run}: removing the interrupted attempt in {OUT / run}", flush=True)
            shutil.rmtree(OUT / run)
        start = time.perf_counter()
        _cli("train", f"configs/paper/{run}.yaml")
        summary = json.loads((OUT / run / "summary.json").read_text())
        record = {"spec": spec, "before": summary["before"], "after": summary["after"], "curve": _curve(run),
                  "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        _kept_runs().save(run, record)


def _curve(run: str) -> list[dict]:
    """The rows of a run's metrics.jsonl that the curves use: the held-out evaluations and the training loss."""
    from cpo_jax.train.metrics_writer import read_metrics  # tolerates a torn last line (a kill during a write)

    keep = {"step", "loss"} | {key for key, _ in CURVE_PANELS if key.startswith("eval/")}
    rows = [{k: v for k, v in r.items() if k in keep} for r in read_metrics(OUT / run / "metrics.jsonl")]
    return [r for r in rows if len(r) > 1]


COLUMNS = [
    ("diagnostics/frac_in_U", "frac_in_U", "{:.3f}"),
    ("diagnostics/abs_accuracy", "abs. accuracy", "{:.3f}"),
    ("diagnostics/frac_in_U_norm", "frac_in_U (per-token)", "{:.3f}"),
    ("diagnostics/abs_accuracy_norm", "abs. accuracy (per-token)", "{:.3f}"),
    ("logps/chosen", "chosen log-lik.", "{:.2f}"),
    ("logps/rejected", "rejected log-lik.", "{:.2f}"),
    ("generation/accuracy", "generation acc.", "{:.3f}"),
]


CURVE_PANELS = [
    ("eval/diagnostics/frac_in_U", "held-out frac_in_U"),
    ("eval/diagnostics/abs_accuracy", "held-out abs. accuracy (δθ > 0)"),
    ("eval/logps/chosen", "held-out chosen log-likelihood"),
    ("loss", "training loss"),
]


def audit_table(mining: dict) -> str:
    """The mining counts and the kept ``cpo-jax audit`` view of both training sets."""
    stats = mining["stats"]
    scored = (
        " (reused from an earlier call; its time was not recorded)"
        if stats["seconds"] is None
        else (f" in {stats['seconds']:.0f} s")
    )
    lines = [
        f"Mining: {stats['problems']} problems, {stats['candidates']} candidate wrong answers scored{scored}; the "
        f"reference prefers the wrong answer on {stats['candidates_ref_prefers_wrong']} candidates, covering "
        f"{stats['problems_with_a_preferred_wrong_answer']} problems "
        f"({stats['problems_with_a_preferred_wrong_answer'] / stats['problems']:.0%}).",
        "",
        "| `cpo-jax audit` before training | pairs | δref < 0 (summed) | δref < 0 (per token) | median δref | "
        "median δref per token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dataset in ("violated", "contrast"):
        kept = _kept().load(f"audit_{dataset}")
        if kept is None:
            continue
        audit = kept["audit"]
        lines.append(
            f"| {dataset}_train | {audit['num_scored']} | {audit['frac_ref_prefers_rejected']:.3f} | "
            f"{audit['frac_ref_prefers_rejected_norm']:.3f} | {audit['delta_ref']['q50']:.2f} | "
            f"{audit['delta_ref_norm']['q50']:.3f} |"
        )
    return "\n".join(lines)


def load_kept() -> tuple[dict, dict[str, dict]]:
    """``(mining, {run: record})`` from the kept results; refuses runs trained on other mined files."""
    from cpo_jax.errors import UserError

    mining = _kept().load("mining")
    runs = {run: record for run in RUNS if (record := _kept_runs().load(run)) is not None}
    if mining is None or not runs:
        raise UserError(
            f"no kept mining or run in {RESULTS}",
            hint="mine and train first: python tools/reproduce_pathology_llm.py all",
        )
    mined = {f"{DATA.relative_to(ROOT)}/{name}": digest for name, digest in mining["stats"]["sha256"].items()}
    for run, record in runs.items():
        other = sorted(f for f, digest in record["spec"]["data_sha256"].items() if mined.get(f, digest) != digest)
        if other:
            raise UserError(
                f"{run} was trained on other mined files than the kept mining ({', '.join(other)} differ); the table "
                "would mix two minings",
                where=str(_kept_runs().path(run)),
                hint=f"rerun it on the kept mining ({RERUN} --runs {run} --force)",
            )
    return mining, runs


def report(update_docs: bool) -> str:
    """Writes the curves and the before/after table from the kept results; optionally rewrites the table in the docs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mining, runs = load_kept()
    figures = OUT / "figures"  # copied into the docs with --update-docs
    figures.mkdir(parents=True, exist_ok=True)
    lines = [
        "| run | held-out set | metric | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|---|---|" + "---:|" * len(COLUMNS),
    ]
    for run, record in runs.items():
        for when in ("before", "after"):
            cells = [fmt.format(record[when][key]) if key in record[when] else "–" for key, _, fmt in COLUMNS]
            held_out = run.rsplit("_", 1)[1]
            lines.append(f"| {run} | {held_out} | {when} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n\n" + audit_table(mining)

    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.3 * len(CURVE_PANELS), 4))
    for run, record in runs.items():
        style = "-" if run.endswith("violated") else ":"
        for ax, (key, title) in zip(axes, CURVE_PANELS):
            points = [(r["step"], r[key]) for r in record["curve"] if key in r]
            if points:
                ax.plot(*zip(*points), style, marker="." if key.startswith("eval/") else None, label=run)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "curves.png", dpi=110)
    plt.close(fig)
    (figures / "table.md").write_text(table + "\n")
    if update_docs:
        from cpo_jax.report import replace_marked

        FIGURES.mkdir(parents=True, exist_ok=True)
        for name in ("curves.png", "table.md"):
            shutil.copyfile(figures / name, FIGURES / name)
        replace_marked(DOC, BEGIN, END, table)
    print(table)
    return table


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["mine", "train", "report", "all"])
    parser.add_argument("--train-problems", type=int, default=240, help="problems drawn from training questions")
    parser.add_argument("--eval-problems", type=int, default=110, help="problems drawn from held-out questions")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--eval-size", type=int, default=64, help="held-out violated pairs")
    parser.add_argument("--contrast-eval-size", type=int, default=48, help="held-out contrast pairs")
    parser.add_argument("--runs", nargs="*", default=RUNS, choices=RUNS)
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--force", action="store_true", help="rerun runs and audits that are kept")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS, help="where the results are kept")
    args = parser.parse_args()
    RESULTS = args.results.resolve()
    if args.stage in ("mine", "all"):
        mine(args.train_problems, args.eval_problems, args.seed, args.eval_size, args.contrast_eval_size)
    if args.stage in ("train", "all"):
        train(args.runs, args.force)
    if args.stage in ("report", "all"):
        report(args.update_docs)


if __name__ == "__main__":
    from cpo_jax.errors import run_tool

    sys.exit(run_tool(main))
