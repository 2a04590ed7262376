"""What a newcomer (often from TRL) types: switching a shipped CPO config to DPO in one override, TRL's names
(``dpo``, a ``loss.type`` list with ``loss.weights``, ``max_steps``), ``epochs`` instead of ``steps``, the wandb
start-up check, hub ids from the local HF cache, ``convert hf-to-orbax`` and back, and a config reference generated
from the dataclasses (docs/config.md, ``cpo-jax train --help-config``). Every bad input: exit status 2 and a message
naming the key."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from cpo_jax import losses
from cpo_jax.cli import load_config, main
from tests.cli_fixtures import cli_env, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
CPO_CONFIG = str(REPO / "configs" / "qwen2.5-0.5b" / "cpo.yaml")  # shipped: hparams {beta, gamma, tau, alpha}
CPO_FILLED = ["model.path=tiny-random", "data.train_files=[bundled:tiny-chat]"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A CPO_JAX_CACHE of this module's own, holding tiny-random."""
    return tmp_path_factory.mktemp("cpo_jax_cache")


@pytest.fixture(autouse=True)
def _own_cache(cache, monkeypatch):
    monkeypatch.setenv("CPO_JAX_CACHE", str(cache))


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    assert len(err.strip().splitlines()) <= 8, err
    for needle in needles:
        assert needle in err, (needle, err)


def notes(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "cpo_jax.config")


# ---------------------------------------------------------------------------------------------------------------
# Switching the loss in one override
@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.name=sigmoid"],
        ["loss.name=dpo"],
        ["loss.name=sigmoid", "loss.hparams={beta:0.1}"],
        ["loss.name=sigmoid", "loss.hparams={beta: 0.1}"],
        ["loss.name=sigmoid", "loss.hparams.gamma=null", "loss.hparams.tau=null", "loss.hparams.alpha=null"],
        ["loss.name=sigmoid", "~loss.hparams.gamma", "~loss.hparams.tau", "~loss.hparams.alpha"],
    ],
)
def test_a_shipped_cpo_config_becomes_dpo_in_one_override(overrides, caplog):
    with caplog.at_level(logging.WARNING, logger="cpo_jax.config"):
        cfg = load_config(CPO_CONFIG, CPO_FILLED + overrides)
    assert cfg.loss.name == "sigmoid" and set(cfg.loss.hparams) == {"beta"}
    if any(o.startswith("loss.hparams=") for o in overrides):
        assert cfg.loss.hparams == {"beta": 0.1} and notes(caplog) == ""  # replaced: nothing left to drop
    else:
        assert cfg.loss.hparams == {"beta": 0.1}  # the file's beta stays


def test_file_hyperparameters_the_new_loss_does_not_take_are_dropped_with_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="cpo_jax.config"):
        cfg = load_config(CPO_CONFIG, [*CPO_FILLED, "loss.name=ipo"])
    assert cfg.loss.name == "ipo" and cfg.loss.hparams == {"beta": 0.1}
    said = notes(caplog)
    for key in ("gamma", "tau", "alpha"):
        assert f"loss.hparams.{key}=" in said and "is not a hyperparameter of loss 'ipo': dropped" in said
    assert "cpo.yaml" in said  # says where the dropped value came from


def test_switching_the_objective_drops_the_file_hyperparameters(caplog):
    with caplog.at_level(logging.WARNING, logger="cpo_jax.config"):
        cfg = load_config(TINY, ["loss.objective=sft"])
    assert cfg.loss.objective == "sft" and cfg.loss.hparams == {}
    assert "not a hyperparameter of loss.objective='sft'" in notes(caplog)


