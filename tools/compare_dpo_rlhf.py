"""DPO vs CPO vs RLOO vs online DPO/CPO from the same SmolLM2-135M-Instruct on the verifiable arithmetic task,
matched compute, over several training seeds.

    python tools/compare_dpo_rlhf.py all --seeds 0 1 2 --update-docs   # train + measure every run, write the doc
    python tools/compare_dpo_rlhf.py train [--seeds 0 1 2] [--pref-steps 48]  # each run: train, then measure
    python tools/compare_dpo_rlhf.py train --only dpo_lr5e-6   # a sensitivity variant (VARIANTS), same budget
    python tools/compare_dpo_rlhf.py report [--update-docs]    # tables and figures from the kept results only

DPO and CPO train on offline preference pairs (right answer chosen, a plausible wrong one rejected); RLOO samples
its own answers and is rewarded by the verifier, with a KL penalty to the start. Online DPO and CPO sample two answers
per prompt, rank them by the verifier and train the same DPO / CPO losses on those pairs (``rl.algorithm: online``):
the loss held fixed, the data on-policy. The budget is counted in forward token equivalents of padded rows
(:mod:`cpo_jax.experiments.compare`): the tool gives DPO and CPO ``--pref-steps`` steps and each sampled run as many
steps as fit in the same budget. Every policy is then measured the same way:
greedy verifier accuracy on held-out prompts (with an exact McNemar p-value against the start model on the same
prompts), KL(pi || pi_ref) on its own samples, and the paper's diagnostics on held-out preference pairs.

A run's measurements are kept in git, in ``docs/results/compare/runs/<run>_s<seed>.json`` (the start model's in
``start.json``), so the report can be rebuilt on any checkout and a later session can add seeds. The trained models
and logs stay in ``runs/compare/``, which git ignores. A run kept under the same settings is skipped on the next
``train``; one kept under other settings (config, budget, held-out sets) is refused (``--force`` reruns it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "compare"
OUT = ROOT / "runs" / "compare"
DOC = ROOT / "docs" / "paper_reproduction.md"
FIGURES = ROOT / "docs" / "figures" / "compare"
BEGIN, END = "<!-- compare-table:begin -->", "<!-- compare-table:end -->"
EXAMPLES_BEGIN, EXAMPLES_END = "<!-- compare-examples:begin -->", "<!-- compare-examples:end -->"
RUNS = ("dpo", "cpo", "rloo", "online_dpo", "online_cpo")
RL_RUNS = ("rloo", "online_dpo", "online_cpo")  # sampled on-policy; their steps are fitted to the preference budget
# Sensitivity runs: name -> (base config, overrides); same budget as their base.
VARIANTS = {"dpo_lr5e-6": ("dpo", ["optim.learning_rate=5e-6"])}
# Held-out evaluation: questions in neither the DPO/CPO pairs nor the RLOO prompts, each once (eval_sets()).
EVAL_PROMPTS, EVAL_PAIRS = ("bundled:arithmetic-eval-prompts:1024", 256), ("bundled:arithmetic-eval:512", 128)
KL_PROMPTS = 64  # the first of the held-out prompts, sampled for KL(pi || pi_ref)
RESULTS = ROOT / "docs" / "results" / "compare"  # tracked: the numbers behind the doc's tables


def _load(run: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(CONFIGS / f"{run}.yaml")


def budgets(pref_steps: int) -> dict[str, dict]:
    """Steps and forward-token budget of each run (variants as their base), RLOO's fitted to the preference budget."""
    from cpo_jax.experiments.compare import preference_step_cost, rl_step_cost

    out = {}
    for run in ("dpo", "cpo"):
        c = _load(run)
        cost = preference_step_cost(
            c.data.pairs_per_batch, c.data.max_length, reference_forward=c.loss.reference == "separate"
        )
        out[run] = {"steps": pref_steps, "step_cost": cost, "budget": pref_steps * cost}
    for run in RL_RUNS:
        c = _load(run)
        cost = rl_step_cost(
            c.rl.prompts_per_step,
            c.rl.num_generations,
            c.data.max_prompt_length,
            c.rl.max_new_tokens,
            c.rl.get("ppo_epochs", 1),
        )
        steps = max(1, round(out["dpo"]["budget"] / cost))
        out[run] = {"steps": steps, "step_cost": cost, "budget": steps * cost}
    for name, (base, overrides) in VARIANTS.items():
        out[name] = dict(out[base], base=base, overrides=overrides)
    return out


