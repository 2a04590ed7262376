"""The ``cpo-jax`` command through subprocess on configs/tiny.yaml: train, resume, convert both ways, eval,
generate, audit, and clear errors for bad keys, types, paths and meshes."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from tests.cli_fixtures import cli_env, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cpo_jax_cache"))


def cli(env, *args, check=True):
    return run_cli(env, *args, check=check)


@pytest.fixture(scope="module")
def run_dir(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = cli(env, "train", TINY, f"output_dir={out}", "steps=4", "save_every=2", "eval_every=4")
    assert "trained steps 0 -> 4" in proc.stdout
    assert "diagnostics/frac_in_U" in proc.stdout  # the before/after table
    return out


def test_train_writes_everything(run_dir):
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer_config.json",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval/loss" in records[0]  # the before-training evaluation
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["before"] and summary["after"] and summary["final_step"] == 4


@pytest.fixture(scope="module")
def run_output(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_says") / "run"
    proc = cli(
        env,
        "train",
        TINY,
        f"output_dir={out}",
        "steps=2",
        "save_every=2",
        "eval_every=0",
        "eval_generation_prompts=bundled:arithmetic-eval-prompts:4",
        "eval_generation_tokens=4",
    )
    return out, proc


def test_a_run_says_what_it_does_and_lists_its_outputs(run_output):
    out, proc = run_output
    for stage in ("loading the model from", "evaluating on", "exporting"):
        assert stage in proc.stderr, (stage, proc.stderr)
    assert re.search(r"loading the model from .*: \d+\.\d s", proc.stderr)
    assert f"outputs in {out}:" in proc.stdout
    for line in ("hf/", "checkpoints/", "summary.json", "curves.png", "metrics.jsonl", "config.json"):
        assert re.search(rf"^  {re.escape(line)}\s", proc.stdout, re.M), line
    assert "(steps 2)" in proc.stdout
    # the greedy verdicts per held-out prompt, before and after: the paired change with its interval and test
    assert "of 4 held-out prompts, McNemar p = " in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    change = summary["generation/change"]
    assert change["n"] == 4 and change["ci_low"] <= change["change"] <= change["ci_high"]
    assert len(summary["before"]["generation/correct"]) == 4


def test_exported_files_follow_the_umask(run_output):
    out, _ = run_output
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((out / "hf").stat().st_mode) == 0o777 & ~umask
    for file in (out / "hf").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def test_a_resumed_run_says_so_and_keeps_its_before_column(env, run_output, tmp_path):
    import shutil

    out, _ = run_output
    before = json.loads((out / "summary.json").read_text())["before"]
    assert before
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    generation = ["eval_generation_prompts=bundled:arithmetic-eval-prompts:4", "eval_generation_tokens=4"]
    proc = cli(env, "train", TINY, f"output_dir={resumed}", "steps=3", "save_every=2", "eval_every=0", *generation)
    assert "resuming from step 2 of 3" in proc.stderr
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["before"] == before and summary["start_step"] == 2 and summary["final_step"] == 3
    assert "generation/change" in summary  # the kept per-prompt verdicts pair with the new ones


def test_same_command_resumes_from_the_latest_checkpoint(env, run_dir, tmp_path):
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(run_dir, resumed)
    proc = cli(env, "train", TINY, f"output_dir={resumed}", "steps=6", "save_every=2", "eval_every=0")
    assert "trained steps 4 -> 6" in proc.stdout
    steps = [
        json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_convert_both_ways_and_eval(env, run_dir, tmp_path):
    from safetensors.numpy import load_file

    cli(env, "convert", "orbax-to-hf", run_dir, tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    trained = load_file(run_dir / "hf" / "model.safetensors")
    assert exported.keys() == trained.keys()
    for key in exported:
        np.testing.assert_array_equal(exported[key], trained[key])

    cli(env, "convert", "hf-to-orbax", tmp_path / "hf", tmp_path / "orbax")
    assert (tmp_path / "orbax" / "params").is_dir() and (tmp_path / "orbax" / "config.json").is_file()
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore((tmp_path / "orbax" / "params").absolute())
    embed = np.asarray(
        restored["model"]["embed"]["value"]
        if isinstance(restored["model"]["embed"], dict)
        else restored["model"]["embed"]
    )
    np.testing.assert_array_equal(embed, trained["model.embed_tokens.weight"])

    # The Orbax directory is ready to train from: model.path accepts it.
    import jax.numpy as jnp

    from cpo_jax.hf.pretrained import from_pretrained

    ids = jnp.arange(1, 13)[None] % 250 + 3
    np.testing.assert_array_equal(
        np.asarray(from_pretrained(tmp_path / "orbax")(ids)), np.asarray(from_pretrained(tmp_path / "hf")(ids))
    )
    proc = cli(
        env,
        "train",
        TINY,
        f"model.path={tmp_path / 'orbax'}",
        f"output_dir={tmp_path / 'from_orbax'}",
        "steps=2",
        "eval_every=0",
        "data.eval_files=[]",
    )
    assert "trained steps 0 -> 2" in proc.stdout

    proc = cli(env, "eval", TINY, f"output_dir={run_dir}", "steps=4")
    metrics = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert metrics["step"] == 4 and "rewards/accuracies" in metrics and "diagnostics/frac_in_U" in metrics


def test_generate(env):
    proc = cli(env, "generate", "tiny-random", "--prompt", "What is 1 + 1?", "--prompt", "Hi", "--max-new-tokens", "5")
    lines = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["What is 1 + 1?", "Hi"] and all("completion" in x for x in lines)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lerning_rate=1", "optim.lerning_rate"),
        ("steps=abc", "steps='abc'"),
        ("model.path=/no/such/model", "config key model.path: '/no/such/model'"),
        ("data.train_files=[/no/such.jsonl]", "data.train_files: names '/no/such.jsonl'"),
        ("mesh.tensor=3", "mesh"),
        ("loss.reference=sometimes", "loss.reference='sometimes'"),
    ],
)
def test_config_errors_name_the_key(env, override, message):
    proc = cli(env, "train", TINY, override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_named(env, tmp_path):
    proc = cli(env, "train", tmp_path / "nope.yaml", check=False)
    assert proc.returncode == 2 and "nope.yaml: the config file does not exist" in proc.stderr


def test_audit_writes_report_and_histogram(env, tmp_path):
    proc = cli(
        env,
        "audit",
        "tiny-random",
        "bundled:arithmetic-eval:24",
        "--out",
        tmp_path / "audit",
        "--max-length",
        "128",
        "--max-prompt-length",
        "100",
    )
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["num_pairs"] == 24 and 0.0 <= report["frac_ref_prefers_rejected"] <= 1.0
    assert report["settings"]["max_prompt_length"] == 100
    assert (tmp_path / "audit" / "delta_ref_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert "delta_ref" in proc.stdout
    missing = cli(env, "audit", "tiny-random", tmp_path / "nope.jsonl", check=False)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads(path, tmp_path):
    """Each YAML in configs/ is valid: full configs with their ??? values supplied, mesh files as fragments."""
    from cpo_jax.cli import load_config

    if path.parts[1] == "mesh":  # fragments to merge into a full config: keys and mesh only
        from omegaconf import OmegaConf

        from cpo_jax.parallel import resolve_mesh_shape
        from cpo_jax.train import TrainConfig, from_dict

        fragment = from_dict(TrainConfig, OmegaConf.to_container(OmegaConf.load(REPO / path)))
        assert resolve_mesh_shape(fragment.mesh, 8)
        return
    overrides = []
    text = (REPO / path).read_text()
    if "path: ???" in text:
        overrides.append("model.path=tiny-random")
    if "train_files: ???" in text:
        overrides.append("data.train_files=[bundled:tiny-chat]")
    if "runs/paper_llm/data" in text:  # mined by tools/reproduce_pathology_llm.py before these configs run
        overrides += ["data.train_files=[bundled:arithmetic-train:8]", "data.eval_files=[bundled:arithmetic-eval:8]"]
    cfg = load_config(REPO / path, overrides)
    assert cfg.steps >= 1


def test_missing_mandatory_value_is_named(env):
    proc = cli(env, "train", REPO / "configs" / "llama-3.2-1b" / "cpo.yaml", check=False)
    assert proc.returncode == 2 and "model.path" in proc.stderr and "Traceback" not in proc.stderr
