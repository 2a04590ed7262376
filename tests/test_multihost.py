"""Two processes on localhost (CPU, gloo collectives): they must agree on every loss and on the parameters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.train_fixtures import arithmetic_files, tiny_policy

pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from cpo_jax.parallel import initialize
pid = int(sys.argv[1])
assert initialize("localhost:{port}", 2, pid)
import jax, jax.numpy as jnp
from cpo_jax.train import TrainConfig, from_dict
from cpo_jax.train.trainer import Trainer
cfg = from_dict(TrainConfig, json.loads({cfg!r}))
trainer = Trainer(cfg)
result = trainer.run()
total = float(sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(trainer.state.params)))
out = {{"losses": [h["loss"] for h in result.history], "param_sum": total, "processes": jax.process_count(),
       "devices": jax.device_count(), "final_step": result.final_step}}
open({out!r} + f"/result_{{pid}}.json", "w").write(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two(tmp_path: Path, child: str, cfg: dict, name: str) -> tuple[dict, dict]:
    """Run ``child`` as processes 0 and 1 (2 CPU devices each) and read their ``{name}_{pid}.json``."""
    script = tmp_path / f"{name}_child.py"
    script.write_text(textwrap.dedent(child.format(port=_free_port(), cfg=json.dumps(cfg), out=str(tmp_path))))
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for pid in (0, 1)
    ]
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err.decode()[-4000:]
    return tuple(json.loads((tmp_path / f"{name}_{pid}.json").read_text()) for pid in (0, 1))


def test_two_processes_agree_on_losses_and_parameters(tmp_path):
    policy = tiny_policy(tmp_path / "policy")
    train, _ = arithmetic_files(tmp_path)
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(policy)},
        "data": {"train_files": [str(train)], "max_length": 128, "pairs_per_batch": 2},
        "loss": {"name": "cpo", "hparams": {"beta": 0.5, "gamma": 0.5}},
        "optim": {"learning_rate": 3e-3},
        "steps": 3,
        "save_every": 3,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": False,
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    }
    a, b = _run_two(tmp_path, CHILD, cfg, "result")
    assert a["processes"] == b["processes"] == 2 and a["devices"] == 4
    assert a["final_step"] == b["final_step"] == 3
    assert a["losses"] == b["losses"] and len(a["losses"]) == 3
    assert a["param_sum"] == b["param_sum"]
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


RL_FAST_CHILD = """
import json, sys
from cpo_jax.parallel import initialize
pid = int(sys.argv[1])
assert initialize("localhost:{port}", 2, pid)
import jax, jax.numpy as jnp
from cpo_jax.train import TrainConfig, from_dict
from cpo_jax.rlhf.trainer import RLTrainer
trainer = RLTrainer(from_dict(TrainConfig, json.loads({cfg!r})))
result = trainer.run()
total = float(sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(trainer.state.params)))
keep = lambda m: {{k: float(v) for k, v in m.items() if not k.startswith(("timing_s/", "perf/", "step_time"))}}
out = {{"history": [keep(h) for h in result.history], "param_sum": total, "final_step": result.final_step}}
open({out!r} + f"/rlfast_{{pid}}.json", "w").write(json.dumps(out))
"""


def test_rlhf_loop_on_two_processes_fast(tmp_path):
    """The fast variant of the test below: one RLOO step of the library loop on two hosts, identical metrics and
    parameters on both, and a checkpoint with both hosts' data states."""
    policy = tiny_policy(tmp_path / "policy")
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(policy)},
        "data": {"train_files": ["bundled:arithmetic-prompts:16"], "max_length": 72, "max_prompt_length": 64},
        "loss": {"objective": "rlhf"},
        "rl": {
            "algorithm": "rloo",
            "reward": "verifier:digits",
            "prompts_per_step": 2,
            "num_generations": 2,
            "max_new_tokens": 8,
        },
        "optim": {"learning_rate": 3e-3, "schedule": "constant"},
        "steps": 1,
        "save_every": 1,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": False,
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    }
    a, b = _run_two(tmp_path, RL_FAST_CHILD, cfg, "rlfast")
    assert a["final_step"] == b["final_step"] == 1
    assert a["history"] == b["history"] and a["param_sum"] == b["param_sum"]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "1" / "data" / "metadata").read_text())
    assert len(saved["hosts"]) == 2 and all("kl_coef" in h for h in saved["hosts"])


