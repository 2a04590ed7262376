"""The trainer: sharded == single-device, loss falls, reference modes agree, accumulation == big batch,
the NaN guard, bit-exact resume after a kill, a kill during a save, and restore onto another mesh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cpo_jax.errors import ConfigError, TrainingDiverged
from cpo_jax.train import TrainConfig, from_dict
from cpo_jax.train.trainer import Trainer
from tests.train_fixtures import arithmetic_files, tiny_policy

pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    policy = tiny_policy(root / "policy")
    train, evaluation = arithmetic_files(root)
    return {"policy": str(policy), "train": str(train), "eval": str(evaluation)}


def config(assets, out, **overrides) -> TrainConfig:
    base = {
        "output_dir": str(out),
        "model": {"path": assets["policy"]},
        "data": {"train_files": [assets["train"]], "max_length": 128, "pairs_per_batch": 4},
        "loss": {"name": "sigmoid", "hparams": {"beta": 0.1}},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "steps": 4,
        "save_every": 100,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": False,
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return from_dict(TrainConfig, base)


def make(cfg, devices=None) -> Trainer:
    """A trainer on one device unless ``devices`` says otherwise."""
    return Trainer(cfg, devices=devices if devices is not None else jax.devices()[:1])


def losses_of(result) -> list[float]:
    return [h["loss"] for h in result.history]


def params_of(trainer) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


def test_sharded_step_matches_single_device(assets, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    single = make(config(assets, tmp_path / "single"))
    sharded = make(config(assets, tmp_path / "sharded", mesh={"data": 2, "fsdp": 2, "tensor": 2}), jax.devices()[:8])
    a, b = single.run(), sharded.run()
    np.testing.assert_allclose(losses_of(b), losses_of(a), rtol=1e-5, atol=1e-6)
    q = sharded.state.params["model"]["layers"][0]["attn"]["q"]["kernel"][...]
    assert len(q.sharding.device_set) == 8
    # Adam divides by sqrt(v): reordered float32 sums in near-zero gradients move a few weights by ~1e-5
    # (updates are up to lr = 1e-2 per step), so parameters get a looser bound than losses.
    for x, y in zip(params_of(sharded), params_of(single)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=5e-5)


def test_loss_falls_on_the_verifiable_dataset(assets, tmp_path):
    result = make(
        config(
            assets,
            tmp_path / "run",
            steps=40,
            data={"eval_files": [assets["eval"]], "pairs_per_batch": 8},
            loss={"hparams": {"beta": 0.5}},
            optim={"learning_rate": 3e-3},
            eval_every=40,
            tensorboard=True,
        )
    ).run()
    losses = losses_of(result)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 41))
    for key in (
        "grad_norm",
        "learning_rate",
        "tokens_per_sec",
        "step_time",
        "rewards/accuracies",
        "diagnostics/frac_in_U",
        "logps/chosen",
    ):
        assert key in lines[0], key
    assert any("eval/loss" in r for r in lines)
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"]["name"] == "sigmoid"


def test_separate_and_precomputed_references_give_the_same_losses(assets, tmp_path):
    loss = {"name": "cpo", "hparams": {"beta": 0.5, "gamma": 0.5}}
    separate = make(config(assets, tmp_path / "sep", loss={**loss, "reference": "separate"})).run()
    pre = make(config(assets, tmp_path / "pre", loss={**loss, "reference": "precomputed"}))
    assert pre.ref_params is None and pre.reference_table.shape == (64, 2)
    np.testing.assert_allclose(losses_of(pre.run()), losses_of(separate), rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "pre" / "reference_cache").glob("*.npy"))) == 1
    again = make(config(assets, tmp_path / "pre", loss={**loss, "reference": "precomputed"}))
    np.testing.assert_array_equal(again.reference_table, pre.reference_table)


def test_gradient_accumulation_matches_one_big_batch(assets, tmp_path):
    big = make(config(assets, tmp_path / "big", steps=2, data={"pairs_per_batch": 8}))
    small = make(config(assets, tmp_path / "acc", steps=2, grad_accum=4, data={"pairs_per_batch": 2}))
    np.testing.assert_allclose(losses_of(small.run()), losses_of(big.run()), rtol=1e-5, atol=1e-6)
    for x, y in zip(params_of(small), params_of(big)):  # Adam amplifies summation-order noise (see above)
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=5e-5)


def test_nan_guard_skips_counts_and_stops_with_a_diagnosis(assets, tmp_path):
    trainer = make(config(assets, tmp_path / "nan", steps=10, save_every=1, max_nonfinite_steps=3))
    # beta = nan makes every loss NaN; validate_config refuses it up front, so it is set after construction.
    trainer.cfg = config(
        assets,
        tmp_path / "nan",
        steps=10,
        save_every=1,
        max_nonfinite_steps=3,
        loss={"hparams": {"beta": float("nan")}},
    )
    before = params_of(trainer)
    with pytest.raises(TrainingDiverged, match=r"step 3 of .*: 3 consecutive non-finite steps .*\(loss=nan"):
        trainer.run()
    for x, y in zip(params_of(trainer), before):
        np.testing.assert_array_equal(x, y)  # every update was skipped
    saved = trainer.checkpointer.latest_step()
    assert saved == 2  # steps 1 and 2 were saved (finite parameters); step 3 raised before saving
    from cpo_jax.train.checkpoint import abstract_with_shardings

    state, _, _ = trainer.checkpointer.restore(saved, abstract_with_shardings(trainer.state, trainer.state_shardings))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_one_nonfinite_step_is_skipped_and_training_recovers(assets, tmp_path):
    import functools

    from cpo_jax.train.step import train_step

    trainer = make(config(assets, tmp_path / "one"))
    bad_cfg = config(assets, tmp_path / "one", loss={"hparams": {"beta": float("nan")}})
    data = iter(trainer._pipeline(trainer.train_set, train=True))
    from cpo_jax.train.trainer import stack_micro_batches

    batch = trainer._global(stack_micro_batches([next(data)], 0))
    kw = dict(graphdef=trainer.graphdef, optimizer=trainer.optimizer, schedule=trainer.schedule)
    bad = jax.jit(functools.partial(train_step, cfg=bad_cfg, **kw))
    good = jax.jit(functools.partial(train_step, cfg=trainer.cfg, **kw))
    before = params_of(trainer)
    state, m = bad(trainer.state, batch, trainer.ref_params)
    assert not m["finite"] and int(m["nonfinite/consecutive"]) == 1 and int(m["nonfinite/total"]) == 1
    for x, y in zip(jax.tree.leaves(state.params), before):
        np.testing.assert_array_equal(np.asarray(x), y)
    state, m = good(state, batch, trainer.ref_params)
    assert m["finite"] and int(m["nonfinite/consecutive"]) == 0 and int(m["nonfinite/total"]) == 1
    assert any(not np.array_equal(np.asarray(x), y) for x, y in zip(jax.tree.leaves(state.params), before))


def _script(body: str, tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return path


def _child_env(same_devices: bool = False):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if not same_devices:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"child exited early with {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the child")


def test_resume_after_a_kill_is_bit_exact(assets, tmp_path):
    cfg = config(
        assets,
        tmp_path / "killed",
        steps=8,
        save_every=1,
        async_checkpoints=False,
        optim={"schedule": "cosine", "warmup_steps": 2},
    )
    child = _script(
        f"""
        import json, time
        import jax
        from cpo_jax.train import TrainConfig, from_dict
        from cpo_jax.train.trainer import Trainer
        import cpo_jax.train.checkpoint as t
        cfg = from_dict(TrainConfig, json.loads({json.dumps(json.dumps(_plain(cfg)))}))
        original = t.Checkpointer.save
        def slow_save(self, step, *a, **k):
            original(self, step, *a, **k)
            if step == 3:
                time.sleep(600)   # killed here, after step 3 is committed
        t.Checkpointer.save = slow_save
        Trainer(cfg, devices=jax.devices()[:1]).run()
    """,
        tmp_path,
    )
    # Same XLA flags as this process, so both run the same executables on the same kind of device.
    proc = subprocess.Popen(
        [sys.executable, str(child)],
        env=_child_env(same_devices=True),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    _wait_for(lambda: (tmp_path / "killed" / "checkpoints" / "3").is_dir(), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    uninterrupted = make(
        config(assets, tmp_path / "full", steps=8, optim={"schedule": "cosine", "warmup_steps": 2})
    ).run()
    resumed = make(cfg).run()
    assert resumed.start_step == 3
    assert losses_of(resumed) == losses_of(uninterrupted)[3:]  # bit for bit
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def _plain(cfg):
    from cpo_jax.train import to_dict

    return to_dict(cfg)


def test_kill_during_a_save_keeps_the_previous_checkpoint(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", steps=6, save_every=2)
    marker = tmp_path / "stuck"
    child = _script(
        f"""
        import asyncio, json, pathlib
        from orbax.checkpoint._src.path import atomicity
        from cpo_jax.train import TrainConfig, from_dict
        from cpo_jax.train.trainer import Trainer
        original = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self):
            if self._final_path.name == "4":
                pathlib.Path({str(marker)!r}).write_text(str(self._tmp_path))
                await asyncio.sleep(600)   # killed here: step 4 written, not yet renamed
            await original(self)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
        Trainer(from_dict(TrainConfig, json.loads({json.dumps(json.dumps(_plain(cfg)))}))).run()
    """,
        tmp_path,
    )
    proc = subprocess.Popen(
        [sys.executable, str(child)], env=_child_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    _wait_for(marker.is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert any("tmp" in name for name in leftovers) and "4" not in leftovers, leftovers

    resumed = make(cfg)
    assert resumed.checkpointer.latest_step() == 2
    result = resumed.run()
    assert result.start_step == 2 and result.final_step == 6


def test_restore_onto_a_different_mesh(assets, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    first = make(
        config(assets, tmp_path / "run", steps=2, save_every=2, mesh={"data": 2, "fsdp": 2, "tensor": 2}),
        jax.devices()[:8],
    )
    first.run()
    second = make(
        config(assets, tmp_path / "run", steps=2, mesh={"data": 1, "fsdp": 4, "tensor": 2}), jax.devices()[:8]
    )
    second.run()  # already at step 2: restores, trains nothing
    kernel = second.state.params["model"]["layers"][0]["attn"]["q"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.sharding.mesh.shape["fsdp"] == 4
    for x, y in zip(params_of(second), params_of(first)):
        np.testing.assert_array_equal(x, y)
    third = make(config(assets, tmp_path / "run", steps=3))
    result = third.run()
    assert result.start_step == 2 and result.final_step == 3


def test_sft_and_reward_objectives_train(assets, tmp_path):
    sft = make(
        config(assets, tmp_path / "sft", steps=12, loss={"objective": "sft", "hparams": {}, "reference": "none"})
    ).run()
    assert np.mean(losses_of(sft)[-3:]) < np.mean(losses_of(sft)[:3])
    from cpo_jax.data import write_jsonl

    # A separable signal for the reward head: chosen answers say yes, rejected ones say no.
    easy = write_jsonl(
        [{"prompt": f"Question {i}? ", "chosen": "yes", "rejected": "no"} for i in range(32)], tmp_path / "easy.jsonl"
    )
    rm = make(
        config(
            assets,
            tmp_path / "rm",
            steps=12,
            data={"train_files": [str(easy)]},
            export_hf=True,
            loss={"objective": "reward", "name": "sigmoid", "hparams": {}, "reference": "none"},
        )
    ).run()
    assert np.mean(losses_of(rm)[-3:]) < np.mean(losses_of(rm)[:3])
    assert "rewards/accuracies" in rm.history[0]
    # The reward model exports as an HF sequence classifier (parity: tests/test_reward_export.py).
    exported = json.loads((tmp_path / "rm" / "hf" / "config.json").read_text())
    assert exported["num_labels"] == 1 and exported["architectures"][0].endswith("ForSequenceClassification")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "rm" / "hf" / "model.safetensors"), "np") as f:
        assert f.get_tensor("score.weight").shape == (1, exported["hidden_size"]) and "lm_head.weight" not in f.keys()


def test_config_errors_name_the_key(assets, tmp_path):
    with pytest.raises(KeyError, match=r"optim.lerning_rate"):
        from_dict(TrainConfig, {"optim": {"lerning_rate": 1.0}})
    with pytest.raises(ValueError, match=r"loss.reference='bogus'"):
        from_dict(TrainConfig, {"loss": {"reference": "bogus"}})
    with pytest.raises(ConfigError, match=r"loss.hparams: \['betta'\] are not hyperparameters"):
        make(config(assets, tmp_path / "x", loss={"hparams": {"betta": 0.1}}))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        make(config(assets, tmp_path / "x", loss={"reference": "none"}))
