"""``tools/reproduce_partd.py``'s refusals: each bad input is a short message and exit status 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tool(*args, check_fail=True):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "reproduce_partd.py"), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    if check_fail:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    return proc


@pytest.fixture()
def mined(tmp_path):
    from cpo_jax.data import arithmetic_preferences, write_jsonl

    pairs = [dict(p, delta_ref=-2.0, delta_ref_norm=-0.2) for p in arithmetic_preferences(5, seed=0)]
    write_jsonl(pairs, tmp_path / "mined" / "violated_train.jsonl")
    write_jsonl(pairs[:2], tmp_path / "mined" / "violated_eval.jsonl")
    return tmp_path / "mined"


def test_label_without_mined_pairs_names_the_mine_command(tmp_path):
    proc = tool("label", "--out", tmp_path / "out", "--mined", tmp_path / "nothing")
    assert "violated_train.jsonl is missing" in proc.stderr and "reproduce_pathology_llm.py mine" in proc.stderr


def test_labels_with_other_settings_are_refused_not_mixed(tmp_path, mined):
    out = tmp_path / "out"
    ok = tool("label", "--out", out, "--mined", mined, "--seeds", 0, 1, "--copies", 2, check_fail=False)
    assert ok.returncode == 0, ok.stderr
    records = [json.loads(line) for line in (out / "data" / "train_seed1.jsonl").read_text().splitlines()]
    assert len(records) == 10 and {r["reward_margin"] for r in records} == {1.0}
    saved = json.loads((out / "data" / "labels.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["copies"] == 2
    before = (out / "data" / "train_seed0.jsonl").read_bytes()
    proc = tool("label", "--out", out, "--mined", mined, "--seeds", 0, "--reward-margin", 2)
    assert "other settings" in proc.stderr and "Move" in proc.stderr
    assert (out / "data" / "train_seed0.jsonl").read_bytes() == before  # nothing overwritten
    more = tool("label", "--out", out, "--mined", mined, "--seeds", 2, "--copies", 2, check_fail=False)
    assert more.returncode == 0 and json.loads((out / "data" / "labels.json").read_text())["seeds"] == [0, 1, 2]


def test_run_refuses_missing_labels_and_empty_grids(tmp_path, mined):
    out = tmp_path / "out"
    proc = tool("run", "--out", out, "--mined", mined, "--results", tmp_path / "results")
    assert "labels.json is missing" in proc.stderr and "reproduce_partd.py label" in proc.stderr
    tool("label", "--out", out, "--mined", mined, "--seeds", 0, check_fail=False)
    proc = tool("run", "--out", out, "--mined", mined, "--seeds", 0, 5)
    assert "no labelled training file for seeds [5]" in proc.stderr
    proc = tool("run", "--out", out, "--mined", mined, "--methods", "ipo", "--units", "summed", "--seeds", 0)
    assert "no cell to run" in proc.stderr and "--units normalised" in proc.stderr
    (mined / "violated_eval.jsonl").unlink()
    proc = tool("run", "--out", out, "--mined", mined, "--results", tmp_path / "results", "--methods", "dpo",
                "--units", "summed", "--seeds", 0)  # fmt: skip
    assert "violated_eval.jsonl" in proc.stderr and "does not exist" in proc.stderr  # a library error: its message


def test_report_without_cells_says_what_to_run(tmp_path, mined):
    out = tmp_path / "out"
    tool("label", "--out", out, "--mined", mined, "--seeds", 0, check_fail=False)
    proc = tool("report", "--out", out, "--mined", mined, "--results", tmp_path / "results")
    assert "no finished cell" in proc.stderr and "reproduce_partd.py run" in proc.stderr


def _metrics(in_u, acc):
    return {
        "frac_in_U": in_u, "frac_in_U_norm": in_u, "abs_accuracy": acc, "abs_accuracy_norm": acc, "win_rate": 0.4,
        "kl/k3": 2.0, "chosen_logp_change": -1.0, "generation/accuracy": 0.02,
    }  # fmt: skip


def write_cell(results, method, units, seed, after, *, curve=(), reward_margin=1.0, config=None):
    spec = {"cell": {"method": method, "beta": 1.0, "units": units, "seed": seed},
            "labels": {"reward_margin": reward_margin}, "config": config or {}}  # fmt: skip
    path = results / "cells" / f"{method}_b1_{units}_s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"spec": spec, "after": after, "curve": list(curve), "seconds": 1}))
    return path


def test_report_aggregates_seeds_pairs_dpo_with_cpo_and_gives_the_verdict(tmp_path, mined):
    import numpy as np

    out, results = tmp_path / "out", tmp_path / "results"  # no labels in out: the report needs the kept results only
    delta_ref = np.array([-3.0, -2.0, -1.5, -0.5])  # m / beta = 1 at beta 1: 3 of 4 pairs predicted in U for DPO
    logps = np.stack([delta_ref - 10.0, np.full(4, -10.0)], axis=1)
    reference = {"eval_sha256": "0" * 64, "before": _metrics(0.0, 0.0), "logps": logps.tolist(),
                 "lengths": np.full((4, 2), 10.0).tolist()}  # fmt: skip
    results.mkdir()
    (results / "reference.json").write_text(json.dumps(reference))
    in_u = {("dpo", "summed"): [0.60, 0.55, 0.65], ("cpo", "summed"): [0.05, 0.10, 0.00]}
    in_u |= {("ipo", "normalised"): [0.30, 0.20, 0.25], ("cpo", "normalised"): [0.28, 0.21, 0.25]}
    for (method, units), values in in_u.items():
        for seed, value in enumerate(values):
            write_cell(results, method, units, seed, _metrics(value, 1 - value),
                       curve=[{"step": s, "diagnostics/frac_in_U": value * s / 16} for s in (8, 16)])  # fmt: skip
    proc = tool("report", "--out", out, "--mined", mined, "--results", results, check_fail=False)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[3].strip(): line for line in proc.stdout.splitlines() if line.startswith("| 1 | summed")}
    assert "| 3 | 0.75 |" in rows["dpo"] and "0.600 ± 0.124" in rows["dpo"]  # t(0.975, 2) * 0.05 / sqrt(3)
    assert "| 3 | 0.00 |" in rows["cpo"]
    verdict = next(line for line in proc.stdout.splitlines() if "DPO − cpo" in line)
    assert "+0.550" in verdict and "**supported**" in verdict and "0.75" in verdict
    # IPO's target is anchored at delta_ref too: per token, delta_ref / 10 plus (2 sigmoid(1) - 1) / 2 = 0.231 is
    # negative on 1 of the 4 pairs. Against CPO the paired differences are +0.02, -0.01, 0: mean +0.003, 95% interval
    # [-0.035, +0.041], below 0.05, so the verdict is "not supported".
    ipo = next(line for line in proc.stdout.splitlines() if "IPO − cpo" in line)
    assert "| 1 | normalised |" in ipo and "+0.003 [-0.035, +0.041]" in ipo
    assert "| 0.25 |" in ipo and "**not supported**" in ipo
    assert "| 3 | 0.25 |" in next(line for line in proc.stdout.splitlines() if "| normalised | ipo |" in line)
    assert (out / "figures" / "frac_in_u.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "figures" / "table.md").read_text().startswith("| β | units |")


def test_a_cell_finished_under_other_settings_is_refused_not_mixed(tmp_path, mined):
    out, results = tmp_path / "out", tmp_path / "results"
    tool("label", "--out", out, "--mined", mined, "--seeds", 0, check_fail=False)
    cell = write_cell(results, "dpo", "summed", 0, {}, config={"steps": 8})
    old = cell.read_text()
    proc = tool("run", "--out", out, "--mined", mined, "--results", results, "--methods", "dpo", "--betas", 1,
                "--units", "summed", "--seeds", 0)  # fmt: skip
    assert "dpo_b1_summed_s0 was kept from a run under other settings (" in proc.stderr
    assert "reproduce_partd.py run --force" in proc.stderr
    assert cell.read_text() == old  # kept as it was


def test_report_refuses_cells_labelled_with_different_margins(tmp_path, mined):
    results = tmp_path / "results"
    results.mkdir()
    (results / "reference.json").write_text(json.dumps({"eval_sha256": "0", "before": {}, "logps": [], "lengths": []}))
    write_cell(results, "dpo", "summed", 0, _metrics(0.5, 0.5), reward_margin=1.0)
    write_cell(results, "cpo", "summed", 0, _metrics(0.1, 0.9), reward_margin=2.0)
    proc = tool("report", "--out", tmp_path / "out", "--mined", mined, "--results", results)
    assert "different reward margins [1.0, 2.0]" in proc.stderr


def test_kept_results_measured_on_other_held_out_pairs_are_refused(tmp_path, mined):
    """Re-mined held-out pairs (another hash) would put cells measured on two different sets in one table."""
    out, results = tmp_path / "out", tmp_path / "results"
    tool("label", "--out", out, "--mined", mined, "--seeds", 0, check_fail=False)
    results.mkdir()
    kept = {"eval_sha256": "f" * 64, "before": {}, "logps": [], "lengths": []}
    (results / "reference.json").write_text(json.dumps(kept))
    proc = tool("run", "--out", out, "--mined", mined, "--results", results, "--methods", "dpo", "--betas", 1,
                "--units", "summed", "--seeds", 0)  # fmt: skip
    assert "measured on other held-out pairs" in proc.stderr and "ffffffffffff" in proc.stderr
    assert json.loads((results / "reference.json").read_text()) == kept


def test_a_cell_is_kept_when_only_the_execution_path_changed():
    """The attention kernel, remat policy and log-prob chunking compute the same numbers; the budget does not."""
    sys.path.insert(0, str(REPO / "tools"))
    import reproduce_partd as partd

    old = {"cell": {"method": "dpo"}, "config": {"steps": 32, "model": {"attention_impl": "xla", "remat": "none"}}}
    new = {"cell": {"method": "dpo"}, "config": {"steps": 32, "model": {"attention_impl": "best", "remat": "full"}}}
    assert partd.comparable(old) == partd.comparable(new)
    longer = {**new, "config": {**new["config"], "steps": 64}}
    assert partd.comparable(old) != partd.comparable(longer)
    other_model = {**new, "config": {**new["config"], "model": {"path": "other", "attention_impl": "xla"}}}
    assert partd.comparable(old) != partd.comparable(other_model)
    labelled = {**new, "labels": {"reward_margin": 1.0, "sha256": "ab", "seeds": [0, 1, 2]}}
    more_seeds = {**labelled, "labels": {**labelled["labels"], "seeds": [0, 1, 2, 3]}}  # seed 3 labelled later
    assert partd.comparable(labelled) == partd.comparable(more_seeds)
    other_labels = {**labelled, "labels": {**labelled["labels"], "sha256": "cd"}}
    assert partd.comparable(labelled) != partd.comparable(other_labels)


def test_the_docs_table_is_the_report_of_the_kept_results(tmp_path):
    """``docs/paper_reproduction.md``'s Part D table is what ``report`` builds from ``docs/results/partd``: no number
    in it lacks a kept result, and no kept result is left out of it."""
    sys.path.insert(0, str(REPO / "tools"))
    import reproduce_partd as partd

    kept = sorted((partd.RESULTS / "cells").glob("*.json"))
    assert kept, "no kept Part D result in this checkout, but the doc's table is built from them"
    reference = json.loads((partd.RESULTS / "reference.json").read_text())
    for path in kept:
        spec = json.loads(path.read_text())["spec"]
        assert spec["measure"]["eval_sha256"] == reference["eval_sha256"], path.name  # one held-out set
        assert str(REPO) not in json.dumps(spec), path.name  # portable
        assert path.stem == partd.Cell(**spec["cell"]).name
    proc = tool("report", "--out", tmp_path / "out", check_fail=False)
    assert proc.returncode == 0, proc.stderr
    doc = partd.DOC.read_text()
    in_doc = doc[doc.index(partd.BEGIN) + len(partd.BEGIN) : doc.index(partd.END)].strip()
    assert in_doc == (tmp_path / "out" / "figures" / "table.md").read_text().strip()