def test_without_a_switch_an_inconsistent_file_is_still_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text().replace("name: cpo", "name: sigmoid"))
    code, _, err = run_main(capsys, "train", bad, f"output_dir={tmp_path / 'run'}")
    assert_user_error(code, err, "config key loss.hparams", "['gamma']", "not hyperparameters of loss 'sigmoid'")


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["loss.name=sigmoid", "loss.hparams.gamma=0.5"], ["command line: loss.hparams.gamma", "'gamma'", "'sigmoid'"]),
        (["loss.name=dpo", "loss.hparams={beta: 0.1, tau: 2}"], ["command line: loss.hparams.tau", "'tau'"]),
        (["loss.hparams.gama=0.5"], ["command line: loss.hparams.gama", "loss 'cpo' takes", "'gamma'"]),
        (["loss.objective=sft", "loss.hparams.beta=0.1"], ["command line: loss.hparams.beta", "no loss.hparams"]),
    ],
)
def test_typed_hyperparameters_the_loss_does_not_take_are_refused(capsys, tmp_path, overrides, needles):
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path}", *overrides)
    assert_user_error(code, err, "is not a hyperparameter of", *needles)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "override,needles",
    [
        ("~loss.hparams.nope", ["command line: ~loss.hparams.nope", "the config does not set loss.hparams.nope"]),
        ("max_steps=3", ["command line: max_steps=3", "TRL's name", "steps=N"]),
        ("num_train_epochs=2", ["TRL's name", "epochs=E"]),
        ("loss_type=[sigmoid]", ["TRL's name", "loss.type="]),
        ("loss_weights=[1.0]", ["TRL's name", "loss.weights="]),
        ("steps", ["'steps' is not key=value"]),
    ],
)
def test_bad_overrides_are_named(capsys, tmp_path, override, needles):
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path}", override)
    assert_user_error(code, err, *needles)


def test_max_steps_in_a_config_file_is_refused_with_the_key_to_use(capsys, tmp_path):
    bad = tmp_path / "trl.yaml"
    bad.write_text(Path(TINY).read_text().replace("steps: 12", "max_steps: 12"))
    code, _, err = run_main(capsys, "train", bad, f"output_dir={tmp_path / 'run'}")
    assert_user_error(code, err, "trl.yaml", "'max_steps' is TRL's name", "steps=N")


# ---------------------------------------------------------------------------------------------------------------
# TRL's names: dpo, loss.type + loss.weights
def test_dpo_is_an_alias_of_sigmoid():
    assert losses.get("dpo") is losses.get("sigmoid")
    assert losses.hyperparameters("dpo") == losses.hyperparameters("sigmoid")
    assert not losses.couples_batch("dpo")
    cfg = load_config(TINY, ["loss.name=dpo", "loss.hparams={beta: 0.1}"])
    assert cfg.loss.name == "sigmoid"  # stored canonical: a resume under either name is the same run
    from cpo_jax.train.config import LOSS_ALIASES

    assert LOSS_ALIASES == losses.ALIASES  # config.py keeps its own copy to stay free of jax


def _logps(seed: int = 0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-20, 3, 6).astype(np.float32) for _ in range(4))
    n = rng.integers(3, 12, 6).astype(np.float32)
    return losses.PairLogps(pc, pr, rc, rr, chosen_lengths=n, rejected_lengths=n + 2)


def test_loss_type_list_is_trls_weighted_sum(caplog):
    """TRL's DPOTrainer: loss = sum_k loss_weights[k] * mean(per-sequence loss of loss_type[k]); weights default 1."""
    with caplog.at_level(logging.WARNING, logger="cpo_jax.config"):
        cfg = load_config(TINY, ["loss.type=[dpo,bco_pair,sft]", "loss.weights=[0.8,0.2,1.0]"])
    assert cfg.loss.type == ("sigmoid", "bco_pair", "sft") and cfg.loss.weights == (0.8, 0.2, 1.0)
    assert (
        cfg.loss.name == "0.8*sigmoid+0.2*bco_pair+1.0*sft" == losses.combined_name(zip(cfg.loss.type, [0.8, 0.2, 1]))
    )
    said = notes(caplog)
    assert "loss.name='cpo'" in said and "gives way to loss.type" in said  # the file's loss
    assert "loss.hparams.gamma=0.5" in said and cfg.loss.hparams == {"beta": 0.5}

    logps = _logps()
    got = np.asarray(losses.get(cfg.loss.name)(logps, beta=0.5))  # beta goes to every loss that takes it
    sigmoid, bco = (np.asarray(losses.get(n)(logps, beta=0.5)) for n in ("sigmoid", "bco_pair"))
    np.testing.assert_allclose(got, 0.8 * sigmoid + 0.2 * bco + np.asarray(losses.get("sft")(logps)), rtol=1e-6)
    assert losses.couples_batch(cfg.loss.name)  # sft's batch-token NLL couples the batch, as TRL's does

    equal = load_config(TINY, ["loss.type=[sigmoid,ipo]", "loss.hparams={beta: 0.1}"])
    assert equal.loss.name == "1.0*sigmoid+1.0*ipo"  # no loss_weights: 1.0 each, as TRL
    single = load_config(TINY, ["loss.type=dpo", "loss.hparams={beta: 0.1}"])  # TRL turns a string into a list
    assert single.loss.type == ("sigmoid",) and single.loss.name == "sigmoid"


