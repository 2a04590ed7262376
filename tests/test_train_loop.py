"""The one training loop: hooks and their cadence, metrics that carry their denominators (exact against a float64
NumPy mean over the examples, whatever the batching), the rl: section only on RL runs, and old checkpoints'
data items."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.errors import ConfigError
from cpo_jax.train import TrainConfig, from_dict, to_dict, weighted
from cpo_jax.train.loop import Hook, TrainLoop, checkpoint_extra
from cpo_jax.train.resume import config_changes
from cpo_jax.train.validate import validate_config
from tests.train_fixtures import arithmetic_files, tiny_policy


# ---------------------------------------------------------------------------------------------------------- weighted
def test_weighted_means_of_uneven_batches_equal_the_float64_mean_over_examples():
    rng = np.random.default_rng(0)
    values = rng.normal(size=23)
    batches = np.split(values, [8, 16, 21])  # 8, 8, 5 and 2 examples: a short last batch
    parts = [weighted.from_means({"x": jnp.float32(b.mean())}, jnp.float32(len(b))) for b in batches]
    combined = weighted.means(weighted.total(parts))
    np.testing.assert_allclose(float(combined["x"]), values.mean(), rtol=1e-6)
    naive = np.mean([b.mean() for b in batches])  # what a mean of batch means would report
    assert abs(naive - values.mean()) > 1e-3


def test_weighted_inside_jit_and_scan_and_with_no_examples():
    def body(acc, x):
        return weighted.add(acc, {"x": weighted.Weighted(jnp.sum(x[0] * x[1]), jnp.sum(x[1]))}), None

    xs = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    masks = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    zero = {"x": weighted.Weighted(jnp.float32(0), jnp.float32(0))}
    acc, _ = jax.jit(lambda: jax.lax.scan(body, zero, (xs, masks)))()
    assert float(weighted.means(acc)["x"]) == 1.5
    assert float(weighted.means(zero)["x"]) == 0.0  # nothing counted: 0, not NaN
    stacked = {"x": weighted.Weighted(jnp.array([2.0, 4.0]), jnp.array([1.0, 1.0]))}
    assert float(weighted.means(weighted.sum_over(stacked))["x"]) == 3.0
    assert weighted.means({"grad_norm": 7.0}) == {"grad_norm": 7.0}  # step-level values pass through


# ---------------------------------------------------------------------------------------------------------- hooks
def test_hook_cadence():
    assert [s for s in range(1, 11) if Hook(print, 4).due(s, 10)] == [4, 8]
    assert [s for s in range(1, 11) if Hook(print, 4, at_end=True).due(s, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if Hook(print, 0).due(s, 10)] == []


def test_checkpoint_extra_reads_the_layout_before_the_one_loop():
    assert checkpoint_extra(None) is None
    assert checkpoint_extra({"data": {"a": 1}, "kl_coef": 0.1}) == {"data": {"a": 1}, "kl_coef": 0.1}
    legacy = {"last_seen_indices": {"0": 5}, "worker_count": 0}  # a bare grain iterator state
    assert checkpoint_extra(legacy) == {"data": legacy}


# ---------------------------------------------------------------------------------------------------------- rl:
def test_rl_section_belongs_to_rl_runs_only():
    assert TrainConfig().rl is None
    rl_run = from_dict(TrainConfig, {"loss": {"objective": "rlhf"}})
    assert rl_run.rl is not None and rl_run.rl.algorithm == "rloo"  # the defaults when the section is left out
    dpo_with_rl = from_dict(
        TrainConfig, {"model": {"path": "m"}, "data": {"train_files": ["x.jsonl"]}, "rl": {"kl_coef": 0.1}}
    )
    message = r"(?s)config key rl: an rl: section is given.*objective=.preference.*remove the rl: section"
    with pytest.raises(ConfigError, match=message):
        validate_config(dpo_with_rl)
    with pytest.raises(TypeError, match=r"config key rl=3"):
        from_dict(TrainConfig, {"rl": 3})


def test_resume_accepts_a_dpo_checkpoint_that_stored_rl_defaults():
    current = TrainConfig()
    legacy = to_dict(current)
    legacy["rl"] = to_dict(from_dict(TrainConfig, {"loss": {"objective": "rlhf"}}))["rl"]
    assert config_changes(legacy, current) == {}
    rl_run = from_dict(TrainConfig, {"loss": {"objective": "rlhf"}, "rl": {"kl_coef": 0.2}})
    saved = to_dict(rl_run)
    saved["rl"]["kl_coef"] = 0.05
    assert config_changes(saved, rl_run) == {"rl.kl_coef": (0.05, 0.2)}


# ---------------------------------------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("loop_assets")
    policy = tiny_policy(root / "policy")
    train, evaluation = arithmetic_files(root, train=32, eval=7)
    return {"policy": str(policy), "train": str(train), "eval": str(evaluation)}


def _config(assets, out, **overrides) -> TrainConfig:
    base = {
        "output_dir": str(out),
        "model": {"path": assets["policy"]},
        "data": {
            "train_files": [assets["train"]],
            "eval_files": [assets["eval"]],
            "max_length": 96,
            "pairs_per_batch": 4,
        },
        "optim": {"learning_rate": 1e-2, "schedule": "constant"},
        "steps": 5,
        "save_every": 100,
        "eval_batches": 100,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": False,
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return from_dict(TrainConfig, base)


def _trainer(cfg):
    from cpo_jax.train.trainer import Trainer

    return Trainer(cfg, devices=jax.devices()[:1])


def test_user_hooks_run_at_their_cadence_after_the_built_in_ones(assets, tmp_path):
    trainer = _trainer(_config(assets, tmp_path / "hooks", log_every=2))
    seen = []
    trainer.add_hook(
        lambda info: seen.append(
            (info.step, len(info.loop.checkpointer.manager.all_steps()), round(float(info.metrics["loss"]), 6))
        ),
        every=2,
        at_end=True,
    )
    result = trainer.run()
    assert [s for s, _, _ in seen] == [2, 4, 5]
    assert [h["step"] for h in result.history] == [2, 4, 5]
    assert [loss for _, _, loss in seen] == [round(h["loss"], 6) for h in result.history]
    assert seen[-1][1] == 1  # the final step was saved before the user's hook ran
    assert isinstance(trainer, TrainLoop)
    with pytest.raises(ValueError, match="every=-1"):
        trainer.add_hook(print, every=-1)


def test_eval_metrics_do_not_depend_on_how_the_eval_set_is_batched(assets, tmp_path):
    """7 eval pairs as 3 + 3 + 1 (a short last batch with empty slots) or in one batch of 8: the same means."""
    one = _trainer(_config(assets, tmp_path / "one", data={"pairs_per_batch": 8}))
    three = _trainer(_config(assets, tmp_path / "three", data={"pairs_per_batch": 3}))
    a, b = one.evaluate(one.state.params), three.evaluate(three.state.params)
    assert set(a) == set(b) and "loss" in a and "pairs" not in a
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(a["loss"], np.log(2.0), rtol=1e-6)  # step 0: the policy is the reference


def test_optimizer_moments_are_sharded_like_their_parameters(assets, tmp_path):
    """Under FSDP each device holds 1/8 of Adam's moments, as of the parameters (the compiler, left alone,
    replicated them: the whole optimiser state on every device)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    from cpo_jax.train.trainer import Trainer

    trainer = Trainer(
        _config(assets, tmp_path / "fsdp", mesh={"data": 1, "fsdp": 8, "tensor": 1}), devices=jax.devices()[:8]
    )
    params = dict(jax.tree_util.tree_leaves_with_path(trainer.state.params))
    moments = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.state.opt_state):
        key = jax.tree_util.keystr(path)
        if ".mu" in key or ".nu" in key:
            param = next(v for p, v in params.items() if key.endswith(jax.tree_util.keystr(p)))
            assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), key
            moments += 1
    assert moments == 2 * len(params)
    kernel = trainer.state.opt_state.inner_state[1][0].mu["model"]["layers"][0]["mlp"]["up"]["kernel"][...]
    assert kernel.addressable_shards[0].data.size == kernel.size // 8
