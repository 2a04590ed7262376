"""``cpo_jax.experiments.kept``: results kept in git are portable, written whole, and never mixed across specs."""

from __future__ import annotations

import json

import pytest

from cpo_jax.errors import UserError
from cpo_jax.experiments.kept import KeptResults, portable, sha256_json, sha256_of


def test_portable_writes_paths_under_the_checkout_relative_to_it(tmp_path):
    """A result kept in git compares equal on another clone, wherever it is checked out."""
    root = tmp_path / "checkout"
    spec = {"data": {"train_files": [f"{root}/runs/x/train_seed0.jsonl"]}, "path": "smollm2", "other": "/elsewhere/f",
            "sibling": f"{root}-old/f", "n": 3}  # fmt: skip
    assert portable(spec, root) == {"data": {"train_files": ["runs/x/train_seed0.jsonl"]}, "path": "smollm2",
                                    "other": "/elsewhere/f", "sibling": f"{root}-old/f", "n": 3}  # fmt: skip


def test_hashes_are_sha256_of_the_bytes_and_of_sorted_json(tmp_path):
    import hashlib

    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_of(tmp_path / "f") == hashlib.sha256(b"abc").hexdigest()
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})
    assert sha256_json({"a": [1, 2]}) != sha256_json({"a": [2, 1]})


def test_a_kept_run_is_skipped_under_its_spec_run_when_absent_and_refused_under_another(tmp_path):
    store = KeptResults(tmp_path / "kept", "python tools/x.py run")
    spec = {"config": {"steps": 8, "model": {"path": "m", "remat": "none"}}, "seed": 0}
    assert store.finished("a", spec) is False  # nothing kept: run it
    path = store.save("a", {"spec": spec, "after": {"acc": 0.5}})
    assert json.loads(path.read_text()) == {"spec": spec, "after": {"acc": 0.5}}
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["a.json"]  # no temporary file left
    assert store.finished("a", spec) is True
    assert store.finished("a", spec, force=True) is False
    longer = {**spec, "config": {**spec["config"], "steps": 16}}
    with pytest.raises(UserError) as err:
        store.finished("a", longer)
    text = str(err.value)
    assert "a was kept from a run under other settings (config.steps changed)" in text
    assert str(path) in text and "python tools/x.py run --force" in text
    drop_remat = lambda s: {**s, "config": {**s["config"], "model": {"path": s["config"]["model"]["path"]}}}  # noqa: E731
    other_kernel = {**spec, "config": {**spec["config"], "model": {"path": "m", "remat": "full"}}}
    assert store.finished("a", other_kernel, comparable=drop_remat) is True
    assert store.records() == {"a": {"spec": spec, "after": {"acc": 0.5}}}


def test_a_kill_during_a_save_leaves_the_old_result(tmp_path, monkeypatch):
    import os

    store = KeptResults(tmp_path, "x")
    store.save("a", {"spec": {}, "v": 1})

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save("a", {"spec": {}, "v": 2})
    assert store.load("a") == {"spec": {}, "v": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
