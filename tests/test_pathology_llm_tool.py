"""``tools/reproduce_pathology_llm.py`` (Part B): the report is rebuilt from the kept results only, and runs trained
on other mined files are refused rather than mixed into one table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cpo_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tool(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tools"))
    import reproduce_pathology_llm as tool

    monkeypatch.setattr(tool, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(tool, "OUT", tmp_path / "out")
    return tool


def mining_record(sha="a" * 64, seconds=456.0):
    stats = {"problems": 327, "candidates": 1884, "candidates_ref_prefers_wrong": 399,
             "problems_with_a_preferred_wrong_answer": 200, "seconds": seconds,
             "sha256": {"violated_train.jsonl": sha, "contrast_train.jsonl": "c" * 64}}  # fmt: skip
    return {"spec": {"seed": 7}, "stats": stats}


def metrics(in_u, chosen):
    return {"diagnostics/frac_in_U": in_u, "diagnostics/abs_accuracy": 0.75, "logps/chosen": chosen,
            "logps/rejected": -12.5, "generation/accuracy": 0.016}  # fmt: skip


def keep_run(tool, run, after, sha="a" * 64):
    data = f"runs/paper_llm/data/{run.rsplit('_', 1)[1]}_train.jsonl"
    spec = {"run": run, "config": {}, "data_sha256": {data: sha}}
    curve = [{"step": 0, "eval/diagnostics/frac_in_U": 0.0}, {"step": 8, "loss": 0.69}]
    tool._kept_runs().save(run, {"spec": spec, "before": metrics(0.0, -14.79), "after": after, "curve": curve})


def test_report_is_rebuilt_from_the_kept_results(tool):
    tool._kept().save("mining", mining_record())
    audit = {"num_scored": 132, "frac_ref_prefers_rejected": 1.0, "frac_ref_prefers_rejected_norm": 1.0,
             "delta_ref": {"q50": -1.46}, "delta_ref_norm": {"q50": -0.159}}  # fmt: skip
    tool._kept().save("audit_violated", {"spec": {}, "audit": audit})
    keep_run(tool, "dpo_violated", metrics(0.078, -40.48))
    keep_run(tool, "cpo_contrast", metrics(0.0, -22.63), sha="c" * 64)
    table = tool.report(update_docs=False).splitlines()
    assert table[2] == "| dpo_violated | violated | before | 0.000 | 0.750 | – | – | -14.79 | -12.50 | 0.016 |"
    assert table[3] == "| dpo_violated | violated | after | 0.078 | 0.750 | – | – | -40.48 | -12.50 | 0.016 |"
    assert table[4].startswith("| cpo_contrast | contrast | before |")  # the configs' order, not the files'
    assert "Mining: 327 problems, 1884 candidate wrong answers scored in 456 s; " in "\n".join(table)
    assert "| violated_train | 132 | 1.000 | 1.000 | -1.46 | -0.159 |" in table
    assert not any(line.startswith("| contrast_train") for line in table)  # no kept audit: no row
    assert (tool.OUT / "figures" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_scoring_time_is_not_printed(tool):
    tool._kept().save("mining", mining_record(seconds=None))
    keep_run(tool, "dpo_violated", metrics(0.078, -40.48))
    assert "candidate wrong answers scored (reused from an earlier call; its time was not recorded); the" in (
        tool.report(update_docs=False)
    )


def test_runs_trained_on_other_mined_files_are_refused(tool):
    tool._kept().save("mining", mining_record())
    keep_run(tool, "dpo_violated", metrics(0.078, -40.48), sha="f" * 64)
    with pytest.raises(UserError) as err:
        tool.report(update_docs=False)
    text = str(err.value)
    assert "dpo_violated was trained on other mined files than the kept mining" in text
    assert "violated_train.jsonl" in text and "--runs dpo_violated --force" in text


def test_report_without_kept_results_says_what_to_run(tool):
    with pytest.raises(UserError, match="no kept mining or run") as err:
        tool.report(update_docs=False)
    assert "reproduce_pathology_llm.py all" in str(err.value)


def test_a_run_kept_under_another_config_is_refused_before_training(tool, monkeypatch):
    monkeypatch.setattr(tool, "_run_spec", lambda run: {"run": run, "config": {"steps": 48}, "data_sha256": {}})
    monkeypatch.setattr(tool, "_length_policy", lambda: (64, 56))
    monkeypatch.setattr(tool, "DATA", tool.OUT / "data")
    for name in ("violated", "contrast"):
        (tool.OUT / "data").mkdir(parents=True, exist_ok=True)
        (tool.OUT / "data" / f"{name}_train.jsonl").write_text("{}\n")
        spec = tool.portable({"data": str(tool.OUT / "data" / f"{name}_train.jsonl"),
                              "sha256": tool.sha256_of(tool.OUT / "data" / f"{name}_train.jsonl"),
                              "max_length": 64, "max_prompt_length": 56}, tool.ROOT)  # fmt: skip
        tool._kept().save(f"audit_{name}", {"spec": spec, "audit": {}})  # kept: not rerun
    tool._kept_runs().save("dpo_violated", {"spec": {"run": "dpo_violated", "config": {"steps": 8}, "data_sha256": {}}})
    ran = []
    monkeypatch.setattr(tool, "_cli", lambda *args: ran.append(args))
    with pytest.raises(UserError, match="dpo_violated was kept from a run under other settings \\(config.steps"):
        tool.train(["dpo_violated"])
    assert ran == []  # neither the audits (kept) nor the run were started


def test_the_kept_curve_keeps_only_what_the_figure_draws(tool):
    run = tool.OUT / "dpo_violated"
    run.mkdir(parents=True)
    rows = [{"step": 0, "eval/diagnostics/frac_in_U": 0.0, "eval/other": 1},
            {"step": 1, "loss": 0.69, "grad_norm": 3.0}, {"step": 2, "grad_norm": 2.0}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tool._curve("dpo_violated") == [{"step": 0, "eval/diagnostics/frac_in_U": 0.0}, {"step": 1, "loss": 0.69}]


def test_a_failed_cpo_jax_command_is_a_short_message_not_a_traceback(tool, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 2))
    with pytest.raises(UserError, match="`cpo-jax train` failed \\(its message is above\\); nothing of it was kept"):
        tool._cli("train", "configs/paper/dpo_violated.yaml")


def test_the_docs_table_is_the_report_of_the_kept_results(tmp_path, monkeypatch):
    """``docs/paper_reproduction.md``'s Part B table is what ``report`` builds from ``docs/results/pathology_llm``."""
    sys.path.insert(0, str(REPO / "tools"))
    import reproduce_pathology_llm as tool

    # The doc's table is kept, so the files must be in every checkout (not skipped: a .gitignore rule once hid them).
    assert set(tool._kept_runs().records()) == set(tool.RUNS), "a Part B run of the doc's table is not kept"
    for run, record in tool._kept_runs().records().items():
        assert str(REPO) not in json.dumps(record["spec"]), run  # portable
        assert record["spec"]["run"] == run
    monkeypatch.setattr(tool, "OUT", tmp_path / "out")  # the figure goes there, not into the docs
    table = tool.report(update_docs=False)
    doc = tool.DOC.read_text()
    assert doc[doc.index(tool.BEGIN) + len(tool.BEGIN) : doc.index(tool.END)].strip() == table.strip()
