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
from cpo_jax.train import Trainer, TrainConfig, from_dict
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


def test_two_processes_agree_on_losses_and_parameters(tmp_path):
    policy = tiny_policy(tmp_path / "policy")
    train, _ = arithmetic_files(tmp_path)
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"path": str(policy)},
           "data": {"train_files": [str(train)], "max_length": 128, "pairs_per_batch": 2},
           "loss": {"name": "cpo", "hparams": {"beta": 0.5, "gamma": 0.5}},
           "optim": {"learning_rate": 3e-3}, "steps": 3, "save_every": 3, "progress_bar": False,
           "tensorboard": False, "export_hf": False, "mesh": {"data": -1, "fsdp": 1, "tensor": 1}}
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(port=_free_port(), cfg=json.dumps(cfg), out=str(tmp_path))))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, str(script), str(pid)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for pid in (0, 1)]
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err.decode()[-4000:]
    a, b = (json.loads((tmp_path / f"result_{pid}.json").read_text()) for pid in (0, 1))
    assert a["processes"] == b["processes"] == 2 and a["devices"] == 4
    assert a["final_step"] == b["final_step"] == 3
    assert a["losses"] == b["losses"] and len(a["losses"]) == 3
    assert a["param_sum"] == b["param_sum"]
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
