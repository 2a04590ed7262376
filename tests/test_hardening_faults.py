"""Faults never block a resume and never lose what was saved: a damaged latest checkpoint falls back to the newest
intact one (the damaged one is moved aside, not deleted), a torn last line of metrics.jsonl is dropped, and a bad
reference log-prob cache file is recomputed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpo_jax.errors import CheckpointError
from cpo_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from cpo_jax.train.metrics_writer import MetricsWriter, read_metrics
from cpo_jax.train.reference_cache import load_or_compute
from cpo_jax.train.step import init_state

# --------------------------------------------------------------------------------------------------------------
# Checkpoints, driven directly with a small train state


def small_state(offset: float):
    """A train state whose parameters are ``arange + offset`` (so each saved step is recognisable)."""
    params = {"model": {"w": jnp.arange(6.0).reshape(2, 3) + offset, "b": jnp.full((3,), offset)}}
    return init_state(params, optax.adam(1e-3), seed=0)


def saved_run(directory: Path, steps=(1, 2, 3)) -> Checkpointer:
    """A checkpointer of ``directory`` holding ``steps``, step ``s`` with parameters offset by ``s``."""
    checkpointer = Checkpointer(directory, keep=10, async_save=False)
    for step in steps:
        checkpointer.save(step, small_state(step), {"position": step}, {"run": "a", "saved_at": step})
    checkpointer.wait()
    return checkpointer


def restore_latest(checkpointer: Checkpointer, **kwargs):
    template = small_state(0.0)
    return checkpointer.restore_latest(template, jax.tree.map(lambda x: x.sharding, template), **kwargs)


def tree_bytes(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def array_files(step_dir: Path) -> list[Path]:
    """The array data files of a step's ``state`` item (OCDBT data files under ``d/`` folders)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, list((step_dir / "state").rglob("*"))
    return files


