"""Training with LoRA adapters on the one loop, against TRL + PEFT's own code: the same per-step losses, log-probs and
gradient norms as DPOTrainer with a PeftModel (reference = the base with the adapters off), the same trained adapter;
checkpoints that hold only the adapters, bit-exact resume, the merged and the PEFT export agreeing in transformers;
and the bad configurations refused with their keys."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cpo_jax.cli import main
from cpo_jax.data import write_jsonl
from cpo_jax.errors import ConfigError
from cpo_jax.train import TrainConfig, from_dict
from cpo_jax.train.validate import validate_config
from tests.test_trl_fidelity import STRING_RECORDS, _tiny_llama, sgd_dpo_config
from tests.tokenizer_fixtures import smollm2_style
from tests.train_fixtures import arithmetic_files, tiny_policy

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("trl")

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _random_peft_adapter(model_dir, out, *, rank=4, alpha=8, targets=TARGETS):
    """A PEFT LoRA adapter with random, non-zero A and B (so the policy differs from the base at step 0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=False),
    )
    model.save_pretrained(out)
    return out


def _trl_lora(model_dir, adapter_dir, records, *, beta, lr, steps, out):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    args = sgd_dpo_config(out, records, loss_type="sigmoid", beta=beta, lr=lr, steps=steps)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    adapters = {k: v.detach().numpy() for k, v in model.state_dict().items() if ".default." in k}  # not TRL's "ref"
    return [h for h in trainer.state.log_history if "loss" in h], adapters


def _our_lora(model_dir, adapter_dir, records, *, beta, lr, steps, out):
    from cpo_jax.train.trainer import Trainer

    data = write_jsonl(records, out / "data.jsonl")
    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(out / "run"),
            "model": {"path": str(model_dir), "adapter_path": str(adapter_dir)},
            "data": {
                "train_files": [str(data)],
                "max_length": 1024,
                "max_prompt_length": 1023,
                "pairs_per_batch": len(records),
            },
            "loss": {"name": "sigmoid", "hparams": {"beta": beta}},
            "optim": {"name": "sgd", "learning_rate": lr, "schedule": "constant", "max_grad_norm": None},
            "steps": steps,
            "save_every": 1000,
            "progress_bar": False,
            "tensorboard": False,
            "export_hf": True,
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        },
    )
    assert cfg.loss.reference == "adapter"  # TRL's default for an imported adapter: a frozen copy of it
    return Trainer(cfg, devices=jax.devices()[:1]).run().history


