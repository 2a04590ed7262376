"""``tools/compare_dpo_rlhf.py``: the report is rebuilt from kept results only (means with 95% intervals across
seeds, per-seed McNemar tests against the start, paired comparisons), and runs are never mixed across settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
T975_DF2 = 4.302652729911275  # the 97.5% quantile of Student's t with 2 degrees of freedom
N = 8  # held-out prompts in the fake results


def tool(*args, expect=2):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare_dpo_rlhf.py"), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == expect, proc.stdout + proc.stderr
    if expect == 2:
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    return proc


def load_tool():
    sys.path.insert(0, str(REPO / "tools"))
    import compare_dpo_rlhf

    return compare_dpo_rlhf


EVAL = {"prompts": ["p", 8], "sha256": "a" * 64}


def measured(solved: int, kl: float = 1.0, in_u: float = 0.1) -> dict:
    """Fake measurements on N prompts: the first ``solved`` answered right."""
    correct = [i < solved for i in range(N)]
    return {"generation/accuracy": solved / N, "generation/correct": correct,
            "generation/answers": [f"answer {i}" for i in range(N)], "kl/k1": kl, "kl/k3": kl,
            "diagnostics/frac_in_U": in_u, "diagnostics/abs_accuracy": 0.8, "logps/chosen": -12.0,
            "logps/rejected": -15.0}  # fmt: skip


def keep(results: Path, run: str, seed: int, solved: int, *, kl: float = 1.0, eval_spec=EVAL, config=None) -> Path:
    spec = {"run": run, "seed": seed, "plan": {"steps": 48, "step_cost": 2304, "budget": 110592},
            "config": config or {}, "eval": eval_spec}  # fmt: skip
    path = results / "runs" / f"{run}_s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    curve = [{"step": 8, "objective/scores": 0.3}, {"step": 16, "eval/objective/scores": 0.4}]
    path.write_text(json.dumps({"spec": spec, "eval": measured(solved, kl), "curve": curve, "train_seconds": 300.0,
                                "seconds": 400.0}))  # fmt: skip
    return path


@pytest.fixture()
def results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    start = {"spec": {"model": "smollm2", "eval": EVAL}, "eval": measured(2, kl=0.0),
             "questions": [f"What is {i} + 1?" for i in range(N)]}  # fmt: skip
    (results / "start.json").write_text(json.dumps(start))
    for seed, solved in enumerate((2, 4, 3)):
        keep(results, "dpo", seed, solved, kl=5.0)
    for seed, solved in enumerate((4, 7, 7)):
        keep(results, "online_dpo", seed, solved, kl=4.0 + seed)
    keep(results, "rloo", 0, 5)
    return results


def test_report_gives_means_with_intervals_per_seed_tests_and_paired_comparisons(tmp_path, results):
    out = tmp_path / "out"
    proc = tool("report", "--results", results, "--out", out, expect=0)
    lines = proc.stdout.splitlines()
    main = lines[: lines.index("")]  # the first table: one row per policy
    row = {line.split("|")[1].strip(): line for line in main}
    half = T975_DF2 * 0.125 / 3**0.5  # accuracies 0.25, 0.5, 0.375: sd 0.125
    assert f"| dpo | 3 | 48 | 0.11 | 5.0 | 0.375 ± {half:.3f} | 5.00 ± 0.00 |" in row["dpo"]
    assert row["start"].startswith("| start | – | 0 | 0.00 |  | 0.250 | 0.00 |")
    assert "| rloo | 1 | 48 | 0.11 | 5.0 | 0.625 | 1.00 |" in row["rloo"]  # one seed: no interval
    # Per seed against the start on the same prompts: DPO seed 1 solves 4 (the start's 2 and two more).
    per_seed = next(line for line in lines if line.startswith("| dpo | 0.250"))
    assert per_seed == "| dpo | 0.250 (+0 / −0, p 1) | 0.500 (+2 / −0, p 0.5) | 0.375 (+1 / −0, p 1) |"
    assert next(line for line in lines if line.startswith("| rloo | 0.625")).endswith("|  |  |")
    # Paired across seeds: online DPO minus DPO is 0.25, 0.375, 0.5 (mean 0.375, sd 0.125): t = 5.196 on 2 df.
    data = next(line for line in lines if line.startswith("| online_dpo − dpo |"))
    assert f"| 3 | +0.375 [{0.375 - half:+.3f}, {0.375 + half:+.3f}] | 0.035 |" in data
    assert data.endswith(f"| +0.00 [{-T975_DF2 / 3**0.5:+.2f}, {T975_DF2 / 3**0.5:+.2f}] |")  # KL 4, 5, 6 vs 5, 5, 5
    single = next(line for line in lines if line.startswith("| online_dpo − rloo |"))
    assert "| 1 | -0.125 | – | +3.00 |" in single  # seed 0 only: 4 vs 5 solved, KL 4 vs 1
    assert not any(line.startswith("| dpo − cpo |") for line in lines)  # no CPO kept: no comparison
    assert (out / "figures" / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "figures" / "online_dpo_curves.png").is_file()
    examples = (out / "figures" / "examples.md").read_text().splitlines()
    assert examples[0] == "| prompt | kind | start | dpo | rloo | online_dpo |"  # the first seed of each run


def test_report_refuses_results_measured_on_other_held_out_sets(tmp_path, results):
    keep(results, "cpo", 0, 3, eval_spec={**EVAL, "sha256": "b" * 64})
    proc = tool("report", "--results", results, "--out", tmp_path / "out")
    assert "cpo_s0 was measured on other held-out sets" in proc.stderr and "bbbbbbbbbbbb" in proc.stderr
    assert "--only RUN --seeds SEED --force" in proc.stderr


def test_report_without_kept_results_says_what_to_run(tmp_path):
    proc = tool("report", "--results", tmp_path / "none", "--out", tmp_path / "out")
    assert "no kept result" in proc.stderr and "compare_dpo_rlhf.py train" in proc.stderr


def test_a_run_kept_under_other_settings_is_refused_before_training(tmp_path):
    results = tmp_path / "results"
    kept = keep(results, "dpo", 0, 3, config={"steps": 8})
    before = kept.read_text()
    proc = tool("train", "--only", "dpo", "--seeds", 0, "--results", results, "--out", tmp_path / "out")
    assert "dpo_s0 was kept from a run under other settings" in proc.stderr and "train --force" in proc.stderr
    assert kept.read_text() == before and not (tmp_path / "out").exists()  # nothing trained, nothing replaced


def test_seed_0_is_the_configs_own_run():
    """``--seeds 0`` reproduces the single-seed table: the configs leave both seeds at their default, 0."""
    from cpo_jax.cli import load_config

    tool_ = load_tool()
    plan = tool_.budgets(48)
    for run in tool_.RUNS:
        base, overrides = tool_.run_overrides(run, 0, plan)
        plain = load_config(tool_.CONFIGS / f"{base}.yaml")
        seeded = load_config(tool_.CONFIGS / f"{base}.yaml", overrides)
        assert (plain.seed, plain.data.seed) == (seeded.seed, seeded.data.seed) == (0, 0), run
        _, other = tool_.run_overrides(run, 2, plan)
        assert {"seed=2", "data.seed=2"} <= set(other)


def test_report_leaves_out_the_comparisons_when_no_two_runs_share_a_seed(tmp_path, results):
    for path in (results / "runs").glob("online_dpo_*.json"):
        path.unlink()
    proc = tool("report", "--results", results, "--out", tmp_path / "out", expect=0)
    assert "| a − b |" not in proc.stdout and "| dpo | 3 |" in proc.stdout


def test_the_docs_tables_are_the_report_of_the_kept_results(tmp_path, monkeypatch):
    """``docs/paper_reproduction.md``'s Part C tables (results and completions) are what ``report`` builds from
    ``docs/results/compare``; every one of the five runs is kept at seed 0 at least."""
    tool_ = load_tool()
    start, runs = tool_.load_kept()  # fails, not skips, when the kept files are missing
    assert set(tool_.RUNS) <= set(runs), "a Part C run of the doc's table is not kept"
    for run, rows in runs.items():
        assert rows[0]["spec"]["seed"] == 0, run
        for row in rows:
            assert row["spec"]["run"] == run and str(REPO) not in json.dumps(row["spec"])  # portable
    monkeypatch.setattr(tool_, "OUT", tmp_path / "out")  # the figures go there, not into the docs
    table = tool_.report(update_docs=False)
    doc = tool_.DOC.read_text()
    between = lambda begin, end: doc[doc.index(begin) + len(begin) : doc.index(end)].strip()  # noqa: E731
    assert between(tool_.BEGIN, tool_.END) == table.strip()
    examples = (tmp_path / "out" / "figures" / "examples.md").read_text()
    assert between(tool_.EXAMPLES_BEGIN, tool_.EXAMPLES_END) == examples.strip()