def truncate_arrays(step_dir: Path) -> None:
    for f in array_files(step_dir):
        os.truncate(f, f.stat().st_size // 2)


def delete_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def garble_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {garbled')


def delete_state_item(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "state")


def garble_config_item(step_dir: Path) -> None:
    (step_dir / "config" / "metadata").write_text("{not json")


def garble_data_item(step_dir: Path) -> None:
    (step_dir / "data" / "metadata").write_bytes(b"\x00" * 16)


DAMAGE = [truncate_arrays, delete_metadata, garble_metadata, delete_state_item, garble_config_item, garble_data_item]


def assert_state_of_step(state, step: int) -> None:
    np.testing.assert_array_equal(np.asarray(state.params["model"]["w"]), np.arange(6.0).reshape(2, 3) + step)
    np.testing.assert_array_equal(np.asarray(state.params["model"]["b"]), np.full((3,), float(step)))


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_damaged_latest_checkpoint_falls_back_and_is_moved_aside(tmp_path, caplog, damage):
    checkpointer = saved_run(tmp_path / "checkpoints")
    damage(tmp_path / "checkpoints" / "3")
    damaged_bytes = tree_bytes(tmp_path / "checkpoints" / "3")
    seen = []
    with caplog.at_level(logging.WARNING, logger="cpo_jax.train.checkpoint"):
        step, state, data_state = restore_latest(checkpointer, check_config=lambda cfg, s: seen.append((cfg, s)))

    assert step == 2 and data_state == {"position": 2}
    assert_state_of_step(state, 2)
    assert seen[-1] == ({"run": "a", "saved_at": 2}, 2)
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(tmp_path / "checkpoints" / "3") in warning and "\n" not in warning
    # moved, not deleted: every byte is still there, outside the manager's directory
    assert not (tmp_path / "checkpoints" / "3").exists()
    assert tree_bytes(tmp_path / "checkpoints_damaged" / "3") == damaged_bytes
    assert sorted(checkpointer.manager.all_steps()) == [1, 2]

    # the run goes on: the same step number saves again, and restores
    checkpointer.save(3, small_state(30.0), {"position": 30}, {"run": "a", "saved_at": 3})
    checkpointer.wait()
    step, state, data_state = restore_latest(checkpointer)
    assert step == 3 and data_state == {"position": 30}
    assert_state_of_step(state, 30)
    checkpointer.close()


def test_several_damaged_steps_are_skipped_and_a_name_taken_gets_a_suffix(tmp_path):
    checkpointer = saved_run(tmp_path / "checkpoints")
    (tmp_path / "checkpoints_damaged" / "3").mkdir(parents=True)  # left by an earlier fall-back
    (tmp_path / "checkpoints_damaged" / "3" / "earlier").write_text("kept")
    truncate_arrays(tmp_path / "checkpoints" / "3")
    delete_metadata(tmp_path / "checkpoints" / "2")

    step, state, _ = restore_latest(checkpointer)
    assert step == 1
    assert_state_of_step(state, 1)
    moved = sorted(p.name for p in (tmp_path / "checkpoints_damaged").iterdir())
    assert moved[0] == "2" and moved[1] == "3" and moved[2].startswith("3.") and len(moved) == 3
    assert (tmp_path / "checkpoints_damaged" / "3" / "earlier").read_text() == "kept"
    assert (tmp_path / "checkpoints_damaged" / moved[2] / "state").is_dir()
    checkpointer.close()


def test_no_intact_checkpoint_raises_and_moves_nothing(tmp_path):
    checkpointer = saved_run(tmp_path / "checkpoints", steps=(1, 2))
    truncate_arrays(tmp_path / "checkpoints" / "2")
    garble_config_item(tmp_path / "checkpoints" / "1")
    before = tree_bytes(tmp_path)

    with pytest.raises(CheckpointError) as info:
        restore_latest(checkpointer)
    message = str(info.value)
    assert info.value.where == str(tmp_path / "checkpoints")
    assert "step 2:" in message and "step 1:" in message and "config" in message
    assert "output_dir" in info.value.hint and "kept" in info.value.hint
    assert tree_bytes(tmp_path) == before and not (tmp_path / "checkpoints_damaged").exists()
    checkpointer.close()


def test_a_refusing_check_config_propagates_and_moves_nothing(tmp_path):
    checkpointer = saved_run(tmp_path / "checkpoints")
    garble_config_item(tmp_path / "checkpoints" / "3")
    before = tree_bytes(tmp_path)

    class Refused(Exception):
        pass

    def refuse(saved: dict, step: int) -> None:
        raise Refused(f"step {step} saved {saved}")

    with pytest.raises(Refused, match="step 2 saved"):  # step 3 is damaged, step 2 is checked and refused
        restore_latest(checkpointer, check_config=refuse)
    assert tree_bytes(tmp_path) == before and not (tmp_path / "checkpoints_damaged").exists()
    checkpointer.close()


def test_no_checkpoint_restores_nothing(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    template = small_state(5.0)
    step, state, data_state = checkpointer.restore_latest(template, jax.tree.map(lambda x: x.sharding, template))
    assert (step, state, data_state) == (0, template, None)
    assert not (tmp_path / "checkpoints_damaged").exists()
    checkpointer.close()


def test_restoring_a_damaged_step_names_its_directory(tmp_path):
    checkpointer = saved_run(tmp_path / "checkpoints", steps=(1, 2))
    truncate_arrays(tmp_path / "checkpoints" / "2")
    template = small_state(0.0)
    abstract = abstract_with_shardings(template, jax.tree.map(lambda x: x.sharding, template))
    with pytest.raises(CheckpointError) as info:
        checkpointer.restore(2, abstract)
    assert info.value.where == str(tmp_path / "checkpoints" / "2")
    state, data_state, config = checkpointer.restore(1, abstract)  # the other step is untouched
    assert_state_of_step(state, 1)
    assert (data_state, config) == ({"position": 1}, {"run": "a", "saved_at": 1})
    checkpointer.close()


# --------------------------------------------------------------------------------------------------------------
# metrics.jsonl with a torn last line


def metrics_file(directory: Path, steps, torn: str = '{"step": 6, "loss": 0.12') -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + torn)
    return path


def test_a_torn_last_line_is_dropped_on_resume_and_earlier_records_kept(tmp_path, caplog):
    path = metrics_file(tmp_path, range(1, 6))
    with caplog.at_level(logging.WARNING, logger="cpo_jax.train.metrics_writer"):
        writer = MetricsWriter(tmp_path, total_steps=10, start_step=4, tensorboard=False, progress_bar=False)
    assert f"{path}:6" in caplog.text
    writer.write(5, {"loss": 0.5})
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": s, "loss": 1.0 / s} for s in range(1, 5)
    ] + [{"step": 5, "loss": 0.5}]


def test_garbage_in_the_middle_is_dropped_and_the_rest_kept(tmp_path, caplog):
    path = metrics_file(tmp_path, [1, 2], torn="\x00\x00\x00\n[1, 2]\n" + json.dumps({"step": 3, "loss": 3.0}) + "\n")
    with caplog.at_level(logging.WARNING, logger="cpo_jax.train.metrics_writer"):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert f"{path}:3" in caplog.text and f"{path}:4" in caplog.text


def test_an_intact_file_is_not_rewritten(tmp_path):
    path = metrics_file(tmp_path, [1, 2, 3], torn="")
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    MetricsWriter(tmp_path, total_steps=5, start_step=3, tensorboard=False, progress_bar=False).close()
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp


def test_a_kill_during_the_rewrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = metrics_file(tmp_path, range(1, 6))
    before = path.read_bytes()

    def killed(_fd):
        raise KeyboardInterrupt("killed while the rewritten file is being flushed")

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsWriter(tmp_path, total_steps=10, start_step=2, tensorboard=False, progress_bar=False)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind


def test_plot_curves_reads_a_file_with_a_torn_last_line(tmp_path):
    from cpo_jax.report import plot_curves

    path = metrics_file(tmp_path, range(1, 6))
    out = plot_curves(path, tmp_path / "curves.png", panels=(("loss", "loss"),))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------------------
# Reference log-prob cache


class Unpickled:
    """Unpickling it writes a marker file: proof that a pickle was loaded."""

    marker: Path | None = None

    def __reduce__(self):
        return (Path.write_text, (Unpickled.marker, "unpickled"))


def bad_cache(path: Path, kind: str, rows: int) -> None:
    good = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    if kind == "truncated":
        np.save(path, good)
        os.truncate(path, path.stat().st_size - 8)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(64))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(Unpickled()))
    elif kind == "object_array":
        np.save(path, np.array([[Unpickled(), None]] * rows, dtype=object), allow_pickle=True)
    elif kind == "other_run":
        np.save(path, np.zeros((rows + 3, 2), np.float32))
    elif kind == "wrong_dtype":
        np.save(path, good.astype(np.float64))
    elif kind == "archive":
        with open(path, "wb") as f:
            np.savez(f, good)