def test_lora_trajectory_equals_trl_with_a_peft_model(tmp_path):
    """Five SGD steps of TRL's DPOTrainer on a PeftModel with a pretrained adapter (its reference: a frozen "ref" copy
    of the adapter) and of cpo_jax with model.adapter_path (reference: adapter): the same losses, log-probs,
    gradient norms and trained adapter."""
    from safetensors.numpy import load_file

    model_dir = _tiny_llama(tmp_path / "model", smollm2_style())
    adapter = _random_peft_adapter(model_dir, tmp_path / "adapter")
    beta, lr, steps = 0.1, 0.5, 5
    theirs, trained = _trl_lora(model_dir, adapter, STRING_RECORDS, beta=beta, lr=lr, steps=steps, out=tmp_path / "trl")
    ours = _our_lora(model_dir, adapter, STRING_RECORDS, beta=beta, lr=lr, steps=steps, out=tmp_path)
    assert len(theirs) == len(ours) == steps
    np.testing.assert_allclose([h["loss"] for h in ours], [h["loss"] for h in theirs], rtol=1e-4, atol=1e-5)
    for key in ("logps/chosen", "logps/rejected", "grad_norm", "rewards/margins"):
        np.testing.assert_allclose([h[key] for h in ours], [h[key] for h in theirs], rtol=1e-4, atol=1e-6, err_msg=key)
    assert ours[0]["rewards/margins"] == theirs[0]["rewards/margins"] == 0.0
    exported = load_file(tmp_path / "run" / "hf_adapter" / "adapter_model.safetensors")
    assert len(exported) == len(trained) > 0
    for key, value in trained.items():  # PEFT's state_dict names carry the adapter name ("default")
        mine = exported[key.replace(".default", "")]
        np.testing.assert_allclose(mine, value, rtol=1e-4, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_assets")
    policy = tiny_policy(root / "policy")
    train, evaluation = arithmetic_files(root, train=32, eval=8)
    return {"policy": str(policy), "train": str(train), "eval": str(evaluation)}


def _config(assets, out, **overrides) -> TrainConfig:
    base = {
        "output_dir": str(out),
        "model": {"path": assets["policy"], "lora": {"rank": 4, "alpha": 8}},
        "data": {"train_files": [assets["train"]], "max_length": 96, "pairs_per_batch": 4},
        "optim": {"learning_rate": 1e-2, "schedule": "constant"},
        "steps": 4,
        "save_every": 2,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": True,
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "async_checkpoints": False,
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return from_dict(TrainConfig, base)


def _trainer(cfg):
    from cpo_jax.train.trainer import Trainer

    return Trainer(cfg, devices=jax.devices()[:1])


def test_lora_run_saves_only_adapters_resumes_exactly_and_exports_both_ways(assets, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    full = _trainer(_config(assets, tmp_path / "full"))
    result = full.run()
    assert result.history[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-7)  # fresh adapters: B = 0, policy = base
    assert result.history[-1]["loss"] != result.history[0]["loss"]
    trained = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(full.state.params)}
    assert trained and all("lora_a" in k or "lora_b" in k for k in trained)  # nothing else trains or is saved
    n_adapter = sum(x.size for x in jax.tree.leaves(full.state.params))
    assert n_adapter < full.num_params / 4

    stopped = _trainer(_config(assets, tmp_path / "resumed", steps=2))
    stopped.run()
    resumed = _trainer(_config(assets, tmp_path / "resumed"))
    again = resumed.run()
    assert again.start_step == 2
    assert [h["loss"] for h in again.history] == [h["loss"] for h in result.history[2:]]  # bit for bit

    # The merged export and base + PEFT adapter give the same logits in transformers.
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "hf", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "full" / "hf_adapter")
    with torch.no_grad():
        a, b = merged(ids).logits.numpy(), adapted(ids).logits.numpy()
        untouched = AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32)(ids).logits.numpy()
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(a - untouched).max() > 1e-4  # the adapters changed the model
    config = json.loads((tmp_path / "full" / "hf_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"

    # cpo-jax convert, from the checkpoint alone: --adapter-only equals the run's own PEFT export, the merged export
    # its merged one; a full fine-tuning run has no adapters to export.
    from safetensors.numpy import load_file

    assert main(["convert", "orbax-to-hf", str(tmp_path / "full"), str(tmp_path / "adapter4"), "--adapter-only"]) == 0
    assert main(["convert", "orbax-to-hf", str(tmp_path / "full"), str(tmp_path / "merged4")]) == 0
    for name, want in (
        ("adapter4/adapter_model.safetensors", "full/hf_adapter/adapter_model.safetensors"),
        ("merged4/model.safetensors", "full/hf/model.safetensors"),
    ):
        got, expected = load_file(tmp_path / name), load_file(tmp_path / want)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name}: {key}")
    assert (
        main(["convert", "orbax-to-hf", str(tmp_path / "full"), str(tmp_path / "a2"), "--adapter-only", "--step", "2"])
        == 0
    )
    step2, step4 = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a2", "adapter4"))
    assert set(step2) == set(step4) and any(not np.array_equal(step2[k], step4[k]) for k in step4)
    code = main(
        ["convert", "orbax-to-hf", str(tmp_path / "resumed"), str(tmp_path / "x"), "--adapter-only", "--step", "3"]
    )
    assert code == 2 and "step 3" in capsys.readouterr().err


def test_the_reference_adapter_is_the_imported_one(assets, tmp_path):
    """loss.reference=adapter (the default with model.adapter_path): the policy starts at the imported adapter and
    so does the reference, so the first loss is log 2 although the adapter is not zero; loss.reference=base puts the
    reference at the base instead."""
    adapter = _random_peft_adapter(assets["policy"], tmp_path / "adapter", targets=["q_proj", "v_proj"])
    cfg = _config(
        assets, tmp_path / "run", model={"lora": None, "adapter_path": str(adapter)}, steps=2, export_hf=False
    )
    assert cfg.loss.reference == "adapter"
    history = _trainer(cfg).run().history
    assert history[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-7)
    base_ref = (
        _trainer(
            _config(
                assets,
                tmp_path / "base",
                model={"lora": None, "adapter_path": str(adapter)},
                loss={"reference": "base"},
                steps=1,
                export_hf=False,
            )
        )
        .run()
        .history
    )
    assert abs(base_ref[0]["loss"] - np.log(2.0)) > 1e-6  # against the base, the imported adapter already differs


@pytest.mark.parametrize(
    "overrides,key,needle",
    [
        ({"model": {"lora": None}, "loss": {"reference": "base"}}, "loss.reference", "needs adapters"),
        ({"loss": {"reference": "adapter"}}, "loss.reference", "model.adapter_path is not set"),
        ({"loss": {"reference": "separate"}}, "loss.reference", "second full copy"),
        ({"model": {"lora": None, "quantize": "nf4"}}, "model.quantize", "needs adapters"),
        ({"model": {"lora": {"rank": 0}}}, "model.lora.rank", ">= 1"),
        ({"model": {"lora": {"alpha": -1.0}}}, "model.lora.alpha", "> 0"),
        ({"model": {"lora": {"dropout": 1.0}}}, "model.lora.dropout", "[0, 1)"),
        ({"model": {"lora": {"targets": []}}}, "model.lora.targets", "empty"),
    ],
    ids=[
        "base-without-lora",
        "adapter-without-path",
        "separate-with-lora",
        "quantize-without-lora",
        "rank",
        "alpha",
        "dropout",
        "targets",
    ],
)
def test_bad_adapter_configs_name_their_key(assets, tmp_path, overrides, key, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(_config(assets, tmp_path, **overrides))
    assert f"config key {key}" in str(err.value) and needle in str(err.value)


def test_bad_adapters_at_the_command_line(assets, tmp_path, capsys):
    """Each a few lines with exit status 2: an unknown target (listing the valid ones), a missing adapter directory,
    a model.lora section that disagrees with the imported adapter."""
    yaml = tmp_path / "run.yaml"

    def run(model: dict) -> tuple[int, str]:
        cfg = {
            "output_dir": str(tmp_path / "out"),
            "model": {"path": assets["policy"], **model},
            "data": {"train_files": [assets["train"]], "max_length": 96},
            "steps": 1,
            "progress_bar": False,
            "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        }
        yaml.write_text(json.dumps(cfg))
        code = main(["train", str(yaml)])
        return code, capsys.readouterr().err

    code, err = run({"lora": {"rank": 2, "targets": ["q_proj", "qkv"]}})
    assert code == 2 and "Traceback" not in err and "qkv" in err and "q_proj" in err and "v_proj" in err
    code, err = run({"lora": {"rank": 2}, "quantize": "nf4"})  # in-features 32: no whole NF4 block of 64
    assert code == 2 and "Traceback" not in err and "block" in err, err
    code, err = run({"adapter_path": str(tmp_path / "missing")})
    assert code == 2 and "Traceback" not in err and "missing" in err
    adapter = _random_peft_adapter(assets["policy"], tmp_path / "adapter", targets=["q_proj"])
    code, err = run({"adapter_path": str(adapter), "lora": {"rank": 8, "alpha": 8}})
    assert code == 2 and "Traceback" not in err and "config key model.lora.rank" in err and "4" in err


def test_adapter_dropout_trains_with_fresh_masks_and_evaluates_without(assets, tmp_path):
    """lora.dropout > 0: the trajectory differs from dropout 0 (the masks act in training), a rerun is identical
    (masks are a function of the seed and step), successive steps draw new masks, and evaluation has no dropout."""

    def run(name, dropout, steps=3):
        cfg = _config(
            assets,
            tmp_path / name,
            model={"lora": {"rank": 4, "alpha": 8, "dropout": dropout}},
            steps=steps,
            export_hf=False,
            save_every=100,
            data={"eval_files": [assets["eval"]]},
        )
        trainer = _trainer(cfg)
        return trainer, [h["loss"] for h in trainer.run().history]

    plain, without = run("plain", 0.0)
    dropped, with_dropout = run("dropout", 0.5)
    _, again = run("again", 0.5)
    assert with_dropout == again
    assert with_dropout[0] == without[0]  # B = 0 at step 1: the adapters add nothing, dropped or not
    assert with_dropout[1:] != without[1:]
    first, second = dropped.evaluate(dropped.state.params), dropped.evaluate(dropped.state.params)
    assert first == second
    # The same parameters with dropout 0 evaluate to the same numbers: evaluation has no dropout at all.
    np.testing.assert_allclose(plain.evaluate(dropped.state.params)["loss"], first["loss"], rtol=1e-6)


def test_rloo_trains_adapters_on_the_shared_base(assets, tmp_path):
    """RLHF with adapters: only the adapters train, the reference is the base with them off (KL exactly 0 before
    the first update), sampling reads the adapters and the frozen base in place, and the run exports both ways."""
    from cpo_jax.rlhf.trainer import RLTrainer

    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(tmp_path / "rl"),
            "model": {"path": assets["policy"], "lora": {"rank": 4, "alpha": 16}},
            "data": {"train_files": ["bundled:arithmetic-prompts:32"], "max_length": 80, "max_prompt_length": 64},
            "loss": {"objective": "rlhf"},
            "rl": {
                "algorithm": "rloo",
                "reward": "verifier:digits",
                "prompts_per_step": 4,
                "num_generations": 2,
                "max_new_tokens": 8,
                "kl_coef": 0.05,
            },
            "optim": {"learning_rate": 3e-2, "schedule": "constant"},
            "steps": 2,
            "save_every": 2,
            "progress_bar": False,
            "tensorboard": False,
            "export_hf": True,
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        },
    )
    trainer = RLTrainer(cfg, devices=jax.devices()[:1])
    history = trainer.run().history
    assert history[0]["objective/kl"] == 0.0  # the policy is the base at the first rollout
    assert all(np.isfinite(h["loss/total"]) for h in history)
    leaves = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.state.params)}
    assert leaves and all("lora_a" in k or "lora_b" in k for k in leaves)
    assert (tmp_path / "rl" / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "rl" / "hf_adapter" / "adapter_model.safetensors").is_file()


