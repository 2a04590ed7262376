"""DPO vs CPO vs RLOO vs online DPO/CPO from the same SmolLM2-135M-Instruct on the verifiable arithmetic task,
matched compute.

    python tools/compare_dpo_rlhf.py all --update-docs      # train the three runs, evaluate, write the doc section
    python tools/compare_dpo_rlhf.py train [--pref-steps 48]  # cpo-jax train configs/compare/<run>.yaml for each run
    python tools/compare_dpo_rlhf.py train --only dpo_lr5e-6  # a sensitivity variant (VARIANTS), same budget
    python tools/compare_dpo_rlhf.py report [--update-docs]   # evaluate the start model and every trained run

DPO and CPO train on offline preference pairs (right answer chosen, a plausible wrong one rejected); RLOO samples
its own answers and is rewarded by the verifier, with a KL penalty to the start. Online DPO and CPO sample two answers
per prompt, rank them by the verifier and train the same DPO / CPO losses on those pairs (``rl.algorithm: online``):
the loss held fixed, the data on-policy. The budget is counted in forward token equivalents of padded rows
(:mod:`cpo_jax.experiments.compare`): the tool gives DPO and CPO ``--pref-steps`` steps and each sampled run as many
steps as fit in the same budget. Every policy is then measured the same way:
greedy verifier accuracy on held-out prompts (with an exact McNemar p-value against the start model on the same
prompts), KL(pi || pi_ref) on its own samples, and the paper's diagnostics on held-out preference pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
EVAL_SPEC = f"{EVAL_PROMPTS} {EVAL_PAIRS} kl:{KL_PROMPTS} answers"  # cached evaluations are valid for this spec only


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


def train(pref_steps: int, only: list[str] | None = None) -> dict:
    """Runs ``cpo-jax train`` for each config (or ``only`` these runs/variants) with its budgeted steps.

    Merges the plan and wall times into ``runs/compare/plan.json``; returns the wall times of this call."""
    plan = budgets(pref_steps)
    path = OUT / "plan.json"
    record = json.loads(path.read_text()) if path.exists() else {"plan": {}, "wall_s": {}}
    times = {}
    for run in only or RUNS:
        if run not in plan:
            from cpo_jax.errors import ConfigError

            raise ConfigError(f"unknown run {run!r}", where="--only", hint=f"pick some of {', '.join(sorted(plan))}")
        base, overrides = VARIANTS.get(run, (run, []))
        steps = plan[run]["steps"]
        eval_every = max(1, steps // 2)
        cmd = [
            sys.executable,
            "-m",
            "cpo_jax.cli",
            "train",
            str(CONFIGS / f"{base}.yaml"),
            f"steps={steps}",
            f"eval_every={eval_every}",
            f"output_dir={OUT / run}",
            *overrides,
        ]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        times[run] = time.perf_counter() - start
        record["plan"][run], record["wall_s"][run] = plan[run], times[run]
        path.write_text(json.dumps(record, indent=2))
    return times


def pair_logps(model, tokenizer, pairs, c):
    """``[N, 2]`` summed (chosen, rejected) log-probs of the held-out pairs under the run configs' length policy."""
    from cpo_jax.data import BatchConfig, TokenizeConfig
    from cpo_jax.train.reference_cache import compute_reference_logps

    tok = TokenizeConfig(max_length=c.data.max_length, max_prompt_length=c.data.max_prompt_length)
    batch = BatchConfig(pairs_per_batch=8, max_length=c.data.max_length, pad_id=tokenizer.pad_token_id or 0)
    return compute_reference_logps(model, pairs.records, pairs.sources, tokenizer, tok, batch)


