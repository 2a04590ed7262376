"""The capacity planner: its exact parts (weights, optimiser state, reference) equal what a real Trainer holds,
per-device bytes divide under FSDP, the command line prints a plan from a config.json alone, and its bad inputs
are a few lines with exit status 2. Also: configs/tiny_lora.yaml trains from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from cpo_jax.cli import main
from cpo_jax.train import TrainConfig, from_dict
from cpo_jax.train.plan import GIB, plan
from tests.train_fixtures import arithmetic_files, tiny_policy

pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_assets")
    policy = tiny_policy(root / "policy")
    train, _ = arithmetic_files(root, train=16, eval=4)
    return {"policy": str(policy), "train": str(train)}


def _config(assets, out, **model) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "output_dir": str(out),
            "model": {"path": assets["policy"], **model},
            "data": {"train_files": [assets["train"]], "max_length": 128, "pairs_per_batch": 2},
            "steps": 1,
            "progress_bar": False,
            "tensorboard": False,
            "export_hf": False,
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        },
    )


def _nbytes(tree) -> int:
    return sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )


@pytest.mark.parametrize("model", [{}, {"lora": {"rank": 4, "alpha": 8}}], ids=["full", "lora"])
def test_exact_parts_equal_what_the_trainer_holds(assets, tmp_path, model):
    from cpo_jax.hf.pretrained import read_hf_config
    from cpo_jax.train.trainer import Trainer

    cfg = _config(assets, tmp_path / "run", **model)
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    p = plan(cfg, read_hf_config(Path(assets["policy"])), devices=jax.devices()[:1])
    assert p.trainable_gib * GIB == _nbytes(trainer.state.params)
    assert p.optimizer_gib * GIB == _nbytes(trainer.state.opt_state)
    assert p.gradients_gib == p.trainable_gib
    if model:  # LoRA, reference = base: the base once, no reference weights
        assert p.frozen_gib * GIB == _nbytes(trainer.frozen) and p.reference_gib == 0.0
        assert p.mode == "LoRA r4 + base"
    else:  # full fine-tuning, a separate reference: a second copy
        assert p.frozen_gib == 0.0 and p.reference_gib * GIB == _nbytes(trainer.ref_params)
        assert p.mode == "full + separate"
    assert p.activations_gib > 0 and p.total_gib > p.trainable_gib


def test_fsdp_divides_the_per_device_weights(assets, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    from cpo_jax.hf.pretrained import read_hf_config

    hf = read_hf_config(Path(assets["policy"]))
    one = plan(_config(assets, tmp_path), hf, devices=jax.devices()[:1])
    cfg = from_dict(
        TrainConfig,
        {**json.loads(json.dumps(_plain(_config(assets, tmp_path)))), "mesh": {"data": 1, "fsdp": 8, "tensor": 1}},
    )
    eight = plan(cfg, hf, devices=jax.devices()[:8])
    assert eight.devices == 8
    assert one.trainable_gib / 8 <= eight.trainable_gib < one.trainable_gib / 2  # norms (and odd dims) replicate


def _plain(cfg):
    from cpo_jax.train import to_dict

    return to_dict(cfg)


def test_plan_from_the_command_line(capsys, tmp_path):
    code = main(["plan", str(REPO / "configs" / "tiny_lora.yaml"), "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert code == 0 and "LoRA r8 + base" in out and "fits" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["reference_gib"] == 0.0 and saved["total_gib"] > 0


def test_plan_bad_inputs(capsys, tmp_path):
    lora = str(REPO / "configs" / "tiny_lora.yaml")
    assert main(["plan", lora, "--devices", "0"]) == 2
    assert "--devices 0" in capsys.readouterr().err
    assert main(["plan", lora, "--devices", str(jax.device_count() + 1)]) == 2
    err = capsys.readouterr().err
    assert "device(s)" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plan", lora, f"model.path={empty}"]) == 2
    err = capsys.readouterr().err
    assert "config key model.path" in err and "config.json" in err and "Traceback" not in err
    assert main(["plan", str(REPO / "configs" / "llama-3.1-8b" / "cpo_lora.yaml")]) == 2  # model.path is ???
    assert "model.path" in capsys.readouterr().err


def test_tiny_lora_config_trains(tmp_path, capsys):
    code = main(
        [
            "train",
            str(REPO / "configs" / "tiny_lora.yaml"),
            f"output_dir={tmp_path / 'run'}",
            "steps=2",
            "eval_every=0",
            "save_every=2",
        ]
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "run" / "hf_adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "hf" / "config.json").is_file()


def test_an_imported_adapter_is_planned_from_its_config(assets, tmp_path):
    """model.adapter_path: the plan reads only adapter_config.json (no tensor) and counts what the trainer holds:
    the adapter as trainable weights and its frozen copy as the reference (TRL's default)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from cpo_jax.hf.pretrained import read_hf_config
    from cpo_jax.train.trainer import Trainer

    base = AutoModelForCausalLM.from_pretrained(assets["policy"])
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    cfg = _config(assets, tmp_path / "run", adapter_path=str(tmp_path / "adapter"))
    p = plan(cfg, read_hf_config(Path(assets["policy"])), devices=jax.devices()[:1])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    assert p.mode == "LoRA + adapter"
    assert p.trainable_gib * GIB == _nbytes(trainer.state.params) == p.reference_gib * GIB
    assert p.frozen_gib * GIB == _nbytes(trainer.frozen)
