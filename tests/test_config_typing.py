"""A config that cannot be wrong: closed sets are ``Literal`` types, ``X | None`` fields check ``X``, bools and
ints are strict, every mesh axis is one a sharding rule uses, ``mesh_rules`` changes where arrays live, and a
dimension that a mesh axis does not divide is replicated with a warning naming it."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import typing
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpo_jax.cli import main
from cpo_jax.errors import ConfigError
from cpo_jax.parallel import sharding
from cpo_jax.parallel.multihost import host_to_global
from cpo_jax.train.config import TrainConfig, from_dict, to_dict
from cpo_jax.train.validate import validate_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
BASE = {"model": {"path": "tiny-random"}, "data": {"train_files": ["bundled:tiny-chat"]}}


def _fields(cls, prefix: str = ""):
    """``(dotted key, annotation)`` of every leaf field of a config dataclass."""
    for name, annotation in typing.get_type_hints(cls).items():
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):  # an optional section (rl:)
            annotation = options[0]
        if dataclasses.is_dataclass(annotation):
            yield from _fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation


def _nested(key: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def _literal(annotation):
    """``annotation``'s Literal, also inside ``Literal[...] | None``; None otherwise."""
    if typing.get_origin(annotation) is typing.Literal:
        return annotation
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    return options[0] if len(options) == 1 and typing.get_origin(options[0]) is typing.Literal else None


LITERALS = [(key, typing.get_args(_literal(a))) for key, a in _fields(TrainConfig) if _literal(a) is not None]


def test_closed_sets_are_literals():
    keys = {key for key, _ in LITERALS}
    assert {
        "model.dtype",
        "model.param_dtype",
        "model.remat",
        "model.attention_impl",
        "data.truncation",
        "optim.name",
        "optim.schedule",
        "loss.objective",
        "loss.reference",
        "rl.algorithm",
    } <= keys


@pytest.mark.parametrize("key,allowed", LITERALS, ids=[k for k, _ in LITERALS])
def test_every_literal_rejects_a_bad_value_naming_key_and_choices(key, allowed):
    with pytest.raises(ValueError) as err:
        from_dict(TrainConfig, _nested(key, "nope"))
    assert f"config key {key}='nope'" in str(err.value) and str(list(allowed)) in str(err.value)
    with pytest.raises((TypeError, ValueError), match=f"config key {key}"):
        from_dict(TrainConfig, _nested(key, True))  # not a string at all
    for value in allowed:
        assert from_dict(TrainConfig, _nested(key, value))


def test_literals_match_what_they_name():
    from cpo_jax.data.tokenize import TRUNCATIONS
    from cpo_jax.models.transformer import _REMAT_POLICIES
    from cpo_jax.train.config import Dtype, OptimizerName, Remat, Truncation
    from cpo_jax.train.optim import OPTIMIZER_DEFAULTS

    assert set(typing.get_args(Remat)) == {"none", *_REMAT_POLICIES}
    assert set(typing.get_args(OptimizerName)) == set(OPTIMIZER_DEFAULTS)
    assert set(typing.get_args(Truncation)) == set(TRUNCATIONS)
    for name in typing.get_args(Dtype):
        assert np.dtype(jax.numpy.dtype(name)).itemsize in (2, 4)


BAD_TYPES = [
    ("data.max_prompt_length", "abc"),
    ("data.max_prompt_length", 2.5),
    ("data.max_prompt_length", True),
    ("optim.max_grad_norm", "big"),
    ("optim.max_grad_norm", True),
    ("data.rows_per_batch", 2.5),
    ("data.split", 3),
    ("optim.b1", "0.9"),
    ("rl.adaptive_kl_target", "x"),
    ("rl.clip_eps_high", [1]),
    ("max_update_ratio", False),
    ("peak_tflops_per_device", "lots"),
    ("wandb_project", 3),
    ("eval_generation_prompts", 1),
    ("steps", True),
    ("steps", 1.5),
    ("steps", 2.0),
    ("steps", "10"),
    ("data.pack", 1),
    ("data.pack", "yes"),
    ("model.scan_layers", 0),
    ("optim.learning_rate", "1e-3"),
    ("data.train_files", "a.jsonl"),
    ("data.train_files", [1]),
    ("data.eval_files", [None]),
    ("model.path", None),
    ("mesh", {"data": "2"}),
    ("mesh", {"data": 2.0}),
    ("mesh", None),
    ("mesh_rules", {"embed": 3}),
    ("mesh_rules", {"embed": ["fsdp", 1]}),
    ("loss.hparams", [1]),
    ("model", "tiny-random"),
    ("rl.top_k", 1.0),
]