@pytest.mark.parametrize(
    "kind", ["truncated", "empty", "garbage", "pickle", "object_array", "other_run", "wrong_dtype", "archive"]
)
def test_a_bad_reference_cache_is_recomputed_and_replaced(tmp_path, caplog, kind):
    rows, key = 5, "k" * 64
    path = tmp_path / "cache" / f"{key}.npy"
    path.parent.mkdir()
    Unpickled.marker = tmp_path / "unpickled"
    bad_cache(path, kind, rows)
    expected = np.linspace(-3.0, -1.0, rows * 2, dtype=np.float32).reshape(rows, 2)
    calls = []

    def compute():
        calls.append(1)
        return expected

    with caplog.at_level(logging.WARNING, logger="cpo_jax.train.reference_cache"):
        values = load_or_compute(path.parent, key, compute, rows=rows)
    np.testing.assert_array_equal(values, expected)
    assert calls == [1]
    assert str(path) in caplog.text and "recomputing" in caplog.text
    assert not Unpickled.marker.exists()  # nothing was unpickled
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # replaced, no temp file left
    # the replacement is trusted next time: no recomputation
    np.testing.assert_array_equal(load_or_compute(path.parent, key, compute, rows=rows), expected)
    assert calls == [1]


def test_a_good_cache_is_read_without_computing(tmp_path):
    values = np.array([[-1.5, np.nan], [-2.0, -0.25]], np.float32)  # NaN marks a dropped example
    np.save(tmp_path / "key.npy", values)
    np.testing.assert_array_equal(load_or_compute(tmp_path, "key", lambda: pytest.fail("recomputed"), rows=2), values)


# --------------------------------------------------------------------------------------------------------------
# End to end: the trainer on a tiny model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("torch")
    from tests.train_fixtures import arithmetic_files, tiny_policy

    root = tmp_path_factory.mktemp("fault_assets")
    train, _ = arithmetic_files(root, train=32, eval=4)
    return {"policy": str(tiny_policy(root / "policy", layers=1)), "train": str(train)}


def tiny_config(assets, out: Path, *, steps: int = 4, save_every: int = 2, **loss) -> dict:
    return {
        "output_dir": str(out),
        "model": {"path": assets["policy"]},
        "data": {"train_files": [assets["train"]], "max_length": 96, "pairs_per_batch": 4},
        "loss": {"name": "sigmoid", "hparams": {"beta": 0.1}, **loss},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "steps": steps,
        "save_every": save_every,
        "async_checkpoints": False,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": False,
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    }


def tiny_trainer(assets, out: Path, **kwargs):
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.trainer import Trainer

    return Trainer(from_dict(TrainConfig, tiny_config(assets, out, **kwargs)), devices=jax.devices()[:1])