RL_CHILD = """
import json, os, sys
pid = int(sys.argv[1])
os.environ.update(CPO_JAX_COORDINATOR="localhost:{port}", CPO_JAX_NUM_PROCESSES="2", CPO_JAX_PROCESS_ID=str(pid))
from cpo_jax.cli import app, load_config
cfg_path = {out!r} + "/rl.yaml"
app(["train", cfg_path], standalone_mode=False)  # `cpo-jax train` on both processes (joins via the environment)
import jax, jax.numpy as jnp
from cpo_jax.parallel import gather_json
from cpo_jax.rlhf.trainer import RLTrainer
trainer = RLTrainer(load_config(cfg_path))
step, extra = trainer.restore_latest()
# One more rollout: every global row must answer the prompt of the record it is scored against.
metrics, host = trainer.rollout_step(step, next(iter(trainer._pipeline(trainer.train_set, train=True))))
aligned = []
for ids, record in zip(host["prompt_ids"], host["records"]):
    text = trainer.tokenizer.decode(ids[ids != trainer.pad_id], skip_special_tokens=True)
    aligned.append(record["prompt"][-1]["content"] in text)
total = float(sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(trainer.state.params)))
keep = lambda m: {{k: float(v) for k, v in m.items() if not k.startswith(("timing_s/", "perf/"))}}
out = {{"step": step, "param_sum": total, "eval": trainer.evaluate(trainer.state.params),
       "rows": len(host["index"]), "indices": sorted({{int(i) for i in host["index"]}}), "aligned": aligned,
       "extra": keep(metrics), "gathered": gather_json({{"pid": pid}}), "restored_kl": extra["kl_coef"],
       "restored_data": extra["data"]}}
open({out!r} + f"/rl_{{pid}}.json", "w").write(json.dumps(out))
"""


@pytest.mark.slow
def test_rlhf_loop_on_two_processes(tmp_path):
    """`cpo-jax train` with RLOO on two hosts: one global rollout of both hosts' prompts, scored row-aligned,
    identical updates, per-host data states in the checkpoint, uneven eval shards, one set of output files."""
    policy = tiny_policy(tmp_path / "policy")
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(policy)},
        "data": {
            "train_files": ["bundled:arithmetic-prompts:64"],
            "eval_files": ["bundled:arithmetic-prompts:5"],
            "max_length": 80,
            "max_prompt_length": 64,
        },
        "loss": {"objective": "rlhf"},
        "rl": {
            "algorithm": "rloo",
            "reward": "verifier:digits",
            "prompts_per_step": 2,
            "num_generations": 2,
            "max_new_tokens": 8,
            "eval_max_new_tokens": 8,
            "kl_coef": 0.01,
        },
        "optim": {"learning_rate": 3e-3, "schedule": "constant"},
        "steps": 2,
        "save_every": 2,
        "eval_every": 2,
        "eval_generation_prompts": "bundled:arithmetic-prompts:3",
        "eval_generation_tokens": 4,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": True,
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    }
    (tmp_path / "rl.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    a, b = _run_two(tmp_path, RL_CHILD, {}, "rl")
    assert a["step"] == b["step"] == 2
    assert a["extra"] == b["extra"] and a["param_sum"] == b["param_sum"]
    # 2 prompts per process x 2 processes x 2 generations; host 0 reads even records, host 1 odd ones.
    assert a["rows"] == 8 and a["indices"] == b["indices"] and {i % 2 for i in a["indices"]} == {0, 1}
    assert all(a["aligned"]) and all(b["aligned"])
    # 5 eval prompts: host 0 holds 3 (two batches), host 1 holds 2 (one batch, padded for the second round).
    assert a["eval"] == b["eval"] and a["eval"]["prompts"] == 5.0
    assert a["gathered"] == b["gathered"] == [{"pid": 0}, {"pid": 1}]
    # The checkpoint keeps each host's own data-iterator state and gives it back to that host.
    saved = json.loads((tmp_path / "run" / "checkpoints" / "2" / "data" / "metadata").read_text())
    assert len(saved["hosts"]) == 2
    assert a["restored_data"] == saved["hosts"][0]["data"] and b["restored_data"] == saved["hosts"][1]["data"]
    assert a["restored_kl"] == b["restored_kl"] == 0.01
    # Process 0 alone wrote the run's files: the step-0 eval line once, two steps, the eval at step 2.
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines].count(0) == 1 and lines[0]["eval/objective/scores"] >= 0
    assert {x["step"] for x in lines} == {0, 1, 2}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_step"] == 2 and summary["after"]["generation/prompts"] == 3.0
    assert (tmp_path / "run" / "hf" / "config.json").is_file()
