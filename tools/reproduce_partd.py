"""Part D of the paper at LM scale (issue 20): Bradley–Terry-noised violated pairs on SmolLM2-135M-Instruct.

    python tools/reproduce_pathology_llm.py mine             # 0. the mined pairs (shared with Part B)
    python tools/reproduce_partd.py label                    # 1. BT-labelled training files, one per seed
    python tools/reproduce_partd.py run                      # 2. every cell (method x beta x units x seed)
    python tools/reproduce_partd.py run --methods dpo cpo --betas 1 --units summed --seeds 0 1 2   # any subset
    python tools/reproduce_partd.py report [--update-docs]   # 3. table with 95% intervals, paired tests, figures

The pairs are the held-out-safe violated pairs of Part B (the reference prefers the wrong answer; train and
held-out questions disjoint by construction). The correct answer is better by a known reward margin, and each
training pair appears ``--copies`` times in both orders in proportion ``sigmoid(margin)``
(:func:`cpo_jax.experiments.noisy.bt_labelled`). Every cell trains from the same reference with the same budget
(``configs/paper/partd.yaml``) in this one process, and then measures, on the held-out violated pairs and their
questions: frac_in_U, absolute accuracy, true-reward win rate, the chosen log-likelihood change (summed and per
token), greedy verifier accuracy and the sampled KL to the reference. A finished cell's result is kept in git, in
``docs/results/partd/cells/<cell>.json`` (with the reference's own measurements in ``reference.json``), so that the
report can be rebuilt on any checkout; checkpoints and logs stay in ``runs/``, which git ignores. A finished cell is
skipped on the next ``run``; one finished under other settings (labels, held-out pairs, config or budget) is refused
(``--force`` reruns it).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import shutil
import sys
import time
from typing import NoReturn

import numpy as np

from cpo_jax.experiments.kept import KeptResults, portable, sha256_of, without_execution_keys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINED = DEFAULT_MINED = ROOT / "runs" / "paper_llm" / "data"
OUT = ROOT / "runs" / "paper_llm" / "partd"
RESULTS = ROOT / "docs" / "results" / "partd"  # tracked: the numbers behind the doc's table
BASE = ROOT / "configs" / "paper" / "partd.yaml"
DOC = ROOT / "docs" / "paper_reproduction.md"
FIGURES = ROOT / "docs" / "figures" / "partd"
BEGIN, END = "<!-- partd-table:begin -->", "<!-- partd-table:end -->"
KL_PROMPTS, KL_TOKENS = 32, 16  # KL(pi || pi_ref) from one sample on each of the first 32 held-out questions


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    beta: float
    units: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_b{self.beta:g}_{self.units}_s{self.seed}"


def _fail(message: str) -> NoReturn:
    """A user error: ``run_tool`` prints it in a few lines and exits with status 2, as for the library's own."""
    from cpo_jax.errors import UserError

    raise UserError(message)


def train_file(seed: int) -> pathlib.Path:
    return OUT / "data" / f"train_seed{seed}.jsonl"


def label(seeds: list[int], reward_margin: float, copies: int) -> None:
    """Writes the BT-labelled training file of each seed (and ``labels.json`` with the settings)."""
    from cpo_jax.data import load_records, write_jsonl
    from cpo_jax.experiments.noisy import bt_labelled, true_preference

    source = MINED / "violated_train.jsonl"
    if not source.is_file():
        _fail(f"{source} is missing: mine the pairs first (python tools/reproduce_pathology_llm.py mine)")
    pairs = [dict(r) for r in load_records(source).records]
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    settings = {"reward_margin": reward_margin, "copies": copies, "source": str(shown)}
    (OUT / "data").mkdir(parents=True, exist_ok=True)
    saved = OUT / "data" / "labels.json"
    if saved.is_file() and {k: v for k, v in json.loads(saved.read_text()).items() if k != "seeds"} != settings:
        _fail(
            f"{saved} was written with other settings ({saved.read_text().strip()}); cells trained on those labels "
            f"would mix with new ones. Move {OUT} away to start over."
        )
    for seed in seeds:
        records = bt_labelled(pairs, reward_margin=reward_margin, copies=copies, seed=seed)
        write_jsonl(records, train_file(seed))
        kept = sum(r["true_order"] for r in records) / len(records)
        p = true_preference(reward_margin)
        print(f"seed {seed}: {len(records)} records, {kept:.3f} in the true order (p = {p:.3f})")
    done = sorted(set(json.loads(saved.read_text()).get("seeds", [])) | set(seeds)) if saved.is_file() else seeds
    saved.write_text(json.dumps({**settings, "seeds": done}, indent=1) + "\n")