@pytest.mark.parametrize("key,value", BAD_TYPES, ids=[f"{k}={v!r}" for k, v in BAD_TYPES])
def test_wrong_types_are_rejected_naming_the_key(key, value):
    with pytest.raises((TypeError, ValueError)) as err:
        from_dict(TrainConfig, _nested(key, value))
    assert f"config key {key}" in str(err.value), err.value


def test_right_types_are_accepted_and_normalised():
    cfg = from_dict(
        TrainConfig,
        {
            "optim": {"learning_rate": 1, "max_grad_norm": None, "b1": 0},
            "data": {"max_prompt_length": None, "rows_per_batch": 4, "train_files": ["a"]},
            "mesh_rules": {"embed": None, "mlp": ["fsdp", "tensor"], "vocab": "tensor"},
        },
    )
    assert type(cfg.optim.learning_rate) is float and type(cfg.optim.b1) is float
    assert cfg.optim.max_grad_norm is None and cfg.data.rows_per_batch == 4 and cfg.data.train_files == ("a",)
    assert cfg.mesh_rules == {"embed": None, "mlp": ("fsdp", "tensor"), "vocab": "tensor"}
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg  # config.json round trip


def test_config_module_stays_light():
    code = "import sys, cpo_jax.train.config; assert not {'jax', 'flax', 'orbax', 'grain'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def run_main(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.max_prompt_length=abc", "config key data.max_prompt_length"),
        ("optim.max_grad_norm=big", "config key optim.max_grad_norm"),
        ("data.rows_per_batch=2.5", "config key data.rows_per_batch"),
        ("data.pack=1", "config key data.pack"),
        ("model.attention_impl=flash", "config key model.attention_impl"),
        ("model.param_dtype=fp8", "config key model.param_dtype"),
        ("mesh.data=two", "config key mesh.data"),
        ("mesh.dta=-1", "config key mesh.dta"),
        ("mesh_rules.embd=fsdp", "config key mesh_rules"),
        ("mesh_rules.embed=fdsp", "config key mesh_rules.embed"),
    ],
)
def test_the_command_line_reports_them_in_a_few_lines(capsys, tmp_path, override, needle):
    code, err = run_main(capsys, "train", TINY, f"output_dir={tmp_path}", override)
    assert code == 2 and "Traceback" not in err and err.startswith("error: "), err
    assert needle in err and len(err.strip().splitlines()) <= 8, err
    assert not (tmp_path / "checkpoints").exists()


def _validated(**extra):
    validate_config(from_dict(TrainConfig, {**BASE, **extra}))


def test_a_mesh_axis_no_rule_uses_is_an_error():
    with pytest.raises(ConfigError) as err:
        _validated(mesh={"dta": -1})
    assert err.value.where == "config key mesh.dta" and "'dta'" in str(err.value)
    assert "['data', 'expert', 'fsdp', 'tensor']" in str(err.value)  # the known axes
    _validated(mesh={"dta": -1}, mesh_rules={"batch": "dta"})  # a rule that uses it makes it fine
    _validated(
        mesh={"data": -1, "fsdp": 1, "tensor": 1}, mesh_rules={k: None for k in ("vocab", "mlp", "heads", "kv_heads")}
    )
    with pytest.raises(ConfigError, match="config key mesh.tensor"):  # unused and > 1: it would only replicate
        _validated(mesh={"data": -1, "tensor": 2}, mesh_rules={k: None for k in ("vocab", "mlp", "heads", "kv_heads")})


