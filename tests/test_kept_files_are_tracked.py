"""The kept results are in git: no ignore rule hides them (``runs/`` once hid ``docs/results/*/runs/``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_no_kept_result_path_is_ignored_by_git():
    paths = ["docs/results/pathology_llm/runs/dpo_violated.json", "docs/results/compare/runs/dpo_s0.json",
             "docs/results/compare/start.json", "docs/results/partd/cells/dpo_b1_summed_s0.json",
             "docs/results/partd/reference.json"]  # fmt: skip
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout == "", f"ignored by git: {proc.stdout}"
    assert subprocess.run(["git", "check-ignore", "-q", "runs/x/metrics.jsonl"], cwd=REPO).returncode == 0
