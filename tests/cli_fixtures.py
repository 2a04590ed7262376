"""Running ``cpo-jax`` as a user does: a subprocess on one CPU device with its own model cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(cache: Path) -> dict[str, str]:
    """The environment of a one-device ``cpo-jax`` subprocess whose aliases (tiny-random) live in ``cache``."""
    return dict(
        os.environ,
        CPO_JAX_CACHE=str(cache),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def run_cli(env: dict, *args, check: bool = False, cwd=None) -> subprocess.CompletedProcess:
    """``cpo-jax ARGS``; with ``check``, an AssertionError carrying stderr's tail when it does not exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "cpo_jax.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cpo-jax {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


_STAGE_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def without_stages(err: str) -> str:
    """``err`` without the ``[HH:MM:SS] ...`` progress lines a run prints before an error (``cpo_jax.stages``)."""
    return "".join(line for line in err.splitlines(keepends=True) if not _STAGE_LINE.match(line))
