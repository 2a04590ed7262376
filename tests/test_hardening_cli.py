"""User errors at the command line: exit status 2, a few lines naming the key/file, no traceback unless --debug;
config ranges; a rerun with a changed config is refused; convert reads only RUN_DIR and never replaces a
non-empty destination; an update that explodes without NaN stops training with a diagnosis."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cpo_jax.cli import main
from tests.cli_fixtures import cli_env, run_cli, without_stages

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    err = without_stages(err)  # progress lines of the stages that ran before the error
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.startswith("error: "), err
    assert len(err.strip().splitlines()) <= 8, err  # a few lines, not a dump
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.learning_rate=-1", "optim.learning_rate"),
        ("optim.learning_rate=0", "optim.learning_rate"),
        ("optim.learning_rate=1e6", "optim.learning_rate"),
        ("loss.hparams.beta=0", "loss.hparams.beta"),
        ("loss.hparams.beta=-0.5", "loss.hparams.beta"),
        ("loss.hparams.gamma=0", "loss.hparams.gamma"),
        ("steps=0", "steps"),
        ("save_every=0", "save_every"),
        ("log_every=0", "log_every"),
        ("keep_checkpoints=0", "keep_checkpoints"),
        ("eval_every=-1", "eval_every"),
        ("grad_accum=0", "grad_accum"),
        ("model.dtype=float33", "model.dtype"),
        ("model.remat=sometimes", "model.remat"),
        ("data.pairs_per_batch=0", "data.pairs_per_batch"),
        ("data.max_prompt_length=500", "data.max_prompt_length"),
        ("data.truncation=middle", "data.truncation"),
        ("optim.name=rmsprop2", "optim.name"),
        ("optim.b2=1.5", "optim.b2"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm"),
        ("loss.name=nope", "loss.name"),
        ("loss.hparams.tau=-1", "loss.hparams.tau"),
        ("mesh.data=64", "mesh"),
        ("mesh.data=0", "mesh"),
        ("max_update_ratio=0", "max_update_ratio"),
        ("steps=1.5", "steps"),
    ],
)
def test_bad_config_values_name_the_key(capsys, tmp_path, override, needle):
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path}", override)
    assert_user_error(code, err, f"config key {needle}")
    assert not (tmp_path / "checkpoints").exists()  # nothing was started


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_project_without_wandb_fails_at_start(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path}", "wandb_project=mine")
    assert_user_error(code, err, "config key wandb_project", "pip install wandb")


def test_config_file_problems_are_named(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  path: tiny-random\n data: [\n")
    code, _, err = run_main(capsys, "train", broken)
    assert_user_error(code, err, f"{broken}:", "YAML")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert_user_error(*run_main(capsys, "train", listing)[::2], str(listing), "mapping")
    assert_user_error(*run_main(capsys, "train", tmp_path)[::2], str(tmp_path), "not a file")
    assert_user_error(*run_main(capsys, "train", TINY, "steps")[::2], "key=value")


def test_debug_switch_shows_the_traceback(capsys, monkeypatch):
    code, _, err = run_main(capsys, "train", TINY, "steps=0", "--debug")
    assert code == 2 and "Traceback" in err and "config key steps" in err
    monkeypatch.setenv("CPO_JAX_DEBUG", "1")
    code, _, err = run_main(capsys, "train", TINY, "steps=0")
    assert code == 2 and "Traceback" in err


def test_internal_bugs_keep_their_traceback(monkeypatch):
    import cpo_jax.cli as cli

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "load_config", broken)
    with pytest.raises(ZeroDivisionError):
        main(["train", TINY])


def test_usage_errors_exit_2(capsys):
    code, _, err = run_main(capsys, "no-such-command")
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-p", "0"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
    ],
)
def test_generate_option_errors(capsys, args, needle):
    code, _, err = run_main(capsys, "generate", "tiny-random", "--prompt", "hi", *args)
    assert_user_error(code, err, needle)


def test_missing_model_and_paths(capsys, tmp_path):
    code, _, err = run_main(capsys, "generate", tmp_path / "nope", "--prompt", "hi")
    assert_user_error(code, err, str(tmp_path / "nope"))
    code, _, err = run_main(capsys, "convert", "orbax-to-hf", tmp_path / "nope", tmp_path / "out")
    assert_user_error(code, err, str(tmp_path / "nope"), "checkpoints")


def test_a_bad_model_config_is_reported_before_the_tokenizer_reads_it(capsys, tmp_path):
    """transformers' tokenizer loading also reads config.json and fails on it with unrelated messages (a
    ZeroDivisionError for 0 heads): the model's config is translated first, so the message names the key."""
    from cpo_jax.hf.resolve import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny-random"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path / 'out'}", f"model.path={model}")
    assert_user_error(code, err, f"{model / 'config.json'}", "num_attention_heads=0")
    (model / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    code, _, err = run_main(capsys, "generate", model, "--prompt", "hi")
    assert_user_error(code, err, f"{model / 'config.json'}:3:3", "not valid JSON")


def test_objectives_refuse_hyperparameters_they_do_not_take(capsys, tmp_path):
    # In the config file. (Switching loss.objective on the command line drops the file's other hyperparameters with
    # a logged note instead: tests/test_newcomer_cli.py.)
    for objective, needle in (("reward", "margin"), ("sft", "takes no loss.hparams")):
        config = tmp_path / f"{objective}.yaml"
        config.write_text(Path(TINY).read_text().replace("  name: cpo\n", f"  name: cpo\n  objective: {objective}\n"))
        code, _, err = run_main(capsys, "train", config, f"output_dir={tmp_path}")
        assert_user_error(code, err, "config key loss.hparams", "'beta'", needle)
    # Typed on the command line.
    code, _, err = run_main(
        capsys, "train", TINY, f"output_dir={tmp_path}", "loss.objective=reward", "loss.hparams={beta: 0.1}"
    )
    assert_user_error(code, err, "command line: loss.hparams.beta", "margin")


def test_output_dir_that_is_a_file(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("mine")
    code, _, err = run_main(capsys, "train", TINY, f"output_dir={target}")
    assert_user_error(code, err, "output_dir")
    assert target.read_text() == "mine"


# ------------------------------------------------------------------------------------------------------------
# end to end, as a user runs it: one CPU device, subprocesses


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cpo_jax_cache"))


def cli(env, *args, cwd=None):
    return run_cli(env, *args, cwd=cwd)


FAST = ["steps=2", "save_every=1", "eval_every=0", "data.eval_files=[]", "tensorboard=false"]


@pytest.fixture(scope="module")
def run_a(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    proc = cli(env, "train", TINY, f"output_dir={out}", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_rerun_with_a_changed_config_is_refused(env, run_a, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = cli(env, "train", TINY, f"output_dir={run}", *FAST, "loss.name=cpo_easy")  # as a user runs it
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "loss.name" in proc.stderr and "resume.allow_config_change" in proc.stderr
    # The refusal comes before any model loads, so the other keys are checked in this process (seconds, not minutes).
    for change, key in (
        ("loss.hparams.beta=0.7", "loss.hparams.beta"),
        ("data.train_files=[bundled:arithmetic-train:64]", "data.train_files"),
        ("optim.learning_rate=1e-4", "optim.learning_rate"),
    ):
        code, _, err = run_main(capsys, "train", TINY, f"output_dir={run}", *FAST, change)
        assert_user_error(code, err, key, "resume.allow_config_change")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing written, config.json included

    # Harmless changes resume and are logged; an explicit allow resumes a changed run.
    proc = cli(env, "train", TINY, f"output_dir={run}", *FAST[1:], "steps=3", "log_every=2")
    assert proc.returncode == 0 and "trained steps 2 -> 3" in proc.stdout, proc.stderr[-3000:]
    assert "steps changed" in proc.stderr
    proc = cli(
        env,
        "train",
        TINY,
        f"output_dir={run}",
        *FAST[1:],
        "steps=4",
        "optim.learning_rate=1e-4",
        "resume.allow_config_change=true",
    )
    assert proc.returncode == 0 and "trained steps 3 -> 4" in proc.stdout, proc.stderr[-3000:]


def _moved_run(run_a: Path, tmp_path: Path, output_dir: Path) -> Path:
    """A copy of ``run_a`` whose config names ``output_dir`` and a model directory that no longer exists."""
    moved = tmp_path / "moved"
    shutil.copytree(run_a, moved)
    config = json.loads((moved / "config.json").read_text())
    config["output_dir"] = str(output_dir)
    config["model"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    return moved


def _assert_same_weights(exported_dir: Path, run: Path) -> None:
    from safetensors.numpy import load_file

    exported, own = load_file(exported_dir / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert set(exported) == set(own)
    for key in own:
        np.testing.assert_array_equal(exported[key], own[key])


def test_convert_reads_only_the_run_directory_fast(env, run_a, tmp_path, capsys):
    """A copied run whose config names another output_dir and a deleted model exports its own weights; a non-empty
    destination and a missing step are refused (in process: the fast variant of the test below)."""
    moved = _moved_run(run_a, tmp_path, tmp_path / "elsewhere")
    code, _, err = run_main(capsys, "convert", "orbax-to-hf", str(moved), str(tmp_path / "hf"))
    assert code == 0, err[-3000:]
    _assert_same_weights(tmp_path / "hf", run_a)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run_main(capsys, "convert", "orbax-to-hf", str(moved), str(mine))
    assert_user_error(code, err, "--overwrite")
    assert (mine / "notes.txt").read_text() == "keep me"
    code, _, err = run_main(capsys, "convert", "orbax-to-hf", str(moved), str(tmp_path / "x"), "--step", "7")
    assert_user_error(code, err, "step 7")


@pytest.mark.slow
def test_convert_reads_only_the_run_directory(env, run_a, tmp_path):
    """A copied run exports its own weights even when the directory its config names holds another run."""
    other = tmp_path / "other"  # the same output_dir name as the config's, holding a different run
    proc = cli(env, "train", TINY, f"output_dir={other}", *FAST, "seed=1", "optim.learning_rate=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = _moved_run(run_a, tmp_path, other)

    proc = cli(env, "convert", "orbax-to-hf", moved, tmp_path / "hf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_weights(tmp_path / "hf", run_a)

    # A non-empty destination is refused and left alone; --overwrite replaces it.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = cli(env, "convert", "orbax-to-hf", moved, mine)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    proc = cli(env, "convert", "orbax-to-hf", moved, mine, "--overwrite", "--step", "1")
    assert proc.returncode == 0 and (mine / "model.safetensors").is_file(), proc.stderr[-3000:]
    proc = cli(env, "convert", "orbax-to-hf", moved, moved.parent, "--overwrite")
    assert proc.returncode == 2 and "contains the run" in proc.stderr and moved.is_dir()
    proc = cli(env, "convert", "orbax-to-hf", moved, tmp_path / "x", "--step", "7")
    assert proc.returncode == 2 and "step 7" in proc.stderr


def test_an_exploding_update_stops_training_with_a_diagnosis(env, tmp_path):
    """Adam at learning rate 5 moves every weight by ~5 at once: nothing is NaN, but the update is ~100x the
    parameters' norm. Training stops at step 1, before saving, with the diagnosis; exit status 2."""
    out = tmp_path / "boom"
    proc = cli(env, "train", TINY, f"output_dir={out}", *FAST, "optim.learning_rate=5", "optim.warmup_steps=0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "exploded" in proc.stderr and "max_update_ratio" in proc.stderr
    assert not list((out / "checkpoints").glob("[0-9]*"))
    # The check can be switched off.
    proc = cli(
        env,
        "train",
        TINY,
        f"output_dir={tmp_path / 'off'}",
        *FAST,
        "optim.learning_rate=5",
        "optim.warmup_steps=0",
        "max_update_ratio=null",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_convert_exports_a_ppo_run_without_its_value_head(env, tmp_path):
    """An RLHF run's checkpoint holds the policy and (PPO) a value head: the export is the policy alone, equal to
    the run's own hf/ export, read from the checkpoint without building a trainer."""
    from safetensors.numpy import load_file

    out = tmp_path / "ppo"
    proc = cli(
        env,
        "train",
        REPO / "configs" / "rlhf" / "tiny.yaml",
        f"output_dir={out}",
        "steps=1",
        "save_every=1",
        "eval_every=0",
        "data.eval_files=[]",
        "rl.algorithm=ppo",
        "rl.prompts_per_step=2",
        "rl.num_generations=2",
        "rl.max_new_tokens=4",
        "tensorboard=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli(env, "convert", "orbax-to-hf", out, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported, own = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert exported.keys() == own.keys() and not any("value" in k for k in exported)
    for key in own:
        np.testing.assert_array_equal(exported[key], own[key])