@pytest.mark.parametrize(
    "rules,where",
    [
        ({"embd": "fsdp"}, "config key mesh_rules"),
        ({"embed": "fdsp"}, "config key mesh_rules.embed"),
        ({"embed": ["fsdp", "fsdp"]}, "config key mesh_rules.embed"),
    ],
)
def test_bad_mesh_rules_are_errors(rules, where):
    with pytest.raises(ConfigError) as err:
        _validated(mesh_rules=rules)
    assert err.value.where == where


def test_mesh_rules_change_is_harmless_on_resume():
    from cpo_jax.train.resume import config_changes, is_harmless

    old = to_dict(TrainConfig())
    del old["mesh_rules"]  # a run saved before the key existed
    assert config_changes(old, TrainConfig()) == {}
    changes = config_changes(old, from_dict(TrainConfig, {"mesh_rules": {"embed": None}}))
    assert list(changes) == ["mesh_rules.embed"] and all(is_harmless(k) for k in changes)


@pytest.fixture
def mesh8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    return sharding.make_mesh({"fsdp": 4, "tensor": 2}, jax.devices()[:8])


def test_a_dimension_that_does_not_divide_is_replicated_with_one_warning(mesh8, caplog, monkeypatch):
    monkeypatch.setattr(sharding, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="cpo_jax.parallel.sharding"):
        assert sharding.logical_spec(("vocab", "embed"), (33, 16), mesh8) == P(None, "fsdp")
        assert sharding.logical_spec(("vocab", "embed"), (33, 16), mesh8) == P(None, "fsdp")
        batch = host_to_global(np.zeros((6, 4), np.int32), mesh8)  # 6 rows over fsdp=4
    assert batch.sharding.spec == P(None, None)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # once per (logical axis, dimension, mesh axes)
    assert "'vocab' of size 33" in warnings[0] and "tensor" in warnings[0]
    assert "'batch' of size 6" in warnings[1] and "fsdp" in warnings[1]


def test_mesh_rules_from_the_config_change_parameter_and_batch_sharding(mesh8, tmp_path):
    pytest.importorskip("torch")
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.train.loop import model_load_kwargs
    from tests.train_fixtures import tiny_policy

    path = tiny_policy(tmp_path / "policy", layers=1)
    default = from_pretrained(
        path, **model_load_kwargs(from_dict(TrainConfig, {"mesh": {"fsdp": 4, "tensor": 2}}), mesh8)
    )
    assert default.embed[...].sharding.spec == P("tensor", "fsdp")
    assert default.layers[0].mlp.gate.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert host_to_global(np.zeros((8, 4), np.int32), mesh8).sharding.spec == P("fsdp", None)

    cfg = from_dict(
        TrainConfig,
        {"mesh": {"fsdp": 4, "tensor": 2}, "mesh_rules": {"embed": None, "mlp": ["tensor", "fsdp"], "batch": "tensor"}},
    )
    validate_config(
        dataclasses.replace(
            cfg, model=from_dict(type(cfg.model), {"path": "x"}), data=from_dict(type(cfg.data), {"train_files": ["x"]})
        )
    )
    custom = from_pretrained(path, **model_load_kwargs(cfg, mesh8))
    assert custom.embed[...].sharding.spec == P("tensor", None)
    assert custom.layers[0].mlp.gate.kernel[...].sharding.spec == P(None, ("tensor", "fsdp"))
    rules = sharding.merge_rules(cfg.mesh_rules)  # what the trainers pass to the batch helpers
    assert host_to_global(np.zeros((8, 4), np.int32), mesh8, rules=rules).sharding.spec == P("tensor", None)
    np.testing.assert_array_equal(np.asarray(custom.embed[...]), np.asarray(default.embed[...]))


def test_router_loss_on_a_reward_run_is_refused():
    """TRL's RewardTrainer adds no load-balancing loss; a coefficient there would be silently ignored."""
    with pytest.raises(ConfigError) as err:
        _validated(model={**BASE.get("model", {}), "router_aux_loss_coef": 0.01}, loss={"objective": "reward"})
    assert err.value.where == "config key model.router_aux_loss_coef" and "reward" in str(err.value)
    _validated(model={**BASE.get("model", {}), "router_aux_loss_coef": 0.01})  # preference: used
