"""``cpo_jax.errors.run_tool``: the ``tools/`` scripts treat errors as the CLI does (a user error is a short message
and exit status 2, ``--debug`` / ``CPO_JAX_DEBUG=1`` add the traceback, a bug keeps its traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    from cpo_jax.errors import DataError, run_tool

    def main():
        what = sys.argv[1]
        if what == "user":
            raise DataError("doc.md", "expected the markers once each", hint="restore them")
        if what == "oserror":
            open("/nonexistent/dir/file.txt")
        if what == "bug":
            raise KeyError("a bug")
        if what == "exit":
            raise SystemExit("plain message")
        print("ran", sys.argv[1:])

    sys.exit(run_tool(main))
    """
)


def run(tmp_path, *args, env=None):
    script = tmp_path / "tool.py"
    script.write_text(SCRIPT)
    environ = {k: v for k, v in os.environ.items() if k != "CPO_JAX_DEBUG"} | (env or {})
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO, env=environ, timeout=60
    )


def test_user_error_is_a_short_message_and_status_2(tmp_path):
    proc = run(tmp_path, "user")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "error: doc.md: expected the markers once each"
    assert lines[1].strip() == "hint: restore them" and "--debug" in lines[2] and len(lines) == 3


def test_os_error_on_a_path_is_a_user_error(tmp_path):
    proc = run(tmp_path, "oserror")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "/nonexistent/dir/file.txt" in proc.stderr and "FileNotFoundError" in proc.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_and_is_taken_off_argv(tmp_path, how):
    proc = run(tmp_path, "user", "--debug") if how == "flag" else run(tmp_path, "user", env={"CPO_JAX_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "error: doc.md" in proc.stderr
    ok = run(tmp_path, "fine", "--debug", "x")
    assert ok.returncode == 0 and ok.stdout.strip() == "ran ['fine', 'x']"  # main never sees --debug


def test_a_bug_keeps_its_traceback_and_system_exit_passes_through(tmp_path):
    bug = run(tmp_path, "bug")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'a bug'" in bug.stderr
    done = run(tmp_path, "exit")
    assert done.returncode == 1 and done.stderr.strip() == "plain message"


def test_the_compare_tool_names_an_unknown_run_and_exits_2():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare_dpo_rlhf.py"), "train", "--only", "nosuch"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "CPO_JAX_DEBUG"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "--only: unknown run 'nosuch'" in proc.stderr and "online_cpo" in proc.stderr
    assert "Traceback" not in proc.stderr