def run_name(run: str, seed: int) -> str:
    return f"{run}_s{seed}"


def run_overrides(run: str, seed: int, plan: dict) -> tuple[str, list[str]]:
    """``(base config, key=value overrides)`` of ``run`` (a config or a variant) at training seed ``seed``."""
    base, extra = VARIANTS.get(run, (run, []))
    steps = plan[run]["steps"]
    return base, [
        f"steps={steps}",
        f"eval_every={max(1, steps // 2)}",
        f"output_dir={OUT / run_name(run, seed)}",
        f"seed={seed}",  # sampling and dropout
        f"data.seed={seed}",  # the order of the pairs or prompts
        *extra,
    ]


@dataclasses.dataclass(frozen=True)
class EvalSets:
    """The held-out prompts and pairs (questions no run trained on, each once) and how they are measured."""

    prompts: object  # RecordSet of prompt-only records
    pairs: object  # RecordSet of preference records
    spec: dict


def eval_sets() -> EvalSets:
    """The held-out sets: questions in neither the DPO/CPO pairs nor the RLOO prompts, each once."""
    from cpo_jax.data import load_records
    from cpo_jax.experiments.compare import held_out, question
    from cpo_jax.experiments.kept import sha256_json

    seen = set()
    for run in RUNS:
        c = _load(run)
        kind = "prompt_only" if c.loss.get("objective") == "rlhf" else "preference"
        seen |= {question(r) for r in load_records(list(c.data.train_files), kind).records}
    prompts = held_out(load_records(EVAL_PROMPTS[0], "prompt_only"), seen, EVAL_PROMPTS[1])
    pairs = held_out(load_records(EVAL_PAIRS[0], "preference"), seen, EVAL_PAIRS[1])
    c = _load("rloo")
    spec = {
        "prompts": list(EVAL_PROMPTS), "pairs": list(EVAL_PAIRS), "kl_prompts": KL_PROMPTS,
        "max_new_tokens": int(c.rl.eval_max_new_tokens), "kl_new_tokens": int(c.rl.max_new_tokens),
        "max_length": int(c.data.max_length), "max_prompt_length": int(c.data.max_prompt_length),
        "sha256": sha256_json([prompts.records, pairs.records]),
    }  # fmt: skip
    return EvalSets(prompts, pairs, spec)


def _spec(run: str, seed: int, plan: dict, sets: EvalSets) -> dict:
    """What a run's kept result depends on: the run, its seed, its budget, the resolved config and the held-out sets."""
    from cpo_jax.cli import load_config
    from cpo_jax.experiments.kept import portable

    base, overrides = run_overrides(run, seed, plan)
    config = json.loads(json.dumps(dataclasses.asdict(load_config(CONFIGS / f"{base}.yaml", overrides)), default=str))
    config.pop("output_dir", None)
    return portable({"run": run, "seed": seed, "plan": plan[run], "config": config, "eval": sets.spec}, ROOT)


def _runs_store():
    from cpo_jax.experiments.kept import KeptResults

    return KeptResults(RESULTS / "runs", "python tools/compare_dpo_rlhf.py train")


def _start_store():
    from cpo_jax.experiments.kept import KeptResults

    return KeptResults(RESULTS, "python tools/compare_dpo_rlhf.py train")


