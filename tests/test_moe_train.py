"""Training a tiny MoE model through the one loop: DPO/CPO with the router's load-balancing loss added with its
coefficient (and logged), SFT, and an RLOO step with and without the router loss."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from cpo_jax.data import byte_chat_tokenizer
from cpo_jax.train import TrainConfig, from_dict
from tests.test_moe import _hf_config
from tests.train_fixtures import arithmetic_files

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe_train")
    torch.manual_seed(0)
    # The byte tokenizer's 260 ids fit the tiny model's vocabulary.
    model = AutoModelForCausalLM.from_config(_hf_config("qwen3_moe", vocab_size=260, max_position_embeddings=256))
    model.save_pretrained(root / "policy")
    byte_chat_tokenizer().save_pretrained(root / "policy")
    train, _ = arithmetic_files(root, train=16, eval=4)
    return {"policy": str(root / "policy"), "train": str(train)}


def _config(assets, out, **overrides) -> TrainConfig:
    base = {
        "output_dir": str(out),
        "model": {"path": assets["policy"]},
        "data": {"train_files": [assets["train"]], "max_length": 128, "pairs_per_batch": 2},
        "optim": {"learning_rate": 1e-2, "schedule": "constant"},
        "steps": 2,
        "save_every": 100,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": False,
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return from_dict(TrainConfig, base)


def _run(cfg):
    from cpo_jax.train.trainer import Trainer

    return Trainer(cfg, devices=jax.devices()[:1]).run().history


def test_cpo_adds_the_router_loss_with_its_coefficient(assets, tmp_path):
    """Step 1: the policy is the reference, so the loss is log 2 + coef * router_aux_loss exactly; without the
    coefficient (the checkpoint's config has no output_router_logits) nothing is added or logged."""
    coef = 0.5
    loss = {"name": "cpo", "hparams": {"beta": 0.1, "gamma": 0.5}}
    with_aux = _run(_config(assets, tmp_path / "aux", model={"router_aux_loss_coef": coef}, loss=loss))
    aux = with_aux[0]["router_aux_loss"]
    assert aux > 0.9  # k * sum_e f_e P_e: about 1 (its minimum) for a near-uniform router at init
    cpo_at_start = _run(_config(assets, tmp_path / "plain", loss=loss))
    assert "router_aux_loss" not in cpo_at_start[0]
    np.testing.assert_allclose(with_aux[0]["loss"], cpo_at_start[0]["loss"] + coef * aux, rtol=1e-6)
    assert all(np.isfinite(h["loss"]) for h in with_aux)


def test_sft_and_rloo_steps_on_a_moe_model(assets, tmp_path):
    from cpo_jax.rlhf.trainer import RLTrainer

    sft = _run(_config(assets, tmp_path / "sft", loss={"objective": "sft"}, model={"router_aux_loss_coef": 0.01}))
    assert np.isfinite(sft[-1]["loss"]) and "router_aux_loss" in sft[-1]
    cfg = _config(
        assets,
        tmp_path / "rl",
        data={"train_files": ["bundled:arithmetic-prompts:16"], "max_length": 80, "max_prompt_length": 64},
        loss={"objective": "rlhf"},
        rl={
            "algorithm": "rloo",
            "reward": "verifier:digits",
            "prompts_per_step": 2,
            "num_generations": 2,
            "max_new_tokens": 8,
        },
    )
    history = RLTrainer(cfg, devices=jax.devices()[:1]).run().history
    assert history[0]["objective/kl"] == 0.0 and all(np.isfinite(h["loss/total"]) for h in history)
    assert "router_aux_loss" not in history[0]
    # TRL's GRPO adds coef * aux_loss to each mini-batch's loss: the same first rollout, the loss moved by exactly that
    coef = 0.5
    aux_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, router_aux_loss_coef=coef), output_dir=str(tmp_path / "rl_aux")
    )
    with_aux = RLTrainer(aux_cfg, devices=jax.devices()[:1]).run().history
    aux = with_aux[0]["router_aux_loss"]
    assert aux > 0.9
    np.testing.assert_allclose(with_aux[0]["loss/policy_avg"], history[0]["loss/policy_avg"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(with_aux[0]["loss/total"], history[0]["loss/total"] + coef * aux, rtol=1e-5, atol=1e-6)
