"""Reproduce the paper's failure mode and CPO's fix, exactly, with tabular softmax policies (Part A).

    python tools/reproduce_pathology.py                  # figures + table into runs/pathology (or --out DIR)
    python tools/reproduce_pathology.py --update-docs    # also into docs/figures/pathology and the table of
                                                         # docs/paper_reproduction.md

Two settings (``cpo_jax.experiments.tabular.SETTINGS``): one where the RLHF optimum prefers the better answer
on (almost) every pair, one where the reference prefers the worse answers so strongly that it does not
(``delta_ref < 0`` and ``beta·|delta_ref| > r_w - r_l``). DPO, CPO (three variants), IPO and SimPO are trained
full-batch from the reference. Seeds are fixed; the whole run takes about 15 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.special  # noqa: E402

from cpo_jax.experiments import tabular  # noqa: E402
from cpo_jax.losses import smooth_target  # noqa: E402
from cpo_jax.report import replace_marked  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "paper_reproduction.md"
DOC_FIGURES = ROOT / "docs" / "figures" / "pathology"
BEGIN, END = "<!-- tabular-table:begin -->", "<!-- tabular-table:end -->"
COLUMNS = [
    ("loss", "final loss"),
    ("frac_in_U", "frac_in_U"),
    ("frac_in_U_violated", "frac_in_U (violated)"),
    ("abs_accuracy", "abs. accuracy"),
    ("abs_accuracy_violated", "abs. accuracy (violated)"),
    ("true_reward", "true reward"),
    ("kl_to_ref", "KL to ref"),
    ("rlhf_objective", "r − β·KL"),
]


def run_all(steps: int) -> tuple[dict, dict]:
    """Trains every method in every setting; returns ``(trajectories, rows)`` keyed by setting then method."""
    trajectories, rows = {}, {}
    for name, setting in tabular.SETTINGS.items():
        problem = tabular.make_problem(setting)
        trajectories[name] = {"problem": problem}
        rows[name] = {
            "reference": _row(problem, problem.ref_logits, loss=None),
            "RLHF optimum π*": _row(problem, tabular.rlhf_optimum_logits(problem), loss=None),
        }
        for method in tabular.METHODS:
            trajectory = tabular.train(problem, method, steps=steps)
            trajectories[name][method] = trajectory
            rows[name][method] = _row(problem, trajectory.final_log_policy, loss=float(trajectory.loss[-1]))
            rows[name][method]["initial loss"] = float(trajectory.loss[0])
    return trajectories, rows


def _row(problem: tabular.Problem, logits: np.ndarray, *, loss: float | None) -> dict:
    log_policy = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    summary = {k: float(v) for k, v in tabular.policy_summary(log_policy, problem).items()}
    summary["rlhf_objective"] = summary["true_reward"] - problem.beta * summary["kl_to_ref"]
    summary["loss"] = loss
    return summary


def markdown_table(rows: dict, trajectories: dict) -> str:
    """One markdown table per setting: method × the final diagnostics."""
    out = []
    for setting, by_method in rows.items():
        problem_setting = tabular.SETTINGS[setting]
        problem = trajectories[setting]["problem"]
        n_violated = int(tabular.violated_pairs(problem).sum())
        out.append(
            f"**{setting}** (reference slope {problem_setting.ref_slope}, β = {problem_setting.beta}; "
            f"{n_violated} of {len(problem.pair_prompt)} pairs violate the assumption)\n"
        )
        out.append("| method | " + " | ".join(title for _, title in COLUMNS) + " |")
        out.append("|---|" + "---:|" * len(COLUMNS))
        for method, row in by_method.items():
            cells = []
            for key, _ in COLUMNS:
                value = row[key]
                if key == "loss" and value is not None:
                    cells.append(f"{row['initial loss']:.3f} → {value:.3f}")
                else:
                    cells.append("–" if value is None else f"{value + 0.0:.3f}".replace("-0.000", "0.000"))
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_loss_vs_preference(trajectories: dict, path: pathlib.Path) -> None:
    """Figure 1: in the violated setting, loss falls while the violated pairs keep preferring y_l (DPO)."""
    problem = trajectories["problem"]
    violated = tabular.violated_pairs(problem)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, method in zip(axes, ["dpo", "cpo", "cpo_clip"]):
        t = trajectories[method]
        prefers_rejected = (t.delta_theta[:, violated] < 0).mean(axis=1)
        ax.plot(t.steps, t.loss, color="black", label="loss")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("step (log scale after 10)")
        ax.set_ylabel("loss")
        ax.set_title(method)
        twin = ax.twinx()
        twin.plot(t.steps, prefers_rejected, color="tab:red", label="violated pairs preferring y_l")
        twin.plot(t.steps, t.summary["frac_in_U_violated"], color="tab:orange", ls="--", label="violated pairs in U")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("share of violated pairs")
        if method == "dpo":
            lines = ax.get_lines() + twin.get_lines()
            ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    fig.suptitle("Violated setting: DPO's loss falls while the policy keeps preferring the rejected answer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_delta_plane(trajectories: dict, path: pathlib.Path, *, pairs: int = 40) -> None:
    """Figure 2: the (delta_ref, delta_theta) plane with U shaded and pair trajectories."""
    problem = trajectories["problem"]
    delta_ref = np.asarray(tabular.pair_deltas(scipy.special.log_softmax(problem.ref_logits, axis=-1), problem))
    delta_star = np.asarray(tabular.pair_deltas(tabular.rlhf_optimum_logits(problem), problem))
    violated = tabular.violated_pairs(problem)
    chosen = np.random.RandomState(0).choice(len(delta_ref), size=min(pairs, len(delta_ref)), replace=False)
    lo = min(delta_ref.min(), -1.0) - 0.5
    methods = ["dpo", "cpo", "cpo_clip", "simpo"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4.2), sharey=True)
    for ax, method in zip(axes, methods):
        t = trajectories[method]
        hi = max(1.0, delta_ref.max() + 0.5)
        ax.fill_between([lo, 0.0], [lo, 0.0], [0.0, 0.0], color="tab:red", alpha=0.15, label="U")
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":", label="δθ = δref (start)")
        ax.axhline(0.0, color="grey", lw=0.8)
        for q in chosen:
            colour = "tab:red" if violated[q] else "tab:blue"
            ax.plot(np.full(len(t.steps), delta_ref[q]), t.delta_theta[:, q], color=colour, alpha=0.35, lw=1)
            ax.plot(delta_ref[q], t.delta_theta[-1, q], "o", color=colour, ms=3)
        if method == "dpo":
            ax.plot(delta_ref[chosen], delta_star[chosen], "kx", ms=4, label="RLHF optimum δ*")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, max(5.0, t.delta_theta[-1].max() + 0.5))
        ax.set_title(method)
        ax.set_xlabel("δref")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("δθ over training (red: violated pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_soft_margin(path: pathlib.Path, *, method: str, delta_ref: float = -2.0, gamma: float = 0.5) -> None:
    """Figures 3/4: (1/beta)·L approaching its hinge as beta grows (DPO: target delta_ref; CPO: held above gamma)."""
    grid = np.linspace(-6.0, 4.0, 401)
    betas = [0.5, 1.0, 2.0, 5.0, 20.0]
    if method == "sigmoid":
        target, hparams, title = delta_ref, {}, f"DPO: (1/β)·L → max(0, δref − δθ), δref = {delta_ref}"
    else:
        target = float(smooth_target(np.float32(delta_ref), gamma=gamma, tau=2.0))
        hparams = {"gamma": gamma, "tau": 2.0}
        title = f"CPO: (1/β)·L → max(0, t − δθ), t = {target:.3f} ≥ γ = {gamma}, δref = {delta_ref}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axvspan(delta_ref, 0.0, color="tab:red", alpha=0.12, label="U (δref < δθ < 0)")
    for beta in betas:
        ax.plot(grid, tabular.scaled_loss_curve(method, grid, delta_ref, beta, **hparams), label=f"β = {beta}")
    ax.plot(grid, np.maximum(0.0, target - grid), "k--", lw=2, label="hinge")
    ax.set_xlabel("δθ")
    ax.set_ylabel("(1/β)·loss")
    ax.set_ylim(-0.1, 7)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def beta_sweep(steps: int, betas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> dict:
    """Violated setting at several beta: the share of violated pairs and each method's absolute accuracy on them."""
    out = {}
    for beta in betas:
        problem = tabular.make_problem(dataclasses.replace(tabular.SETTINGS["violated"], beta=beta))
        violated = tabular.violated_pairs(problem)
        row = {"violated_share": float(violated.mean())}
        for method in ("dpo", "cpo", "cpo_clip"):
            final = tabular.train(problem, method, steps=steps).delta_theta[-1]
            row[method] = float((final[violated] > 0).mean()) if violated.any() else float("nan")
        out[beta] = row
    return out


