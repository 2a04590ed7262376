"""The prepared GPU check runs here on tiny CPU shapes (its --dry-run), every section, so it cannot rot before a
device is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("trl")


def test_device_check_dry_run_covers_every_section(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "device_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert "(dry run)" in result["header"]
    assert [r["outcome"] for r in result["parity"]] == ["skipped"]  # the GPU-only tests skip on this CPU
    for section in ("parity", "step", "trl", "logprobs", "generate", "lora8b"):
        rows = result[section]
        assert rows and not any("error" in r for r in rows), (section, rows)
    assert {(r["reference"], r["attention"]) for r in result["step"]} == {
        ("separate", "xla"),
        ("separate", "cudnn"),
        ("precomputed", "xla"),
        ("precomputed", "cudnn"),
    }
    assert all(r["tokens_per_s"] > 0 and r["loss"] == r["loss"] for r in result["step"])  # finite losses
    assert all(r["step_gib"] > 0 for r in result["step"] + result["lora8b"])  # XLA's buffer assignment, also on CPU
    assert [r["quantize"] for r in result["lora8b"]] == ["none", "nf4"]
    assert "cpo_jax / TRL tokens/s" in (tmp_path / "device_check.md").read_text()


def test_device_check_refuses_an_unknown_section(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "device_check.py"),
            "--dry-run",
            "--sections",
            "stepz",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2 and "unknown section 'stepz'" in proc.stderr


def test_a_failed_row_is_named_by_its_out_of_memory_line():
    sys.path.insert(0, str(REPO / "tools"))
    from device_check import failure_reason

    stderr = (
        "W1129 bfc_allocator.cc:371] Allocator (GPU_0_bfc) ran out of memory trying to allocate 32.02GiB\n"
        "Traceback (most recent call last):\n  File x\n"
        "jax.errors.JaxRuntimeError: NOT_FOUND: All configs failed during profiling.\n"
        "EXECUTION FAILED: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 64.02GiB with allocator "
        "GPU_0_bfc on device 0.\n--------------------\nFor simplicity, JAX has removed its internal frames.\n"
    )
    assert failure_reason(stderr).startswith("Out of memory while trying to allocate 64.02GiB")
    assert failure_reason("Traceback:\nValueError: bad shape\n") == "ValueError: bad shape"