def test_loss_type_round_trips_through_the_saved_config():
    from cpo_jax.train.config import TrainConfig, from_dict, to_dict

    cfg = load_config(TINY, ["loss.type=[sigmoid,sft]", "loss.weights=[1,0.5]"])
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["loss.type=[sigmoid,sft]", "loss.weights=[1.0]"], ["config key loss.weights", "1 weight(s) for the 2"]),
        (["loss.type=[sigmoid,nope]"], ["config key loss.type[1]", "unknown loss 'nope'"]),
        (["loss.type=[]"], ["config key loss.type", "is empty"]),
        (["loss.type=[sigmoid]", "loss.weights=[-1]"], ["config key loss.weights[0]", ">= 0"]),
        (["loss.weights=[1.0]"], ["config key loss.weights", "loss.type, which is not set"]),
        (["loss.type=[ipo]", "loss.name=cpo"], ["loss.name='cpo' conflicts with loss.type=['ipo']"]),
        (["loss.name=nope"], ["config key loss.name", "unknown loss 'nope'", "dpo=sigmoid"]),
    ],
)
def test_bad_loss_lists_are_named(capsys, tmp_path, overrides, needles):
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path}", *overrides)
    assert_user_error(code, err, *needles)


# ---------------------------------------------------------------------------------------------------------------
# epochs
def test_epochs_resolves_to_steps_from_the_train_set():
    from cpo_jax.train.config import TrainConfig, from_dict, resolve_epochs, steps_for_epochs

    cfg = from_dict(TrainConfig, {"epochs": 2, "grad_accum": 2, "data": {"pairs_per_batch": 4}})
    assert steps_for_epochs(cfg, 100) == 25  # 2 * 100 / (4 * 2)
    assert steps_for_epochs(cfg, 100, processes=4) == 7  # ceil(6.25): each host reads its own quarter
    assert resolve_epochs(cfg, 16).steps == 4 and resolve_epochs(cfg, 16).epochs == 2.0
    half = from_dict(TrainConfig, {"epochs": 0.5, "data": {"pairs_per_batch": 8}})
    assert steps_for_epochs(half, 128) == 8
    rl = from_dict(TrainConfig, {"epochs": 1, "loss": {"objective": "rlhf"}, "rl": {"prompts_per_step": 4}})
    assert steps_for_epochs(rl, 10) == 3  # prompts, not pairs
    plain = from_dict(TrainConfig, {"steps": 7})
    assert resolve_epochs(plain, 100) is plain


def test_epochs_on_the_command_line_sets_the_files_steps_aside(caplog):
    with caplog.at_level(logging.WARNING, logger="cpo_jax.config"):
        cfg = load_config(TINY, ["epochs=2"])
    assert cfg.epochs == 2.0 and "steps=12 from" in notes(caplog) and "gives way to epochs=2" in notes(caplog)


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["epochs=2", "steps=3"], ["command line", "steps=3 and epochs=2 are both given"]),
        (["epochs=0"], ["config key epochs", "must be a finite number > 0"]),
        (["epochs=-1"], ["config key epochs"]),
        (["epochs=many"], ["config key epochs='many'"]),
    ],
)
def test_bad_epochs_are_named(capsys, tmp_path, overrides, needles):
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path}", *overrides)
    assert_user_error(code, err, *needles)


def test_a_file_with_steps_and_epochs_is_refused(capsys, tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(Path(TINY).read_text() + "epochs: 1\n")
    code, _, err = run_main(capsys, "train", both, f"output_dir={tmp_path / 'run'}")
    assert_user_error(code, err, "both.yaml", "steps=12 and epochs=1 are both set")
    cfg = load_config(both, ["steps=5"])  # typing one of them settles it
    assert cfg.steps == 5 and cfg.epochs is None


def test_epochs_and_a_combined_loss_train_and_record_the_steps(cache, tmp_path):
    """One real run: a shipped CPO config turned into TRL's MPO in one override, for one epoch of 8 pairs in
    batches of 4: 2 steps, recorded as steps in config.json and in the checkpoint."""
    out = tmp_path / "run"
    proc = run_cli(
        cli_env(cache),
        "train",
        TINY,
        f"output_dir={out}",
        "loss.type=[dpo,bco_pair,sft]",
        "loss.weights=[0.8,0.2,1.0]",
        "epochs=1",
        "data.train_files=[bundled:arithmetic-train:8]",
        "data.eval_files=[]",
        "eval_every=0",
        "tensorboard=false",
        "export_hf=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained steps 0 -> 2" in proc.stdout
    assert "loss.hparams.gamma=0.5 from" in proc.stderr and "dropped" in proc.stderr  # the logged note
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 2 and saved["epochs"] == 1.0
    assert saved["loss"]["name"] == "0.8*sigmoid+0.2*bco_pair+1.0*sft" and saved["loss"]["hparams"] == {"beta": 0.5}
    from cpo_jax.train.checkpoint import Checkpointer

    stored = Checkpointer(out / "checkpoints").read_config(2)  # what a resume compares with
    assert stored["steps"] == 2 and stored["epochs"] == 1.0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)


# ---------------------------------------------------------------------------------------------------------------
# wandb
def test_the_wandb_extra_exists():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("wandb") for req in extras["wandb"])


