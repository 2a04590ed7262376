"""Results kept in git: the numbers behind a published table, one JSON file per finished run.

A study's runs write checkpoints and logs under ``runs/``, which git ignores and a fresh checkout lacks. What a report
needs (a run's spec, its end measurements and its curve, some KB) goes to a folder under ``docs/results/`` instead,
so that any clone can rebuild the table without training again, and a later run can add seeds to a group.

* :class:`KeptResults`: the folder, one ``<name>.json`` per run, written whole or not at all.
* :func:`portable`: a JSON tree with paths under the checkout written relative to it, so that a kept spec compares
  equal on another clone.
* :meth:`KeptResults.finished`: whether a run is done under the same spec (skip it), not done (run it), or done under
  another (refuse, rather than mix two runs' numbers in one table).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from cpo_jax.errors import UserError


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sha256_json(value) -> str:
    """Hex SHA-256 of a JSON tree (keys sorted): the identity of data that is built in memory, not read from a file."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def portable(value, root: str | Path):
    """``value`` (a JSON tree) with every string path under ``root`` written relative to it."""
    prefix = f"{Path(root)}/"
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root) for v in value]
    if isinstance(value, str) and value.startswith(prefix):
        return value[len(prefix) :]
    return value


def without_execution_keys(spec: dict) -> dict:
    """``spec`` without the model keys of its ``config`` that only choose how the numbers are computed
    (:data:`cpo_jax.train.resume.EXECUTION_ONLY`: attention kernel, remat, log-prob chunking), which a resume may
    change too: a run kept before such a change still counts as the same run."""
    from cpo_jax.train.resume import EXECUTION_ONLY

    if "config" not in spec:
        return spec
    execution = {key.removeprefix("model.") for key in EXECUTION_ONLY}
    model = {k: v for k, v in spec["config"].get("model", {}).items() if k not in execution}
    return {**spec, "config": {**spec["config"], "model": model}}


class KeptResults:
    """A folder of kept results, ``<directory>/<name>.json`` per finished run.

    Args:
      directory: the folder (tracked by git).
      what: how its runs are rerun, named in refusals (``python tools/compare_dpo_rlhf.py train``).
    """

    def __init__(self, directory: str | Path, what: str):
        self.directory, self.what = Path(directory), what

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def load(self, name: str) -> dict | None:
        """The kept record of ``name``, or None when it has none."""
        path = self.path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, name: str, record: dict) -> Path:
        """Writes ``record`` as ``name``'s result, whole or not at all (a kill leaves the old file or the new one)."""
        from cpo_jax.train.metrics_writer import write_atomically

        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(record) + "\n")
        return path

    def records(self) -> dict[str, dict]:
        """Every kept record, by name, in name order."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.directory.glob("*.json"))}

    def finished(
        self, name: str, spec: dict, *, force: bool = False, comparable: Callable[[dict], dict] = lambda s: s
    ) -> bool:
        """True when ``name`` is kept under ``spec`` (skip it); False when it must run (none kept, or ``force``).

        Raises :class:`~cpo_jax.errors.UserError` when it is kept under another spec: its numbers and a new run's
        would mix. ``comparable`` drops what may differ without changing the result (compared on both sides)."""
        saved = self.load(name)
        if saved is None or force:
            return False
        if comparable(saved["spec"]) == comparable(spec):
            return True
        changed = sorted(_differing_keys(comparable(saved["spec"]), comparable(spec)))
        raise UserError(
            f"{name} was kept from a run under other settings ({', '.join(changed[:4]) or 'the spec'} changed); "
            "its numbers and a new run's would mix in one table",
            where=str(self.path(name)),
            hint=f"rerun it with {self.what} --force, or move {self.directory} away",
        )


def _differing_keys(a, b, prefix: str = "") -> set[str]:
    """Dotted keys at which two JSON trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for key in a.keys() | b.keys():
            if key not in a or key not in b:
                out.add(f"{prefix}{key}")
            else:
                out |= _differing_keys(a[key], b[key], f"{prefix}{key}.")
        return out
    return set() if a == b else {prefix.rstrip(".") or "value"}