def evaluate(name: str, path, reference, tokenizer, prompts, pair_records, reference_pairs, c, *, fresh: bool) -> dict:
    """Verifier outcomes, sampled KL to the reference, and the paper's diagnostics of one policy.

    Each of the three parts is cached in ``runs/compare/<name>/eval.json`` (``--fresh`` recomputes)."""
    from cpo_jax.experiments.compare import pair_diagnostics, sampled_kl
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.report import generation_metrics, greedy_answers, score_answers

    cache_path = OUT / name / "eval.json"
    cache = {} if fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    if cache.get("spec") != EVAL_SPEC:
        cache = {"spec": EVAL_SPEC}
    policy = None

    def part(key, fn):
        nonlocal policy
        if key not in cache:
            if policy is None:
                policy = reference if path is None else from_pretrained(path)
            cache[key] = fn(policy)
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=2))
        return cache[key]

    answers = part(
        "answers",
        lambda m: greedy_answers(
            m,
            tokenizer,
            prompts,
            max_new_tokens=c.rl.eval_max_new_tokens,
            max_prompt_length=c.data.max_prompt_length,
        )[1],
    )
    correct = score_answers(prompts.records, answers)
    kl_prompts = dataclasses.replace(
        prompts, records=prompts.records[:KL_PROMPTS], sources=prompts.sources[:KL_PROMPTS]
    )
    kl = part(
        "kl",
        lambda m: sampled_kl(
            m,
            reference,
            tokenizer,
            kl_prompts,
            prompt_length=c.data.max_prompt_length,
            max_new_tokens=c.rl.max_new_tokens,
        ),
    )
    pairs = part("pairs", lambda m: pair_diagnostics(pair_logps(m, tokenizer, pair_records, c), reference_pairs))
    return {**generation_metrics(correct), "generation/answers": answers, **kl, **pairs}


def eval_sets():
    """``(prompts, pairs)``: held-out prompt and pair records whose questions no run trained on."""
    from cpo_jax.data import load_records
    from cpo_jax.experiments.compare import held_out, question

    seen = set()
    for run in RUNS:
        c = _load(run)
        kind = "prompt_only" if c.loss.get("objective") == "rlhf" else "preference"
        seen |= {question(r) for r in load_records(list(c.data.train_files), kind).records}
    prompts = held_out(load_records(EVAL_PROMPTS[0], "prompt_only"), seen, EVAL_PROMPTS[1])
    pairs = held_out(load_records(EVAL_PAIRS[0], "preference"), seen, EVAL_PAIRS[1])
    return prompts, pairs


def report(update_docs: bool, fresh: bool = False) -> str:
    """Evaluates the start model and every trained run (variants included); writes the table, JSON and figures."""
    from transformers import AutoTokenizer

    from cpo_jax.experiments.compare import mcnemar_exact
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.hf.resolve import resolve_model_path

    c = _load("rloo")
    start_path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(start_path)
    reference = from_pretrained(start_path)
    prompts, pairs = eval_sets()
    print(f"held out: {len(prompts)} prompts, {len(pairs)} pairs", flush=True)
    reference_pairs = pair_logps(reference, tokenizer, pairs, c)
    plan = json.loads((OUT / "plan.json").read_text())
    runs = [r for r in (*RUNS, *VARIANTS) if (OUT / r / "hf" / "config.json").is_file()]
    results = {"start": evaluate("start", None, reference, tokenizer, prompts, pairs, reference_pairs, c, fresh=fresh)}
    for run in runs:
        results[run] = evaluate(
            run, OUT / run / "hf", reference, tokenizer, prompts, pairs, reference_pairs, c, fresh=fresh
        )
        results[run] |= mcnemar_exact(
            np.asarray(results["start"]["generation/correct"]), np.asarray(results[run]["generation/correct"])
        )
        print(run, {k: v for k, v in results[run].items() if k not in PER_PROMPT}, flush=True)
    (OUT / "results.json").write_text(json.dumps({"plan": plan, "results": results}, indent=2))
    FIGURES.mkdir(parents=True, exist_ok=True)
    _plot({k: v for k, v in results.items() if k == "start" or k in RUNS}, plan)
    table = _table(results, plan)
    (OUT / "table.md").write_text(table)
    examples = _examples(results, prompts)
    (OUT / "examples.md").write_text(examples)
    if update_docs:
        from cpo_jax.report import replace_marked

        replace_marked(DOC, BEGIN, END, table)
        replace_marked(DOC, EXAMPLES_BEGIN, EXAMPLES_END, examples)
    print(table, examples, sep="\n\n")
    return table