class Evaluator:
    """Every policy measured the same way on the held-out sets, against the start model (loaded once)."""

    def __init__(self, sets: EvalSets, *, force: bool = False):
        from transformers import AutoTokenizer

        from cpo_jax.hf.pretrained import from_pretrained
        from cpo_jax.hf.resolve import resolve_model_path

        path = resolve_model_path("smollm2")
        self.sets, self.tokenizer, self.reference = sets, AutoTokenizer.from_pretrained(path), from_pretrained(path)
        self.reference_pairs = self.pair_logps(self.reference)
        store, spec = _start_store(), {"model": "smollm2", "eval": sets.spec}
        if not store.finished("start", spec, force=force):  # refuses a start measured on other held-out sets
            start = self.measure(self.reference, is_reference=True)
            questions = [_question_text(r) for r in sets.prompts.records]
            store.save("start", {"spec": spec, "eval": start, "questions": questions})

    def pair_logps(self, model) -> np.ndarray:
        """``[N, 2]`` summed (chosen, rejected) log-probs of the held-out pairs under the runs' length policy."""
        from cpo_jax.data import BatchConfig, TokenizeConfig
        from cpo_jax.train.reference_cache import compute_reference_logps

        s = self.sets.spec
        tok = TokenizeConfig(max_length=s["max_length"], max_prompt_length=s["max_prompt_length"])
        batch = BatchConfig(pairs_per_batch=8, max_length=s["max_length"], pad_id=self.tokenizer.pad_token_id or 0)
        pairs = self.sets.pairs
        return compute_reference_logps(model, pairs.records, pairs.sources, self.tokenizer, tok, batch)

    def measure(self, model, *, is_reference: bool = False) -> dict:
        """Greedy verifier outcomes and answers, the sampled KL to the start, and the paper's pair diagnostics."""
        from cpo_jax.experiments.compare import pair_diagnostics, sampled_kl
        from cpo_jax.report import generation_metrics, greedy_answers, score_answers

        s, prompts = self.sets.spec, self.sets.prompts
        _, answers = greedy_answers(
            model, self.tokenizer, prompts, max_new_tokens=s["max_new_tokens"], max_prompt_length=s["max_prompt_length"]
        )
        out = {**generation_metrics(score_answers(prompts.records, answers)), "generation/answers": answers}
        if is_reference:  # the start is the reference: both estimates are exactly 0
            out.update({"kl/k1": 0.0, "kl/k3": 0.0})
        else:
            kl_prompts = dataclasses.replace(
                prompts, records=prompts.records[: s["kl_prompts"]], sources=prompts.sources[: s["kl_prompts"]]
            )
            out.update(
                sampled_kl(
                    model,
                    self.reference,
                    self.tokenizer,
                    kl_prompts,
                    prompt_length=s["max_prompt_length"],
                    max_new_tokens=s["kl_new_tokens"],
                )  # fmt: skip
            )
        logps = self.reference_pairs if is_reference else self.pair_logps(model)
        return out | pair_diagnostics(logps, self.reference_pairs)


def _question_text(record: dict) -> str:
    prompt = record["prompt"]
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def _curve(out: pathlib.Path) -> list[dict]:
    """The logged rows a run's curves are drawn from (:data:`cpo_jax.report.RL_PANELS` and ``PREFERENCE_PANELS``
    metrics, train and ``eval/``), from its metrics.jsonl."""
    from cpo_jax.report import PREFERENCE_PANELS, RL_PANELS
    from cpo_jax.train.metrics_writer import read_metrics

    keys = {key for key, *_ in (*RL_PANELS, *PREFERENCE_PANELS)}
    keys |= {f"eval/{key}" for key in keys}
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    kept = [{"step": r.get("step", 0), **{k: v for k, v in r.items() if k in keys}} for r in rows]
    return [r for r in kept if len(r) > 1]