def test_wandb_project_without_wandb_fails_before_any_work(capsys, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path / 'run'}", "wandb_project=mine")
    assert_user_error(code, err, "config key wandb_project", "pip install 'cpo_jax[wandb]'")
    assert not (tmp_path / "run").exists()  # stopped before the output directory, the model or any step


# ---------------------------------------------------------------------------------------------------------------
# Model paths: hub ids in the local HF cache, aliases in Python
def _fake_hub_cache(root: Path, repo: str, model_dir: Path, revision: str = "0123456789abcdef") -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    org, name = repo.split("/")
    repo_dir = root / f"models--{org}--{name}"
    snapshot = repo_dir / "snapshots" / revision
    shutil.copytree(model_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def tiny_dir(cache):
    from cpo_jax.hf.resolve import TINY as ALIAS
    from cpo_jax.hf.resolve import resolve_model_path

    with pytest.MonkeyPatch.context() as patch:  # the autouse fixture is function-scoped
        patch.setenv("CPO_JAX_CACHE", str(cache))
        return resolve_model_path(ALIAS)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_hub_id_in_the_local_hf_cache_is_a_model_path(tiny_dir, tmp_path, monkeypatch, capsys, variable):
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.hf.resolve import hub_cache_dir, resolve_model_path

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    hub = tmp_path / "home" / "hub" if variable == "HF_HOME" else tmp_path / "hub"
    monkeypatch.setenv(variable, str(hub.parent if variable == "HF_HOME" else hub))
    snapshot = _fake_hub_cache(hub, "HuggingFaceTB/SmolLM2-135M-Instruct", tiny_dir)
    assert hub_cache_dir() == hub
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == snapshot
    model = from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert model.config.vocab_size == 260
    cfg = load_config(TINY, ["model.path=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert cfg.model.path == "HuggingFaceTB/SmolLM2-135M-Instruct"

    code, _, err = run_main(capsys, "generate", "HuggingFaceTB/SmolLM2-360M", "--prompt", "hi")
    assert_user_error(code, err, "HuggingFaceTB/SmolLM2-360M", "not in the local HF cache", str(hub), "hf download")


def test_a_hub_id_that_is_not_cached_is_named_with_what_to_do(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path / 'run'}", "model.path=org/not-cached")
    assert_user_error(
        code,
        err,
        "config key model.path",
        "'org/not-cached'",
        "not in the local HF cache",
        "nothing is downloaded",
        "hf download org/not-cached",
    )


def test_a_partly_cached_hub_snapshot_is_named(tiny_dir, tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"
    snapshot = _fake_hub_cache(hub, "org/partial", tiny_dir)
    (snapshot / "config.json").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path / 'run'}", "model.path=org/partial")
    assert_user_error(code, err, "config key model.path", "no config.json")


def test_from_pretrained_accepts_the_command_lines_names(tiny_dir):
    from cpo_jax.hf.pretrained import from_pretrained

    by_name, by_dir = from_pretrained("tiny-random"), from_pretrained(tiny_dir)
    ids = np.arange(1, 9)[None]
    np.testing.assert_array_equal(np.asarray(by_name(ids)), np.asarray(by_dir(ids)))


# ---------------------------------------------------------------------------------------------------------------
# convert hf-to-orbax -> orbax-to-hf
def test_hf_to_orbax_and_back_is_exact(tiny_dir, tmp_path, capsys):
    from safetensors.numpy import load_file

    orbax, back = tmp_path / "orbax", tmp_path / "hf"
    assert run_main(capsys, "convert", "hf-to-orbax", tiny_dir, orbax)[0] == 0
    code, out, err = run_main(capsys, "convert", "orbax-to-hf", orbax, back)
    assert code == 0, err
    assert f"wrote {back}" in out
    original, restored = load_file(tiny_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert original.keys() == restored.keys()
    for name in original:
        assert original[name].dtype == restored[name].dtype, name
        np.testing.assert_array_equal(original[name], restored[name], err_msg=name)
    assert json.loads((back / "config.json").read_text()) == json.loads((tiny_dir / "config.json").read_text())
    for file in tiny_dir.iterdir():  # the tokenizer files too, byte for byte
        if file.suffix != ".safetensors":
            assert (back / file.name).read_bytes() == file.read_bytes(), file.name

    code, _, err = run_main(capsys, "convert", "orbax-to-hf", orbax, back)
    assert_user_error(code, err, str(back), "not an empty directory", "--overwrite")
    assert run_main(capsys, "convert", "orbax-to-hf", orbax, back, "--overwrite")[0] == 0
    code, _, err = run_main(capsys, "convert", "orbax-to-hf", orbax, tmp_path / "x", "--step", "3")
    assert_user_error(code, err, "option --step", "Orbax model directory")
    code, _, err = run_main(capsys, "convert", "hf-to-orbax", tiny_dir, orbax)
    assert_user_error(code, err, str(orbax), "the destination exists")


# ---------------------------------------------------------------------------------------------------------------
# The config reference
def test_docs_config_md_is_generated_from_the_dataclasses():
    from cpo_jax.train.config_doc import render_markdown

    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == render_markdown(), "docs/config.md is out of date: run python tools/gen_config_docs.py"


def test_every_config_key_is_documented():
    import dataclasses
    import typing

    from cpo_jax.train.config import TrainConfig
    from cpo_jax.train.config_doc import reference

    _, keys = reference()
    undocumented = [k.key for k in keys if not k.doc]
    assert undocumented == [], "give these fields a docstring in cpo_jax/train/config.py"

    def leaves(cls, prefix=""):
        for field in dataclasses.fields(cls):
            annotation = typing.get_type_hints(cls)[field.name]
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            section = annotation if dataclasses.is_dataclass(annotation) else None
            if section is None and len(options) == 1 and dataclasses.is_dataclass(options[0]):
                section = options[0]
            if section is not None:
                yield from leaves(section, f"{prefix}{field.name}.")
            else:
                yield prefix + field.name

    assert sorted(k.key for k in keys) == sorted(leaves(TrainConfig))
    text = (REPO / "docs" / "config.md").read_text()
    for name in ("export_hf", "eval_generation_prompts", "async_checkpoints", "min_lr_ratio", "logprob_chunk_size"):
        assert f"`{name}`" in text or f".{name}`" in text, name
    assert "CPO_JAX_CACHE" in text and "~/.cache/cpo_jax" in text and "0.5 GB" in text


def test_every_environment_variable_the_package_reads_is_documented():
    from cpo_jax.train.config_doc import ENVIRONMENT

    listed = {name for names, _, _ in ENVIRONMENT for name in names.split(", ")}
    used = set()
    for file in (REPO / "cpo_jax").rglob("*.py"):
        used |= set(re.findall(r"\bCPO_JAX_[A-Z_]+\b", file.read_text()))
    assert used <= listed, sorted(used - listed)


def test_help_config_prints_every_key(capsys):
    from cpo_jax.train.config_doc import reference

    code, out, _ = run_main(capsys, "train", "--help-config")
    assert code == 0
    for key in reference()[1]:
        assert f"  {key.key}: " in out, key.key
    assert "CPO_JAX_CACHE" in out and "``" not in out


def test_the_generator_tool_checks_the_committed_file():
    import subprocess

    proc = subprocess.run([sys.executable, "tools/gen_config_docs.py", "--check"], cwd=REPO, capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_the_docs_use_one_name_for_the_step_count():
    for doc in ("README.md", "docs/user_guide.md", "docs/training.md"):
        assert "max_steps=" not in (REPO / doc).read_text(), doc


@pytest.mark.parametrize("objective", ["sft", "reward", "rlhf"])
def test_a_combined_loss_type_on_an_objective_without_pairwise_loss_is_refused(objective):
    """loss.type would be silently ignored by SFT, reward and (non-online) RL runs."""
    from cpo_jax.errors import ConfigError
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.validate import validate_config

    cfg = from_dict(
        TrainConfig,
        {
            "model": {"path": "tiny-random"},
            "data": {"train_files": ["bundled:arithmetic-prompts:8"], "max_length": 96, "max_prompt_length": 64},
            "loss": {"objective": objective, "type": ["sigmoid", "sft"], "hparams": {}},
        },
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert err.value.where == "config key loss.type" and objective in str(err.value)