PER_PROMPT = ("generation/correct", "generation/answers")


def _cell(answer: str, limit: int = 70) -> str:
    """A completion as one markdown table cell: newlines shown as ␤, pipes escaped, cut at ``limit`` characters."""
    text = answer.strip().replace("\n", "␤").replace("|", "\\|")
    return f"`{text[:limit]}`" + (" (cut)" if len(text) > limit else "")


def _examples(results: dict, prompts, per_kind: int = 3) -> str:
    """Greedy answers of every policy to held-out prompts the start gets right and offline DPO gets wrong, then to
    prompts the start gets wrong and an on-policy run (RLOO, online DPO/CPO) gets right: the first ``per_kind`` of
    each, in file order."""
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
            question = prompts.records[i]["prompt"]
            question = question[-1]["content"] if isinstance(question, list) else question
            marks = [("✓ " if right[n][i] else "✗ ") + _cell(results[n]["generation/answers"][i]) for n in names]
            rows.append(f"| {_cell(question, 40)} | {kind} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def _table(results: dict, plan: dict) -> str:
    rows = [
        "| policy | steps | budget (M fwd tokens) | train wall (min) | verifier accuracy | +/- vs start (p) | "
        "KL k1 | KL k3 | frac_in_U | abs. accuracy | chosen log-lik. | rejected log-lik. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results.items():
        p = plan["plan"].get(name, {})
        wall = plan["wall_s"].get(name)
        change = (
            ""
            if "mcnemar/p" not in m
            else f"+{m['mcnemar/gained']:.0f} / -{m['mcnemar/lost']:.0f} ({m['mcnemar/p']:.2g})"
        )
        rows.append(
            f"| {name} | {p.get('steps', 0)} | {p.get('budget', 0) / 1e6:.2f} | "
            f"{'' if wall is None else f'{wall / 60:.1f}'} | {m['generation/accuracy']:.3f} | {change} | "
            f"{m['kl/k1']:.2f} | "
            f"{m['kl/k3']:.2f} | {m['diagnostics/frac_in_U']:.3f} | {m['diagnostics/abs_accuracy']:.3f} | "
            f"{m['logps/chosen']:.2f} | {m['logps/rejected']:.2f} |"
        )
    return "\n".join(rows)


def _plot(results: dict, plan: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpo_jax.report import RL_PANELS, plot_curves

    names = list(results)
    panels = (
        ("generation/accuracy", "verifier accuracy (greedy, held out)"),
        ("kl/k3", "KL(pi || pi_ref), k3"),
        ("diagnostics/frac_in_U", "share of held-out pairs in U"),
        ("diagnostics/abs_accuracy", "policy prefers chosen"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [results[n][key] for n in names], color=["grey"] + [f"C{i}" for i in range(len(names) - 1)])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(
        f"SmolLM2-135M-Instruct, arithmetic; budget {plan['plan']['dpo']['budget'] / 1e6:.2f}M "
        "forward-token equivalents each"
    )
    fig.tight_layout()
    fig.savefig(FIGURES / "summary.png", dpi=100)
    plt.close(fig)
    for run in RL_RUNS:  # the sampled runs' own training curves
        if (OUT / run / "metrics.jsonl").is_file():
            plot_curves(OUT / run / "metrics.jsonl", FIGURES / f"{run}_curves.png", panels=RL_PANELS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["train", "report", "all"])
    parser.add_argument("--pref-steps", type=int, default=48, help="DPO/CPO steps; RLOO gets the same budget")
    parser.add_argument("--only", nargs="+", help=f"train only these runs; variants: {sorted(VARIANTS)}")
    parser.add_argument("--fresh", action="store_true", help="re-evaluate runs that have a cached eval.json")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the table in docs/paper_reproduction.md")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.stage in ("train", "all"):
        train(args.pref_steps, args.only)
    if args.stage in ("report", "all"):
        report(args.update_docs, args.fresh)


if __name__ == "__main__":
    from cpo_jax.errors import run_tool

    sys.exit(run_tool(main))