def train(pref_steps: int, only: list[str] | None = None, seeds: list[int] = (0,), force: bool = False) -> None:
    """Trains each run (or ``only`` these runs/variants) at each seed with its budgeted steps, measures it on the
    held-out sets, and keeps the result in ``docs/results/compare``. A run kept under the same spec is skipped; one
    kept under another is refused (``force`` reruns it)."""
    import shutil

    from cpo_jax.errors import ConfigError, UserError
    from cpo_jax.experiments.kept import without_execution_keys
    from cpo_jax.hf.pretrained import from_pretrained

    plan = budgets(pref_steps)
    for run in only or RUNS:
        if run not in plan:
            raise ConfigError(f"unknown run {run!r}", where="--only", hint=f"pick some of {', '.join(sorted(plan))}")
    sets = eval_sets()
    store, evaluator = _runs_store(), None
    for seed in seeds:
        for run in only or RUNS:
            name, spec = run_name(run, seed), _spec(run, seed, plan, sets)
            if store.finished(name, spec, force=force, comparable=without_execution_keys):
                print(f"{name}: kept, skipped", flush=True)
                continue
            evaluator = evaluator or Evaluator(sets, force=force)
            out = OUT / name
            if out.exists():  # no kept result: an interrupted attempt, ours to replace
                print(f"{name}: removing the interrupted attempt in {out}", flush=True)
                shutil.rmtree(out)
            base, overrides = run_overrides(run, seed, plan)
            cmd = [sys.executable, "-m", "cpo_jax.cli", "train", str(CONFIGS / f"{base}.yaml"), *overrides]
            print("$", " ".join(cmd), flush=True)
            start = time.perf_counter()
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:  # its own message is printed above
                raise UserError(
                    f"training {name} failed (its message is above); nothing of it was kept",
                    hint="fix what it names and rerun: the runs kept so far are skipped",
                )
            train_seconds = time.perf_counter() - start
            measured = evaluator.measure(from_pretrained(out / "hf"))
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the exported model in hf/ stays
            record = {"spec": spec, "eval": measured, "curve": _curve(out), "train_seconds": round(train_seconds, 1),
                      "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
            store.save(name, record)
            m = measured
            print(f"{name}: verifier accuracy {m['generation/accuracy']:.3f}, KL k1 {m['kl/k1']:.2f}, "
                  f"frac_in_U {m['diagnostics/frac_in_U']:.3f}, {record['seconds']:.0f} s", flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- report


def load_kept() -> tuple[dict, dict[str, list[dict]]]:
    """``(start, {run: [record per seed, in seed order]})`` from the kept results, every one measured on the start's
    held-out sets (else refused)."""
    from cpo_jax.errors import UserError

    start = _start_store().load("start")
    records = _runs_store().records()
    if start is None or not records:
        raise UserError(
            f"no kept result in {RESULTS}",
            hint="train and measure the runs first: python tools/compare_dpo_rlhf.py train",
        )
    runs: dict[str, list[dict]] = {}
    for name, record in records.items():
        if record["spec"]["eval"] != start["spec"]["eval"]:
            raise UserError(
                f"{name} was measured on other held-out sets than the kept start model "
                f"(sha256 {record['spec']['eval']['sha256'][:12]} against {start['spec']['eval']['sha256'][:12]}); "
                "the table would mix two evaluations",
                where=str(_runs_store().path(name)),
                hint="rerun it (python tools/compare_dpo_rlhf.py train --only RUN --seeds SEED --force)",
            )
        runs.setdefault(record["spec"]["run"], []).append(record)
    order = [*RUNS, *VARIANTS]
    ordered = sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    return start, {run: sorted(rows, key=lambda r: r["spec"]["seed"]) for run, rows in ordered}


def report(update_docs: bool) -> str:
    """The table (means with 95% intervals across seeds), the per-seed changes against the start, the paired
    comparisons, the completions table and the figures, from the kept results only."""
    start, runs = load_kept()
    figures = OUT / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    _plot(start, runs, figures)
    table = "\n\n".join(part for part in (_table(start, runs), _per_seed(start, runs), _comparisons(runs)) if part)
    first = {"start": start["eval"]} | {run: rows[0]["eval"] for run, rows in runs.items() if run in RUNS}
    examples = _examples(first, start["questions"])
    (figures / "table.md").write_text(table + "\n")
    (figures / "examples.md").write_text(examples + "\n")
    if update_docs:
        import shutil

        from cpo_jax.report import replace_marked

        shutil.copytree(figures, FIGURES, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.md"))
        replace_marked(DOC, BEGIN, END, table)
        replace_marked(DOC, EXAMPLES_BEGIN, EXAMPLES_END, examples)
    print(table, examples, sep="\n\n")
    return table


def _cell(answer: str, limit: int = 70) -> str:
    """A completion as one markdown table cell: newlines shown as ␤, pipes escaped, cut at ``limit`` characters."""
    text = answer.strip().replace("\n", "␤").replace("|", "\\|")
    return f"`{text[:limit]}`" + (" (cut)" if len(text) > limit else "")


def _examples(results: dict, questions: list[str], per_kind: int = 3) -> str:
    """Greedy answers of every policy to held-out prompts the start gets right and offline DPO gets wrong, then to
    prompts the start gets wrong and an on-policy run (RLOO, online DPO/CPO) gets right: the first ``per_kind`` of
    each, in file order. ``results``: policy name -> its measurements (``start`` first); ``questions``: the prompts'
    texts."""
    names = list(results)
    right = {n: np.asarray(results[n]["generation/correct"], bool) for n in names}
    kinds = []
    if "dpo" in right:
        kinds.append(("start right, DPO wrong", right["start"] & ~right["dpo"]))
    online = [n for n in RL_RUNS if n in right]
    if online:
        kinds.append(("start wrong, an on-policy run right", ~right["start"] & np.any([right[n] for n in online], 0)))
    rows = ["| prompt | kind | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for kind, chosen in kinds:
        for i in np.flatnonzero(chosen)[:per_kind]:
            marks = [("✓ " if right[n][i] else "✗ ") + _cell(results[n]["generation/answers"][i]) for n in names]
            rows.append(f"| {_cell(questions[i], 40)} | {kind} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


#: The table's measured columns: (key, title, format).
MEASURED = (
    ("generation/accuracy", "verifier accuracy", "{:.3f}"),
    ("kl/k1", "KL k1", "{:.2f}"),
    ("kl/k3", "KL k3", "{:.2f}"),
    ("diagnostics/frac_in_U", "frac_in_U", "{:.3f}"),
    ("diagnostics/abs_accuracy", "abs. accuracy", "{:.3f}"),
    ("logps/chosen", "chosen log-lik.", "{:.2f}"),
    ("logps/rejected", "rejected log-lik.", "{:.2f}"),
)


def _table(start: dict, runs: dict[str, list[dict]]) -> str:
    """One row per policy: its budget and the mean of each measurement across its seeds, with the 95% interval."""
    from cpo_jax.experiments.noisy import mean_ci_text

    rows = [
        "| policy | seeds | steps | budget (M fwd tokens) | train wall (min) | "
        + " | ".join(title for _, title, _ in MEASURED) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(MEASURED),
    ]  # fmt: skip
    cells = [fmt.format(start["eval"][key]) for key, _, fmt in MEASURED]
    rows.append("| start | – | 0 | 0.00 |  | " + " | ".join(cells) + " |")
    for run, records in runs.items():
        plan = records[0]["spec"]["plan"]
        wall = np.mean([r["train_seconds"] for r in records]) / 60
        cells = [mean_ci_text([r["eval"][key] for r in records], fmt[2:-1]) for key, _, fmt in MEASURED]
        rows.append(f"| {run} | {len(records)} | {plan['steps']} | {plan['budget'] / 1e6:.2f} | {wall:.1f} | "
                    + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(rows)


def _per_seed(start: dict, runs: dict[str, list[dict]]) -> str:
    """Each seed's verifier accuracy and its change against the start on the same prompts: prompts gained (+) and
    lost (−), with the exact McNemar p-value."""
    from cpo_jax.experiments.compare import mcnemar_exact

    seeds = sorted({r["spec"]["seed"] for records in runs.values() for r in records})
    rows = ["| policy | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    before = np.asarray(start["eval"]["generation/correct"], bool)
    for run, records in runs.items():
        by_seed = {r["spec"]["seed"]: r["eval"] for r in records}
        cells = []
        for seed in seeds:
            if seed not in by_seed:
                cells.append("")
                continue
            m = by_seed[seed]
            t = mcnemar_exact(before, np.asarray(m["generation/correct"], bool))
            cells.append(f"{m['generation/accuracy']:.3f} (+{t['mcnemar/gained']:.0f} / −{t['mcnemar/lost']:.0f}, "
                         f"p {t['mcnemar/p']:.2g})")  # fmt: skip
        rows.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


#: Paired comparisons across seeds: (a, b, what the difference isolates).
COMPARISONS = (
    ("online_dpo", "dpo", "the data (on- vs off-policy), DPO loss"),
    ("online_cpo", "cpo", "the data (on- vs off-policy), CPO loss"),
    ("online_dpo", "rloo", "the loss (DPO vs RLOO), on-policy data"),
    ("online_dpo", "online_cpo", "DPO vs CPO, on-policy"),
    ("dpo", "cpo", "DPO vs CPO, offline"),
)


def _comparisons(runs: dict[str, list[dict]]) -> str:
    """Paired differences across the seeds two runs share (the same seed: the same data order and sampling key) in
    verifier accuracy and KL k1, with the 95% t interval and the paired t-test's p."""
    from cpo_jax.experiments.noisy import paired_seed_test

    rows = [
        "| a − b | isolates | seeds | verifier accuracy difference (95% CI) | paired p | KL k1 difference (95% CI) |",
        "|---|---|---:|---|---:|---|",
    ]
    for a, b, what in COMPARISONS:
        ra = {r["spec"]["seed"]: r["eval"] for r in runs.get(a, [])}
        rb = {r["spec"]["seed"]: r["eval"] for r in runs.get(b, [])}
        seeds = sorted(ra.keys() & rb.keys())
        if not seeds:
            continue
        cells = []
        for key, fmt in (("generation/accuracy", "{:+.3f}"), ("kl/k1", "{:+.2f}")):
            test = paired_seed_test([ra[s][key] for s in seeds], [rb[s][key] for s in seeds])
            d, spec = test["diff"], fmt[2:-1]
            interval = "" if math.isnan(d["half"]) else f" [{d['low']:{spec}}, {d['high']:{spec}}]"
            cells.append((f"{d['mean']:{spec}}{interval}", test["p"]))
        p = "–" if math.isnan(cells[0][1]) else f"{cells[0][1]:.2g}"
        rows.append(f"| {a} − {b} | {what} | {len(seeds)} | {cells[0][0]} | {p} | {cells[1][0]} |")
    return "\n".join(rows) if len(rows) > 2 else ""  # no two runs compared: no table


def _plot(start: dict, runs: dict[str, list[dict]], directory: pathlib.Path) -> None:
    """``summary.png`` (each measurement per policy: the mean across seeds, its 95% interval and each seed) and the
    first seed's training curves of each sampled run (``<run>_curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpo_jax.experiments.noisy import mean_ci
    from cpo_jax.report import RL_PANELS, plot_curves

    shown = {run: rows for run, rows in runs.items() if run in RUNS}
    names = ["start", *shown]
    panels = (
        ("generation/accuracy", "verifier accuracy (greedy, held out)"),
        ("kl/k3", "KL(pi || pi_ref), k3"),
        ("diagnostics/frac_in_U", "share of held-out pairs in U"),
        ("diagnostics/abs_accuracy", "policy prefers chosen"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for i, name in enumerate(names):
            values = [start["eval"][key]] if name == "start" else [r["eval"][key] for r in shown[name]]
            ci = mean_ci(values)
            colour = "grey" if name == "start" else f"C{i - 1}"
            error = None if math.isnan(ci["half"]) else [[ci["half"]], [ci["half"]]]
            ax.bar(i, ci["mean"], color=colour, alpha=0.6, yerr=error, capsize=3)
            ax.plot([i] * len(values), values, "k.", markersize=4)
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
        ax.set_title(title, fontsize=9)
    budget = next(iter(shown.values()))[0]["spec"]["plan"]["budget"] if shown else 0
    seeds = sorted({r["spec"]["seed"] for rows in shown.values() for r in rows})
    fig.suptitle(
        f"SmolLM2-135M-Instruct, arithmetic; {budget / 1e6:.2f}M forward-token equivalents each; "
        f"seeds {', '.join(map(str, seeds))} (bars: mean and 95% interval; dots: seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(directory / "summary.png", dpi=100)
    plt.close(fig)
    for run in RL_RUNS:  # the sampled runs' own training curves, first seed
        if run in runs and runs[run][0]["curve"]:
            plot_curves(runs[run][0]["curve"], directory / f"{run}_curves.png", panels=RL_PANELS)


def main() -> None:
    global OUT, RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["train", "report", "all"])
    parser.add_argument("--pref-steps", type=int, default=48, help="DPO/CPO steps; RLOO gets the same budget")
    parser.add_argument("--only", nargs="+", help=f"train only these runs; variants: {sorted(VARIANTS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (data order, sampling)")
    parser.add_argument("--force", action="store_true", help="rerun and re-measure runs that are kept")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the tables in docs/paper_reproduction.md")
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help="where the runs' models and logs go")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS, help="where the runs' results are kept")
    args = parser.parse_args()
    OUT, RESULTS = args.out.resolve(), args.results.resolve()
    if args.stage in ("train", "all"):
        train(args.pref_steps, args.only, args.seeds, args.force)
    if args.stage in ("report", "all"):
        report(args.update_docs)


if __name__ == "__main__":
    from cpo_jax.errors import run_tool

    sys.exit(run_tool(main))
