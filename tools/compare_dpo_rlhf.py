"""DPO vs CPO vs RLOO from the same SmolLM2-135M-Instruct on the verifiable arithmetic task, matched compute.

    python tools/compare_dpo_rlhf.py all --update-docs      # train the three runs, evaluate, write the doc section
    python tools/compare_dpo_rlhf.py train [--pref-steps 48]  # cpo-jax train configs/compare/{dpo,cpo,rloo}.yaml
    python tools/compare_dpo_rlhf.py report [--update-docs]   # evaluate the start model and the three policies

DPO and CPO train on offline preference pairs (right answer chosen, a plausible wrong one rejected); RLOO samples
its own answers and is rewarded by the verifier, with a KL penalty to the start. The budget is counted in forward
token equivalents of padded rows (:mod:`cpo_jax.experiments.compare`): the tool gives DPO and CPO
``--pref-steps`` steps and RLOO as many steps as fit in the same budget. Every policy is then measured the same way:
greedy verifier accuracy on held-out prompts, KL(pi || pi_ref) on its own samples, and the paper's diagnostics on
held-out preference pairs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "compare"
OUT = ROOT / "runs" / "compare"
DOC = ROOT / "docs" / "paper_reproduction.md"
FIGURES = ROOT / "docs" / "figures" / "compare"
BEGIN, END = "<!-- compare-table:begin -->", "<!-- compare-table:end -->"
RUNS = ("dpo", "cpo", "rloo")
EVAL_PROMPTS = "bundled:arithmetic-eval-prompts:64"
EVAL_PAIRS = "bundled:arithmetic-eval:64"


def _load(run: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(CONFIGS / f"{run}.yaml")


def budgets(pref_steps: int) -> dict[str, dict]:
    """Steps and forward-token budget of each run, RLOO's steps fitted to the preference budget."""
    from cpo_jax.experiments.compare import preference_step_cost, rl_step_cost

    out = {}
    for run in ("dpo", "cpo"):
        c = _load(run)
        cost = preference_step_cost(c.data.pairs_per_batch, c.data.max_length,
                                    reference_forward=c.loss.reference == "separate")
        out[run] = {"steps": pref_steps, "step_cost": cost, "budget": pref_steps * cost}
    c = _load("rloo")
    cost = rl_step_cost(c.rl.prompts_per_step, c.rl.num_generations, c.data.max_prompt_length, c.rl.max_new_tokens,
                        c.rl.get("ppo_epochs", 1))
    steps = max(1, round(out["dpo"]["budget"] / cost))
    out["rloo"] = {"steps": steps, "step_cost": cost, "budget": steps * cost}
    return out