def _settings() -> dict:
    path = OUT / "data" / "labels.json"
    if not path.is_file():
        _fail(f"{path} is missing: write the labelled training files first (python tools/reproduce_partd.py label)")
    return json.loads(path.read_text())


def cell_overrides(cell: Cell) -> list[str]:
    """The ``key=value`` overrides of ``configs/paper/partd.yaml`` that make ``cell``."""
    from cpo_jax.experiments.noisy import loss_of

    name, hparams = loss_of(cell.method, cell.beta, cell.units)
    out = [
        f"output_dir={OUT / cell.name}",
        f"data.train_files=[{train_file(cell.seed)}]",
        f"loss.name={name}",
        f"seed={cell.seed}",
        f"data.seed={cell.seed}",
    ]
    out += [f"loss.hparams.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in hparams.items()]
    if cell.method == "simpo":
        out.append("loss.reference=none")
    if MINED != DEFAULT_MINED:  # the config names the default location
        out.append(f"data.eval_files=[{MINED / 'violated_eval.jsonl'}]")
    return out


def _cells():
    """The kept cell results (:class:`cpo_jax.experiments.kept.KeptResults`), one ``<cell>.json`` each."""
    return KeptResults(RESULTS / "cells", "python tools/reproduce_partd.py run")


def _kept():
    """The store beside the cells that keeps the reference's own measurements, as ``reference.json``."""
    return KeptResults(RESULTS, "python tools/reproduce_partd.py run")


def _spec(cell: Cell, cfg) -> dict:
    """What the cell's result depends on: its settings, the resolved config, and the hashes of its labelled training
    file and of the held-out pairs it is measured on."""
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    config.pop("output_dir", None)
    eval_pairs = MINED / "violated_eval.jsonl"
    measure = {"kl_prompts": KL_PROMPTS, "kl_tokens": KL_TOKENS, "eval_pairs": str(eval_pairs),
               "eval_sha256": sha256_of(eval_pairs)}  # fmt: skip
    return portable({
        "cell": dataclasses.asdict(cell),
        "labels": _settings() | {"sha256": sha256_of(train_file(cell.seed))},  # comparable() ignores its "seeds"
        "config": config,
        "measure": measure,
    }, ROOT)  # fmt: skip


def _check_kept_reference() -> None:
    """Refuses to add cells to kept results that were measured on other held-out pairs (re-mined, another hash)."""
    kept, pairs = _kept().path("reference"), MINED / "violated_eval.jsonl"
    reference = _kept().load("reference")
    if reference is None or not pairs.is_file():  # nothing kept yet; or the trainer names the missing file
        return
    expected, digest = reference["eval_sha256"], sha256_of(pairs)
    if expected != digest:
        _fail(
            f"{kept} and the cells beside it were measured on other held-out pairs than {pairs} (sha256 "
            f"{expected[:12]} against {digest[:12]}); new cells would mix with them. Restore the mined pairs they "
            f"came from, or move {RESULTS} away."
        )


def load_reference() -> dict:
    """The kept reference measurements (``before``, ``logps``, ``lengths``, ``eval_sha256``) on the held-out pairs."""
    reference = _kept().load("reference")
    if reference is None:
        _fail(
            f"{_kept().path('reference')} is missing: run a cell first (python tools/reproduce_partd.py run), which "
            "measures the reference"
        )
    return reference


def comparable(spec: dict) -> dict:
    """``spec`` without the list of labelled seeds and without the execution-only model keys
    (:func:`cpo_jax.experiments.kept.without_execution_keys`): what must match for a finished cell to be kept."""
    if "labels" in spec:  # which other seeds were labelled beside this cell's does not change it
        spec = {**spec, "labels": {k: v for k, v in spec["labels"].items() if k != "seeds"}}
    return without_execution_keys(spec)


class Evaluator:
    """The held-out measurements, with the reference loaded once for every cell of the process."""

    def __init__(self, cfg):
        from transformers import AutoTokenizer

        from cpo_jax.data import load_records
        from cpo_jax.hf.pretrained import from_pretrained
        from cpo_jax.hf.resolve import resolve_model_path

        path = resolve_model_path(cfg.model.path)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.reference = from_pretrained(path)
        self.pairs = load_records(list(cfg.data.eval_files))
        self.prompts_path = str(MINED / "violated_eval_prompts.jsonl")
        prompts = load_records(self.prompts_path, "prompt_only")
        self.kl_prompts = dataclasses.replace(
            prompts, records=prompts.records[:KL_PROMPTS], sources=prompts.sources[:KL_PROMPTS]
        )
        saved = _kept().load("reference")
        if saved is not None:  # run() has checked that it was measured on these held-out pairs
            self.ref_logps, self.lengths = np.asarray(saved["logps"]), np.asarray(saved["lengths"])
            self.before = saved["before"]
        else:
            self.ref_logps, self.lengths = self.pair_logps(self.reference)
            self.before = self.measure(self.reference, seed=0, with_kl=False)  # every cell's step 0
            kept_value = {
                "eval_sha256": sha256_of(MINED / "violated_eval.jsonl"),
                "before": self.before,
                "logps": self.ref_logps.tolist(),
                "lengths": self.lengths.tolist(),
            }
            _kept().save("reference", kept_value)

    def pair_logps(self, model) -> tuple[np.ndarray, np.ndarray]:
        from cpo_jax.data import BatchConfig, TokenizeConfig
        from cpo_jax.train.reference_cache import compute_reference_logps

        d = self.cfg.data
        return compute_reference_logps(
            model, self.pairs.records, self.pairs.sources, self.tokenizer,
            TokenizeConfig(max_length=d.max_length, max_prompt_length=d.max_prompt_length),
            BatchConfig(pairs_per_batch=16, max_length=d.max_length, pad_id=self.tokenizer.pad_token_id or 0),
            return_lengths=True,
        )  # fmt: skip

    def measure(self, model, *, seed: int, with_kl: bool = True) -> dict:
        """Pair metrics (:func:`noisy.pair_metrics`), greedy verifier outcomes and the sampled KL of ``model``."""
        from cpo_jax.experiments.compare import sampled_kl
        from cpo_jax.experiments.noisy import pair_metrics
        from cpo_jax.report import generation_correct, generation_metrics

        logps, _ = self.pair_logps(model)
        out = pair_metrics(logps, self.ref_logps, self.lengths)
        correct = generation_correct(
            model, self.tokenizer, self.prompts_path, max_new_tokens=self.cfg.eval_generation_tokens,
            max_prompt_length=self.cfg.data.max_prompt_length,
        )  # fmt: skip
        out.update(generation_metrics(correct))
        if with_kl:
            out.update(
                sampled_kl(
                    model,
                    self.reference,
                    self.tokenizer,
                    self.kl_prompts,
                    prompt_length=self.cfg.data.max_prompt_length,
                    max_new_tokens=KL_TOKENS,
                    seed=seed,
                )  # fmt: skip
            )
        else:
            out.update({"kl/k1": 0.0, "kl/k3": 0.0})
        out["delta_theta"] = (logps[:, 0] - logps[:, 1]).tolist()
        return out


def _curve(out: pathlib.Path) -> list[dict]:
    """The in-training held-out evaluations (``eval/`` rows of metrics.jsonl)."""
    from cpo_jax.train.metrics_writer import read_metrics

    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    return [
        {"step": r["step"], **{k[len("eval/") :]: v for k, v in r.items() if k.startswith("eval/")}}
        for r in rows
        if any(k.startswith("eval/") for k in r)
    ]


def run_cell(cell: Cell, evaluator: Evaluator | None, *, force: bool) -> Evaluator:
    """Trains and measures one cell (skipped when done with the same spec); returns the process's evaluator."""
    from cpo_jax.cli import load_config
    from cpo_jax.train.trainer import Trainer

    cfg = load_config(BASE, cell_overrides(cell))
    spec = _spec(cell, cfg)
    out = OUT / cell.name
    kept = _cells()
    if kept.finished(cell.name, spec, force=force, comparable=comparable):  # refuses one kept under another spec
        print(f"{cell.name}: done, skipped")
        return evaluator
    if out.exists():  # an interrupted cell: no result was written, its partial files are ours to replace
        print(f"{cell.name}: removing the interrupted attempt in {out}")
        shutil.rmtree(out)
    evaluator = evaluator or Evaluator(cfg)
    shared = OUT / "reference_cache"  # keyed by data and model: cells of one seed share the reference pass
    shared.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True)
    (out / "reference_cache").symlink_to(shared, target_is_directory=True)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.run()
    train_seconds = time.perf_counter() - start
    after = evaluator.measure(trainer.policy(), seed=cell.seed)
    curve = _curve(out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # 1.6 GB per cell; the result is kept in RESULTS
    record = {
        "spec": spec,
        "after": after,
        "curve": curve,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }
    kept.save(cell.name, record)
    print(
        f"{cell.name}: frac_in_U {after['frac_in_U']:.3f} (per token {after['frac_in_U_norm']:.3f}), "
        f"abs acc {after['abs_accuracy']:.3f}, generation {after['generation/accuracy']:.3f}, "
        f"KL k3 {after['kl/k3']:.2f}, {record['seconds']:.0f} s",
        flush=True,
    )
    return evaluator


def cells(methods, betas, units, seeds) -> list[Cell]:
    """The grid in the given order (seed outermost: one seed of every cell first), where the method is defined."""
    from cpo_jax.experiments.noisy import METHODS

    return [
        Cell(m, float(b), u, s)
        for s in seeds
        for b in betas
        for u in units
        for m in methods
        if METHODS[m][u] is not None
    ]


def run(grid: list[Cell], force: bool) -> None:
    import jax

    if not grid:
        _fail("no cell to run: ipo and simpo are defined on per-token log-probs only (add --units normalised)")

    jax.config.update("jax_compilation_cache_dir", str(OUT / "xla_cache"))  # cells of one loss share compiles
    settings = _settings()
    missing = sorted({c.seed for c in grid} - set(settings["seeds"]))
    if missing:
        _fail(f"no labelled training file for seeds {missing}: run `python tools/reproduce_partd.py label --seeds ...`")
    _check_kept_reference()
    evaluator = None
    for cell in grid:
        evaluator = run_cell(cell, evaluator, force=force)


# ---------------------------------------------------------------------------------------------------- report

REPORTED = [
    ("frac_in_U", "frac_in_U", "{:.3f}"),
    ("abs_accuracy", "abs. acc.", "{:.3f}"),
    ("win_rate", "true-reward win rate", "{:.3f}"),
    ("kl/k3", "KL k3", "{:.2f}"),
    ("chosen_logp_change", "Δ chosen log-lik.", "{:+.2f}"),
    ("generation/accuracy", "verifier acc.", "{:.3f}"),
]


def _unit_key(key: str, units: str) -> str:
    """U and the accuracy are read in the loss's units (the theory's); the win rate always from the policy's
    sequence probabilities (``sigmoid`` of the summed margin: its odds of picking the better answer)."""
    return f"{key}_norm" if units == "normalised" and key in ("frac_in_U", "abs_accuracy") else key


def load_cells() -> list[dict]:
    out = []
    for record in _cells().records().values():
        margin = record["spec"]["labels"]["reward_margin"]
        out.append({**record["spec"]["cell"], "after": record["after"], "curve": record["curve"],
                    "seconds": record["seconds"], "reward_margin": margin})  # fmt: skip
    return out


def predicted_in_u(method: str, beta: float, units: str, reward_margin: float, reference: dict) -> float | None:
    """The theory's fraction of held-out pairs whose minimiser lies in U, in the cell's units (``reference``: the
    kept :func:`load_reference`)."""
    from cpo_jax.experiments.noisy import in_u, predicted_margin

    r, n = np.asarray(reference["logps"], np.float64), np.asarray(reference["lengths"], np.float64)
    d = r[:, 0] - r[:, 1] if units == "summed" else r[:, 0] / n[:, 0] - r[:, 1] / n[:, 1]
    margin = predicted_margin(method, d, reward_margin=reward_margin, beta=beta)
    return None if margin is None else float(in_u(margin, d).mean())


def report(update_docs: bool) -> str:
    from cpo_jax.experiments.noisy import METHODS, mean_ci_text, paired_seed_test, verdict

    records = load_cells()
    if not records:
        _fail(f"no finished cell in {RESULTS / 'cells'}: run `python tools/reproduce_partd.py run` first")
    margins = {r["reward_margin"] for r in records}
    if len(margins) != 1:
        _fail(f"the cells in {RESULTS / 'cells'} were labelled with different reward margins {sorted(margins)}")
    margin = margins.pop()
    reference = load_reference()
    before = reference["before"]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["beta"], r["units"], r["method"]), []).append(r)
    lines = [
        "| β | units | method | seeds | predicted in U | " + " | ".join(t for _, t, _ in REPORTED) + " |",
        "|---:|---|---|---:|---:|" + "---:|" * len(REPORTED),
    ]
    for units in ("summed", "normalised"):
        cells_ = [f"{before[_unit_key(k, units)]:{f[2:-1]}}" if _unit_key(k, units) in before else "–"
                  for k, _, f in REPORTED]  # fmt: skip
        lines.append(f"| – | {units} | reference | – | – | " + " | ".join(cells_) + " |")
    order = list(METHODS)
    for (beta, units, method), rows in sorted(
        groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], order.index(kv[0][2]))
    ):
        rows = sorted(rows, key=lambda r: r["seed"])
        predicted = predicted_in_u(method, beta, units, margin, reference)
        cells_ = [
            mean_ci_text([r["after"][_unit_key(key, units)] for r in rows], fmt[2:-1]) for key, _, fmt in REPORTED
        ]
        shown = "–" if predicted is None else f"{predicted:.2f}"
        lines.append(f"| {beta:g} | {units} | {method} | {len(rows)} | {shown} | " + " | ".join(cells_) + " |")
    lines += [
        "",
        "| β | units | comparison | frac_in_U difference (95% CI) | paired p | baseline in U predicted | verdict |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for beta in sorted({k[0] for k in groups}, reverse=True):
        for units in ("summed", "normalised"):
            # The losses whose target is anchored at delta_ref (DPO, IPO) against the constrained ones, paired by seed.
            for baseline, variant in itertools.product(("dpo", "ipo"), ("cpo", "cpo_clip")):
                base, other = groups.get((beta, units, baseline), []), groups.get((beta, units, variant), [])
                seeds = sorted({r["seed"] for r in base} & {r["seed"] for r in other})
                if not seeds:
                    continue
                key = _unit_key("frac_in_U", units)
                a = [next(r for r in base if r["seed"] == s)["after"][key] for s in seeds]
                b = [next(r for r in other if r["seed"] == s)["after"][key] for s in seeds]
                test = paired_seed_test(a, b)
                predicted = predicted_in_u(baseline, beta, units, margin, reference)
                word = verdict(a, b, predicted)
                d = test["diff"]
                ci = "" if math.isnan(d["half"]) else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
                p = "–" if math.isnan(test["p"]) else f"{test['p']:.2g}"
                n = f"{len(seeds)} seed" + "s" * (len(seeds) != 1)
                lines.append(f"| {beta:g} | {units} | {baseline.upper()} − {variant} | {d['mean']:+.3f}{ci} "
                             f"({n}) | {p} | {predicted:.2f} | **{word}** |")  # fmt: skip
    table = "\n".join(lines)
    figures = OUT / "figures"
    _figures(groups, figures, before)
    (figures / "table.md").write_text(table + "\n")
    if update_docs:
        shutil.copytree(figures, FIGURES, dirs_exist_ok=True)
        from cpo_jax.report import replace_marked

        replace_marked(DOC, BEGIN, END, table)
    print(table)
    return table


def _figures(groups: dict, directory: pathlib.Path, before: dict) -> None:
    """frac_in_U over training, mean across seeds with the 95% band, one panel per (beta, units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpo_jax.experiments.noisy import METHODS, mean_ci

    colour = {m: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method in every panel
    panels = sorted({(b, u) for b, u, _ in groups}, key=lambda p: (-p[0], p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (beta, units) in zip(axes[0], panels):
        key = "diagnostics/" + _unit_key("frac_in_U", units)
        for (b, u, method), rows in sorted(groups.items()):
            if (b, u) != (beta, units):
                continue
            steps = sorted({p["step"] for r in rows for p in r["curve"] if key in p})
            if not steps:  # no in-training value (SimPO: the trainer's eval needs a reference); the table has its end
                continue
            means, lows, highs = [], [], []
            for step in steps:
                ci = mean_ci([p[key] for r in rows for p in r["curve"] if p["step"] == step and key in p])
                means.append(ci["mean"])
                lows.append(ci["low"] if not math.isnan(ci["low"]) else ci["mean"])
                highs.append(ci["high"] if not math.isnan(ci["high"]) else ci["mean"])
            start = before.get(key.split("/", 1)[1], 0.0)  # step 0 is the reference, the same for every seed
            steps, means, lows, highs = [0, *steps], [start, *means], [start, *lows], [start, *highs]
            ax.plot(steps, means, marker=".", color=colour[method], label=f"{method} ({len(rows)} seeds)")
            ax.fill_between(steps, lows, highs, color=colour[method], alpha=0.15)
        ax.set_title(f"β = {beta:g}, {units}: held-out frac_in_U", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    fig.savefig(directory / "frac_in_u.png", dpi=110)
    plt.close(fig)


def main() -> None:
    global OUT, MINED, RESULTS
    from cpo_jax.experiments.noisy import METHODS, UNITS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["label", "run", "report"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--reward-margin", type=float, default=1.0, help="r(correct) - r(wrong), known")
    parser.add_argument("--copies", type=int, default=4, help="labelled copies of each training pair")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--betas", nargs="*", type=float, default=[1.0, 0.1])
    parser.add_argument("--units", nargs="*", default=list(UNITS), choices=list(UNITS))
    parser.add_argument("--force", action="store_true", help="rerun finished cells")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help="where labels and cells are kept")
    parser.add_argument("--mined", type=pathlib.Path, default=MINED, help="the mined pairs (Part B's mine stage)")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS, help="where finished cells' results are kept")
    args = parser.parse_args()
    OUT, MINED, RESULTS = args.out.resolve(), args.mined.resolve(), args.results.resolve()
    if args.stage == "label":
        label(args.seeds, args.reward_margin, args.copies)
    elif args.stage == "run":
        run(cells(args.methods, args.betas, args.units, args.seeds), args.force)
    else:
        report(args.update_docs)


if __name__ == "__main__":
    from cpo_jax.errors import run_tool

    sys.exit(run_tool(main))