def test_a_run_resumes_past_a_damaged_checkpoint_and_a_torn_metrics_line(assets, tmp_path):
    first = tiny_trainer(assets, tmp_path / "run").run()
    truncate_arrays(tmp_path / "run" / "checkpoints" / "4")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill during a write

    resumed = tiny_trainer(assets, tmp_path / "run")
    result = resumed.run()
    assert (result.start_step, result.final_step) == (2, 4)
    # the same steps from the same state on the same device: the same losses, bit for bit
    assert [h["loss"] for h in result.history] == [h["loss"] for h in first.history][2:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoints_damaged" / "4" / "state").is_dir()
    again = tiny_trainer(assets, tmp_path / "run")
    assert again.restore_latest()[0] == 4  # the step saved again after the fall-back
    for x, y in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_trainer_recomputes_a_reference_cache_of_another_size(assets, tmp_path, caplog):
    first = tiny_trainer(assets, tmp_path / "run", reference="precomputed")
    (cache,) = (tmp_path / "run" / "reference_cache").glob("*.npy")
    np.save(cache, np.zeros((first.reference_table.shape[0] + 1, 2), np.float32))  # another run's size
    with caplog.at_level(logging.WARNING, logger="cpo_jax.train.reference_cache"):
        second = tiny_trainer(assets, tmp_path / "run", reference="precomputed")
    assert str(cache) in caplog.text and "float32 [32, 2]" in caplog.text
    np.testing.assert_array_equal(second.reference_table, first.reference_table)
    np.testing.assert_array_equal(np.load(cache), first.reference_table)


def test_no_intact_checkpoint_stops_the_command_line_with_a_user_error(assets, tmp_path, capsys):
    from cpo_jax.cli import main

    tiny_trainer(assets, tmp_path / "run", steps=2, save_every=1).run()
    truncate_arrays(tmp_path / "run" / "checkpoints" / "2")
    delete_state_item(tmp_path / "run" / "checkpoints" / "1")
    before = tree_bytes(tmp_path / "run")
    config = tmp_path / "config.yaml"
    # JSON is YAML; the command line wants a mesh that uses every device (a harmless change for a resume)
    cli_config = {**tiny_config(assets, tmp_path / "run", steps=2, save_every=1), "mesh": {"data": -1}}
    config.write_text(json.dumps(cli_config))

    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "loading the model" in err  # the stages that ran before the error, then the error alone
    from tests.cli_fixtures import without_stages

    err = without_stages(err)
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) <= 8, err
    assert str(tmp_path / "run" / "checkpoints") in err and "step 2:" in err and "step 1:" in err
    assert tree_bytes(tmp_path / "run") == before  # nothing moved, nothing written


MULTIHOST_CHILD = """
import json, sys
from cpo_jax.parallel import initialize
pid, phase, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
assert initialize("localhost:{port}", 2, pid)
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from cpo_jax.train.checkpoint import Checkpointer
from cpo_jax.train.step import TrainState

replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
def state(offset):
    value = lambda x: jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])
    return TrainState(step=value(np.int32(offset)), params={{"w": value(np.arange(4.0, dtype=np.float32) + offset)}},
                      opt_state={{}}, rng=value(np.zeros(2, np.uint32)))
checkpointer = Checkpointer(directory, keep=5, async_save=False)
if phase == "save":
    for step in (1, 2):
        checkpointer.save(step, state(step), {{"pid": pid, "step": step}}, {{"run": "a"}})
    checkpointer.wait()
    out = {{}}
else:
    template = state(0)
    step, restored, data = checkpointer.restore_latest(template, jax.tree.map(lambda x: x.sharding, template))
    checkpointer.save(2, state(20), {{"pid": pid, "step": 20}}, {{"run": "a"}})  # the same step number again
    checkpointer.wait()
    out = {{"step": step, "w": np.asarray(restored.params["w"].addressable_data(0)).tolist(), "data": data,
           "steps": sorted(checkpointer.manager.all_steps())}}
checkpointer.close()
open(directory + f"/../{{phase}}_{{pid}}.json", "w").write(json.dumps(out))
"""


def test_two_processes_fall_back_together_and_move_once(tmp_path):
    """Both processes agree on the fall-back step and get their own data state; process 0 alone moves the step."""
    import socket
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )

    def run_two(phase: str) -> list[dict]:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        script = tmp_path / f"{phase}.py"
        script.write_text(MULTIHOST_CHILD.format(port=port))
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(pid), phase, str(tmp_path / "checkpoints")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for pid in (0, 1)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err.decode()[-4000:]
        return [json.loads((tmp_path / f"{phase}_{pid}.json").read_text()) for pid in (0, 1)]

    run_two("save")
    truncate_arrays(tmp_path / "checkpoints" / "2")
    a, b = run_two("restore")
    assert a["step"] == b["step"] == 1 and a["w"] == b["w"] == [1.0, 2.0, 3.0, 4.0]
    assert a["data"] == {"pid": 0, "step": 1} and b["data"] == {"pid": 1, "step": 1}
    assert a["steps"] == b["steps"] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints_damaged").iterdir()) == ["2"]