def train(pref_steps: int) -> dict:
    """Runs ``cpo-jax train`` for each config with its budgeted steps; returns wall times."""
    plan = budgets(pref_steps)
    times = {}
    for run in RUNS:
        steps = plan[run]["steps"]
        eval_every = max(1, steps // 2)
        cmd = [sys.executable, "-m", "cpo_jax.cli", "train", str(CONFIGS / f"{run}.yaml"), f"steps={steps}",
               f"eval_every={eval_every}", f"output_dir={OUT / run}"]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        times[run] = time.perf_counter() - start
    (OUT / "plan.json").write_text(json.dumps({"plan": plan, "wall_s": times}, indent=2))
    return times


def pair_logps(model, tokenizer, pairs, c):
    """``[N, 2]`` summed (chosen, rejected) log-probs of the held-out pairs under the run configs' length policy."""
    from cpo_jax.data import BatchConfig, TokenizeConfig
    from cpo_jax.train.reference_cache import compute_reference_logps

    tok = TokenizeConfig(max_length=c.data.max_length, max_prompt_length=c.data.max_prompt_length)
    batch = BatchConfig(pairs_per_batch=8, max_length=c.data.max_length, pad_id=tokenizer.pad_token_id or 0)
    return compute_reference_logps(model, pairs.records, pairs.sources, tokenizer, tok, batch)


def evaluate(path, reference, tokenizer, prompts, pair_records, reference_pairs, c) -> dict:
    """Verifier accuracy, sampled KL to the reference, and the paper's diagnostics of one policy."""
    from cpo_jax.experiments.compare import pair_diagnostics, sampled_kl
    from cpo_jax.models import from_pretrained
    from cpo_jax.report import generation_accuracy

    policy = reference if path is None else from_pretrained(path)
    metrics = generation_accuracy(policy, tokenizer, EVAL_PROMPTS, max_new_tokens=c.rl.eval_max_new_tokens,
                                  max_prompt_length=c.data.max_prompt_length)
    metrics |= sampled_kl(policy, reference, tokenizer, prompts, prompt_length=c.data.max_prompt_length,
                          max_new_tokens=c.rl.max_new_tokens)
    return metrics | pair_diagnostics(pair_logps(policy, tokenizer, pair_records, c), reference_pairs)


def report(update_docs: bool) -> str:
    """Evaluates the start model and the three runs; writes the table, JSON and figures."""
    from transformers import AutoTokenizer

    from cpo_jax.data import load_records
    from cpo_jax.hf.resolve import resolve_model_path
    from cpo_jax.models import from_pretrained

    c = _load("rloo")
    start_path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(start_path)
    reference = from_pretrained(start_path)
    prompts = load_records(EVAL_PROMPTS, "prompt_only")
    pairs = load_records(EVAL_PAIRS, "preference")
    reference_pairs = pair_logps(reference, tokenizer, pairs, c)
    plan = json.loads((OUT / "plan.json").read_text())
    results = {"start": evaluate(None, reference, tokenizer, prompts, pairs, reference_pairs, c)}
    for run in RUNS:
        results[run] = evaluate(OUT / run / "hf", reference, tokenizer, prompts, pairs, reference_pairs, c)
        print(run, results[run], flush=True)
    (OUT / "results.json").write_text(json.dumps({"plan": plan, "results": results}, indent=2))
    FIGURES.mkdir(parents=True, exist_ok=True)
    _plot(results, plan)
    table = _table(results, plan)
    (OUT / "table.md").write_text(table)
    if update_docs:
        text = DOC.read_text()
        text = re.sub(f"{re.escape(BEGIN)}.*?{re.escape(END)}", f"{BEGIN}\n{table}\n{END}", text, flags=re.DOTALL)
        DOC.write_text(text)
    print(table)
    return table


def _table(results: dict, plan: dict) -> str:
    rows = ["| policy | steps | budget (M fwd tokens) | train wall (min) | verifier accuracy | KL k1 | KL k3 | "
            "frac_in_U | abs. accuracy | chosen log-lik. | rejected log-lik. |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in results.items():
        p = plan["plan"].get(name, {})
        wall = plan["wall_s"].get(name)
        rows.append(
            f"| {name} | {p.get('steps', 0)} | {p.get('budget', 0) / 1e6:.2f} | "
            f"{'' if wall is None else f'{wall / 60:.1f}'} | {m['generation/accuracy']:.3f} | {m['kl/k1']:.2f} | "
            f"{m['kl/k3']:.2f} | {m['diagnostics/frac_in_U']:.3f} | {m['diagnostics/abs_accuracy']:.3f} | "
            f"{m['logps/chosen']:.2f} | {m['logps/rejected']:.2f} |")
    return "\n".join(rows)


def _plot(results: dict, plan: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpo_jax.report import RL_PANELS, plot_curves

    names = list(results)
    panels = (("generation/accuracy", "verifier accuracy (greedy, held out)"), ("kl/k3", "KL(pi || pi_ref), k3"),
              ("diagnostics/frac_in_U", "share of held-out pairs in U"),
              ("diagnostics/abs_accuracy", "policy prefers chosen"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [results[n][key] for n in names], color=["grey", "C0", "C1", "C2"][: len(names)])
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"SmolLM2-135M-Instruct, arithmetic; budget {plan['plan']['dpo']['budget'] / 1e6:.2f}M "
                 "forward-token equivalents each")
    fig.tight_layout()
    fig.savefig(FIGURES / "summary.png", dpi=100)
    plt.close(fig)
    plot_curves(OUT / "rloo" / "metrics.jsonl", FIGURES / "rloo_curves.png", panels=RL_PANELS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["train", "report", "all"])
    parser.add_argument("--pref-steps", type=int, default=48, help="DPO/CPO steps; RLOO gets the same budget")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the table in docs/paper_reproduction.md")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.stage in ("train", "all"):
        train(args.pref_steps)
    if args.stage in ("report", "all"):
        report(args.update_docs)


if __name__ == "__main__":
    main()