def plot_beta_sweep(sweep: dict, path: pathlib.Path) -> None:
    """Figure 5: as beta grows more pairs violate the assumption; DPO stays wrong on them, CPO does not."""
    betas = list(sweep)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(betas, [sweep[b]["violated_share"] for b in betas], "k--o", label="share of pairs violating the assumption")
    for method in ("dpo", "cpo", "cpo_clip"):
        ax.plot(betas, [sweep[b][method] for b in betas], "-o", label=f"{method}: abs. accuracy on violated pairs")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("β")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Violated setting, by β", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(sweep: dict) -> str:
    """Markdown: beta -> violated share and the absolute accuracy of DPO/CPO on the violated pairs."""
    lines = ["| β | pairs violating | dpo: abs. acc. (violated) | cpo | cpo_clip |", "|---:|---:|---:|---:|---:|"]
    for beta, row in sweep.items():
        lines.append(
            f"| {beta:g} | {row['violated_share']:.3f} | {row['dpo']:.3f} | {row['cpo']:.3f} | {row['cpo_clip']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs") / "pathology")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"write the figures into {DOC_FIGURES.relative_to(ROOT)} and the table into docs/paper_reproduction.md",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    trajectories, rows = run_all(args.steps)
    plot_loss_vs_preference(trajectories["violated"], args.out / "fig1_loss_vs_preference.png")
    plot_delta_plane(trajectories["violated"], args.out / "fig2_delta_plane.png")
    plot_soft_margin(args.out / "fig3_dpo_soft_margin.png", method="sigmoid")
    plot_soft_margin(args.out / "fig4_cpo_soft_margin.png", method="cpo")
    sweep = beta_sweep(args.steps)
    plot_beta_sweep(sweep, args.out / "fig5_beta_sweep.png")
    table = (
        markdown_table(rows, trajectories) + "\nβ sweep (violated setting; Figure 5):\n\n" + sweep_table(sweep) + "\n"
    )
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.update_docs:
        DOC_FIGURES.mkdir(parents=True, exist_ok=True)
        for figure in sorted(args.out.glob("fig*.png")):
            shutil.copyfile(figure, DOC_FIGURES / figure.name)
        replace_marked(DOC, BEGIN, END, table)
    print(table)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    from cpo_jax.errors import run_tool

    sys.exit(run_tool(main))