def test_sharded_lora_training_equals_single_device(assets, tmp_path):
    """FSDP x tensor parallel (data 2, fsdp 2, tensor 2) with adapters, scan_layers and remat: the same losses as one
    device, and the adapters sharded like the kernels they adapt."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    from cpo_jax.train.trainer import Trainer

    model = {"scan_layers": True, "remat": "full"}
    single = _trainer(_config(assets, tmp_path / "single", model=model, export_hf=False, save_every=100))
    sharded = Trainer(
        _config(
            assets,
            tmp_path / "sharded",
            model=model,
            export_hf=False,
            save_every=100,
            mesh={"data": 2, "fsdp": 2, "tensor": 2},
        ),
        devices=jax.devices()[:8],
    )
    a, b = single.run().history, sharded.run().history
    np.testing.assert_allclose([h["loss"] for h in b], [h["loss"] for h in a], rtol=1e-5, atol=1e-6)
    q = sharded.state.params["model"]["layers"]["attn"]["q"]
    kernel = sharded.frozen["layers"]["attn"]["q"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8
    assert q["lora_a"][...].sharding.spec[1] == kernel.sharding.spec[1]  # A [L, in, r] splits `in` like W
    assert q["lora_b"][...].sharding.spec[2] == kernel.sharding.spec[2]  # B [L, r, out] splits `out` like W


def test_qlora_trains_on_a_quantised_base_and_exports_what_it_trained(tmp_path):
    """model.quantize=nf4: the frozen decoder weights are NF4 codes (0.5625 B/param), the first loss is log 2
    (the reference is the same quantised base), the merged export (dequantised base + adapters) reproduces the
    trained policy's logits in transformers, and convert from the checkpoint writes the same tensors."""
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    policy = tiny_policy(tmp_path / "policy", hidden=64, intermediate=128)  # in-features NF4's block of 64 divides
    train, _ = arithmetic_files(tmp_path, train=16, eval=4)
    assets = {"policy": str(policy), "train": str(train)}
    trainer = _trainer(_config(assets, tmp_path / "run", model={"quantize": "nf4"}, steps=3, save_every=3))
    frozen_layers = trainer.frozen["layers"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(frozen_layers)]
    codes, kernels = [p for p in paths if "codes" in p], [p for p in paths if "'kernel'" in p]
    assert codes and not kernels  # no float copy of a decoder weight is held
    history = trainer.run().history
    assert history[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-7)
    assert history[-1]["loss"] != history[0]["loss"]

    ids = np.array([[5, 17, 42, 99, 7, 3]])
    ours = np.asarray(trainer.policy()(jax.numpy.asarray(ids)))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = merged(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    assert main(["convert", "orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "again")]) == 0
    again, own = (
        load_file(tmp_path / "again" / "model.safetensors"),
        load_file(tmp_path / "run" / "hf" / "model.safetensors"),
    )
    for key in own:
        np.testing.assert_array_equal(again[key], own[key], err_msg=key)
