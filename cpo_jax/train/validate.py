"""Range and consistency checks of a whole :class:`~cpo_jax.train.config.TrainConfig`, before anything loads.

:func:`cpo_jax.train.config.from_dict` checks structure (unknown keys, types); :func:`validate_config` checks that
the values can work: positive step counts and cadences, a positive finite learning rate, ``beta > 0``, loss
hyperparameters the loss accepts, RL batch arithmetic, a mesh whose axes the sharding rules use. Closed sets
(dtypes, remat policies, optimisers, truncation) are ``Literal`` types that ``from_dict`` already enforces, so
they are not checked again here: this module is the one place for ranges and cross-field rules. Every failure is a
:class:`~cpo_jax.errors.ConfigError` that names the dotted config key, its value and what to do. Both trainers
and the command line call it, so a library user gets the same checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from cpo_jax.errors import ConfigError
from cpo_jax.train.config import TrainConfig


def _require(ok: bool, key: str, value, must: str, hint: str | None = None) -> None:
    if not ok:
        raise ConfigError(f"{value!r} {must}", where=f"config key {key}", hint=hint)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(cfg_value, key: str, low: int) -> None:
    _require(isinstance(cfg_value, int) and cfg_value >= low, key, cfg_value, f"must be an integer >= {low}")


#: Per-hyperparameter ranges shared by every loss that takes it: ``name -> (test, requirement)``.
HPARAM_RANGES: dict[str, tuple[Callable[[object], bool], str]] = {
    "beta": (lambda v: _number(v) and v > 0, "must be a finite number > 0 (the KL strength)"),
    "label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "must be a number in [0, 1)"),
    "tau": (lambda v: _number(v) and v > 0, "must be a finite number > 0"),
    "alpha": (lambda v: _number(v) and v > 0, "must be a finite number > 0"),
    "discopop_tau": (lambda v: _number(v) and v > 0, "must be a finite number > 0"),
    "nll_coef": (lambda v: _number(v) and v >= 0, "must be a finite number >= 0"),
    "f_alpha_divergence_coef": (lambda v: _number(v) and 0 < v < 1, "must be a number in (0, 1)"),
    "gamma": (lambda v: _number(v) and v >= 0, "must be a finite number >= 0"),
    "length_normalize": (lambda v: isinstance(v, bool), "must be true or false"),
}
#: CPO holds its target margin above gamma > 0 (the paper's constraint); gamma = 0 is DPO's failure case.
POSITIVE_GAMMA = ("cpo", "cpo_easy")


def _check_loss(cfg: TrainConfig) -> None:
    from cpo_jax import losses
    from cpo_jax.train.objectives import reference_free_losses

    _check_loss_type(cfg)
    name = cfg.loss.name
    try:
        parts = [part for part, _ in losses.components(name)]
    except KeyError as err:
        raise ConfigError(err.args[0], where="config key loss.name") from None
    allowed = losses.hyperparameters(name)
    unknown = sorted(set(cfg.loss.hparams) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{unknown} are not hyperparameters of loss {name!r}",
            where="config key loss.hparams",
            hint=f"loss {name!r} takes {sorted(allowed)}",
        )
    for key, value in cfg.loss.hparams.items():
        if key in HPARAM_RANGES:
            test, must = HPARAM_RANGES[key]
            _require(test(value), f"loss.hparams.{key}", value, must)
    gamma = cfg.loss.hparams.get("gamma", allowed.get("gamma"))
    if set(parts) & set(POSITIVE_GAMMA):
        _require(
            _number(gamma) and gamma > 0,
            "loss.hparams.gamma",
            gamma,
            f"must be > 0 for {name!r}: CPO holds the target margin above gamma > 0",
        )
    _dry_run_loss(name, dict(cfg.loss.hparams))
    if cfg.loss.reference == "none" and not set(parts) <= reference_free_losses():
        raise ConfigError(
            f"loss {name!r} needs reference log-probs",
            where="config key loss.reference='none'",
            hint=f"use loss.reference=separate or precomputed, or a reference-free loss "
            f"{sorted(reference_free_losses())}",
        )


def _check_loss_type(cfg: TrainConfig) -> None:
    """TRL's ``loss_type`` list and ``loss_weights``: known names, one finite weight >= 0 per name."""
    from cpo_jax import losses

    kinds, weights = cfg.loss.type, cfg.loss.weights
    if kinds is None:
        _require(
            weights is None,
            "loss.weights",
            weights,
            "weighs the losses of loss.type, which is not set",
            hint="give loss.type=[...] (TRL's loss_type list), or remove loss.weights",
        )
        return
    _require(len(kinds) > 0, "loss.type", list(kinds), "is empty", hint="list loss names, or set it to null")
    for i, kind in enumerate(kinds):
        try:
            losses.get(kind)
        except KeyError as err:
            raise ConfigError(err.args[0], where=f"config key loss.type[{i}]") from None
    if weights is not None:
        _require(
            len(weights) == len(kinds),
            "loss.weights",
            list(weights),
            f"has {len(weights)} weight(s) for the {len(kinds)} loss(es) of loss.type={list(kinds)}",
            hint="give one weight per loss (TRL's loss_weights), or leave it out for 1.0 each",
        )
        for i, weight in enumerate(weights):
            _require(_number(weight) and weight >= 0, f"loss.weights[{i}]", weight, "must be a finite number >= 0")


#: ``loss.hparams`` each non-preference objective takes (sft and rlhf take none; RL settings live in ``rl:``).
OBJECTIVE_HPARAMS = {"sft": (), "rlhf": (), "reward": ("margin", "center_rewards_coefficient")}


def _check_objective_hparams(cfg: TrainConfig) -> None:
    objective = cfg.loss.objective
    _require(
        cfg.loss.type is None and cfg.loss.weights is None,
        "loss.type",
        None if cfg.loss.type is None else list(cfg.loss.type),
        f"combines pairwise losses, which loss.objective={objective!r} does not train",
        hint="remove loss.type and loss.weights, or use loss.objective=preference (or rl.algorithm=online)",
    )
    allowed = OBJECTIVE_HPARAMS[objective]
    unknown = sorted(set(cfg.loss.hparams) - set(allowed))
    if unknown:
        takes = f"only {list(allowed)}" if allowed else "no loss.hparams"
        if objective == "rlhf":
            takes += " (its settings live in rl:)"
        raise ConfigError(
            f"{unknown} are not settings of loss.objective={objective!r}",
            where="config key loss.hparams",
            hint=f"loss.objective={objective!r} takes {takes}; remove the others from the config file",
        )
    for key in ("margin", "center_rewards_coefficient"):
        value = cfg.loss.hparams.get(key)
        _require(value is None or _number(value), f"loss.hparams.{key}", value, "must be a finite number")


def _dry_run_loss(name: str, hparams: dict) -> None:
    """Call the loss on four made-up pairs: a hyperparameter the loss rejects (wrong type, a value outside what
    it supports) fails here, naming the key, instead of inside the first compiled step."""
    import numpy as np

    from cpo_jax import losses

    pc, pr = np.array([-5.0, -7.0, -3.0, -9.0], np.float32), np.array([-6.0, -4.0, -8.0, -9.5], np.float32)
    rc, rr = pc + 0.5, pr - 0.25
    n = np.array([3.0, 5.0, 2.0, 7.0], np.float32)
    try:
        logps = losses.PairLogps(pc, pr, rc, rr, chosen_lengths=n, rejected_lengths=n + 1)
        out = np.asarray(losses.get(name)(logps, **hparams))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"loss {name!r} rejects {hparams}: {err}", where="config key loss.hparams") from None
    if not np.all(np.isfinite(out)):
        raise ConfigError(
            f"loss {name!r} with {hparams} is not finite on ordinary log-probs",
            where="config key loss.hparams",
            hint="check the hyperparameter values",
        )


def _check_optim(cfg: TrainConfig) -> None:
    o = cfg.optim
    _require(
        _number(o.learning_rate) and o.learning_rate > 0,
        "optim.learning_rate",
        o.learning_rate,
        "must be a finite number > 0",
    )
    _require(
        o.learning_rate < 1000,
        "optim.learning_rate",
        o.learning_rate,
        "is far above any working learning rate (< 1000)",
        hint="fine-tuning uses 1e-7 to 1e-3",
    )
    _require(_number(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    from cpo_jax.train.optim import OPTIMIZER_DEFAULTS

    takes = OPTIMIZER_DEFAULTS[o.name]
    for key in ("b1", "b2", "eps", "momentum"):
        value = getattr(o, key)
        _require(
            value is None or key in takes,
            f"optim.{key}",
            value,
            f"is not a setting of optim.name={o.name!r}",
            hint=f"{o.name} takes {sorted(takes) or 'none of b1, b2, eps, momentum'}; remove optim.{key}"
            + (" (SGD's momentum is optim.momentum)" if o.name == "sgd" and key == "b1" else ""),
        )
        if value is not None and key != "eps":
            _require(_number(value) and 0 <= value < 1, f"optim.{key}", value, "must be in [0, 1)")
    _require(o.eps is None or (_number(o.eps) and o.eps > 0), "optim.eps", o.eps, "must be > 0")
    _require(
        not o.nesterov or (o.name == "sgd" and (o.momentum or 0) > 0),
        "optim.nesterov",
        o.nesterov,
        "needs optim.name=sgd with optim.momentum > 0",
    )
    _at_least(o.warmup_steps, "optim.warmup_steps", 0)
    _require(
        _number(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]"
    )
    _require(
        o.max_grad_norm is None or (_number(o.max_grad_norm) and o.max_grad_norm > 0),
        "optim.max_grad_norm",
        o.max_grad_norm,
        "must be > 0, or null for no clipping",
    )


def _check_model_and_data(cfg: TrainConfig) -> None:
    m, d = cfg.model, cfg.data
    _require(
        bool(m.path),
        "model.path",
        m.path,
        "is empty",
        hint="give an HF checkpoint directory, 'smollm2' or 'tiny-random'",
    )
    _at_least(m.logprob_chunk_size, "model.logprob_chunk_size", 1)
    _require(
        m.router_aux_loss_coef is None or (_number(m.router_aux_loss_coef) and m.router_aux_loss_coef >= 0),
        "model.router_aux_loss_coef",
        m.router_aux_loss_coef,
        "must be a finite number >= 0, or null",
    )
    _require(
        not (cfg.loss.objective == "reward" and m.router_aux_loss_coef),
        "model.router_aux_loss_coef",
        m.router_aux_loss_coef,
        "is not used by the reward objective (TRL's RewardTrainer adds no router loss either)",
        hint="remove it, or set it to null or 0",
    )
    _require(
        bool(d.train_files),
        "data.train_files",
        list(d.train_files),
        "is empty",
        hint="list JSONL/Parquet files, saved datasets or bundled:<name> sources",
    )
    _at_least(d.max_length, "data.max_length", 2)
    if d.max_prompt_length is not None:
        _require(
            isinstance(d.max_prompt_length, int) and 1 <= d.max_prompt_length < d.max_length,
            "data.max_prompt_length",
            d.max_prompt_length,
            f"must be an integer in [1, data.max_length={d.max_length}) to leave room for the completion",
        )
    _at_least(d.pairs_per_batch, "data.pairs_per_batch", 1)
    if d.rows_per_batch is not None:
        _at_least(d.rows_per_batch, "data.rows_per_batch", 1)
    rows = d.rows_per_batch if d.rows_per_batch is not None else d.pairs_per_batch
    _require(
        not d.pack or rows >= 2,
        "data.pack",
        d.pack,
        f"needs at least 2 rows per batch (chosen and rejected), got {rows}",
        hint="raise data.rows_per_batch (default data.pairs_per_batch), or data.pack=false",
    )
    _at_least(d.num_workers, "data.num_workers", 0)


def _check_adapters(cfg: TrainConfig) -> None:
    """LoRA / QLoRA settings and the reference modes that need adapters."""
    m, reference = cfg.model, cfg.loss.reference
    adapters = m.lora is not None or m.adapter_path is not None
    if m.lora is not None:
        lora = m.lora
        _at_least(lora.rank, "model.lora.rank", 1)
        _require(_number(lora.alpha) and lora.alpha > 0, "model.lora.alpha", lora.alpha, "must be a number > 0")
        _require(
            _number(lora.dropout) and 0 <= lora.dropout < 1, "model.lora.dropout", lora.dropout, "must be in [0, 1)"
        )
        _require(
            lora.targets is None or len(lora.targets) > 0,
            "model.lora.targets",
            lora.targets,
            "is empty",
            hint="list HF module names such as [q_proj, v_proj], or null for every projection",
        )
    _require(
        m.quantize == "none" or adapters,
        "model.quantize",
        m.quantize,
        "quantises the frozen base, so it needs adapters to train (QLoRA)",
        hint="add a model.lora section, or set model.quantize=none",
    )
    if cfg.loss.objective != "preference":
        return
    _require(
        reference not in ("base", "adapter") or adapters,
        "loss.reference",
        reference,
        "needs adapters (model.lora or model.adapter_path): without them the base is the policy itself",
        hint="use loss.reference=separate or precomputed for full fine-tuning",
    )
    _require(
        reference != "adapter" or m.adapter_path is not None,
        "loss.reference",
        reference,
        "uses the imported adapter as the reference, and model.adapter_path is not set",
    )
    _require(
        reference != "separate" or not adapters,
        "loss.reference",
        reference,
        "would load a second full copy of the base next to the adapters' frozen base",
        hint="use loss.reference=base: the same reference log-probs with no second copy",
    )


def _check_cadence(cfg: TrainConfig) -> None:
    for key, low in (
        ("steps", 1),
        ("grad_accum", 1),
        ("log_every", 1),
        ("save_every", 1),
        ("eval_every", 0),
        ("eval_batches", 1),
        ("keep_checkpoints", 1),
        ("max_nonfinite_steps", 1),
        ("eval_generation_tokens", 1),
    ):
        _at_least(getattr(cfg, key), key, low)
    _require(
        cfg.epochs is None or (_number(cfg.epochs) and cfg.epochs > 0),
        "epochs",
        cfg.epochs,
        "must be a finite number > 0 (passes over data.train_files), or null to use steps",
    )
    _require(
        cfg.max_update_ratio is None or (_number(cfg.max_update_ratio) and cfg.max_update_ratio > 0),
        "max_update_ratio",
        cfg.max_update_ratio,
        "must be > 0, or null to switch the explosion check off",
    )
    _require(
        cfg.peak_tflops_per_device is None or (_number(cfg.peak_tflops_per_device) and cfg.peak_tflops_per_device > 0),
        "peak_tflops_per_device",
        cfg.peak_tflops_per_device,
        "must be > 0 or null",
    )
    _require(bool(cfg.output_dir), "output_dir", cfg.output_dir, "is empty")
    if cfg.wandb_project:
        import importlib.util

        _require(
            importlib.util.find_spec("wandb") is not None,
            "wandb_project",
            cfg.wandb_project,
            "needs the wandb package, which is not installed",
            hint="pip install 'cpo_jax[wandb]' (or pip install wandb), or unset wandb_project",
        )


def _is_online(cfg: TrainConfig) -> bool:
    return cfg.loss.objective == "rlhf" and cfg.rl is not None and cfg.rl.algorithm == "online"


def _check_online(cfg: TrainConfig) -> None:
    rl = cfg.rl
    _require(
        rl.num_generations == 2,
        "rl.num_generations",
        rl.num_generations,
        "must be 2 for rl.algorithm=online: the two samples of a prompt make its preference pair",
    )
    rows = rl.prompts_per_step * rl.num_generations
    _require(
        rows % rl.num_mini_batches == 0 and (rows // rl.num_mini_batches) % 2 == 0,
        "rl.num_mini_batches",
        rl.num_mini_batches,
        f"must split the {rl.prompts_per_step} pairs per step into whole pairs",
    )
    _require(
        rl.kl_in == "reward",
        "rl.kl_in",
        rl.kl_in,
        "has no effect with rl.algorithm=online: the pair loss's beta regularises towards the reference",
        hint="remove rl.kl_in (objective/kl is still logged)",
    )
    _require(
        rl.adaptive_kl_target is None,
        "rl.adaptive_kl_target",
        rl.adaptive_kl_target,
        "has no effect with rl.algorithm=online (no KL penalty is applied; the loss's beta regularises)",
        hint="remove it",
    )


def _check_rl(cfg: TrainConfig) -> None:
    rl = cfg.rl
    if rl.algorithm == "online":
        _check_online(cfg)
    if rl.algorithm in ("rloo", "grpo"):
        _require(
            rl.num_generations >= 2,
            "rl.num_generations",
            rl.num_generations,
            f"is too small: {rl.algorithm} needs at least 2 samples per prompt",
        )
    for key in (
        "ppo_epochs",
        "max_new_tokens",
        "prompts_per_step",
        "num_generations",
        "num_mini_batches",
        "eval_max_new_tokens",
    ):
        _at_least(getattr(rl, key), f"rl.{key}", 1)
    rows = rl.prompts_per_step * rl.num_generations
    _require(
        rows % rl.num_mini_batches == 0,
        "rl.num_mini_batches",
        rl.num_mini_batches,
        f"must divide the {rows} rollouts per step (rl.prompts_per_step x rl.num_generations)",
    )
    _require(_number(rl.kl_coef) and rl.kl_coef >= 0, "rl.kl_coef", rl.kl_coef, "must be >= 0")
    _require(_number(rl.temperature) and rl.temperature > 0, "rl.temperature", rl.temperature, "must be > 0")
    _require(_number(rl.top_p) and 0 < rl.top_p <= 1, "rl.top_p", rl.top_p, "must be in (0, 1]")
    _at_least(rl.top_k, "rl.top_k", 0)
    _require(_number(rl.clip_eps) and rl.clip_eps > 0, "rl.clip_eps", rl.clip_eps, "must be > 0")
    if rl.adaptive_kl_target is not None:
        _require(
            _number(rl.adaptive_kl_target) and rl.adaptive_kl_target > 0,
            "rl.adaptive_kl_target",
            rl.adaptive_kl_target,
            "must be > 0",
        )
    if rl.reward.startswith("verifier:"):
        from cpo_jax.rlhf.rewards import VERIFIERS

        name = rl.reward.split(":", 1)[1]
        _require(
            name in VERIFIERS,
            "rl.reward",
            rl.reward,
            "names no verifier",
            hint=f"available: {['verifier:' + n for n in VERIFIERS]}, or a reward-model directory",
        )
    prompt = cfg.data.max_prompt_length or cfg.data.max_length - rl.max_new_tokens
    _require(
        prompt >= 1 and prompt + rl.max_new_tokens <= cfg.data.max_length,
        "rl.max_new_tokens",
        rl.max_new_tokens,
        f"plus data.max_prompt_length ({cfg.data.max_prompt_length}) must fit in "
        f"data.max_length ({cfg.data.max_length})",
    )


def _check_mesh(cfg: TrainConfig) -> None:
    """Mesh axes against the logical-axis rules (``mesh_rules`` merged over the defaults); sizes against the
    devices are checked where the devices are known (:func:`cpo_jax.parallel.resolve_mesh_shape`)."""
    from cpo_jax.parallel.sharding import check_mesh_rules

    check_mesh_rules(cfg.mesh, cfg.mesh_rules)


def validate_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first key whose value cannot work (see the module docstring)."""
    _check_model_and_data(cfg)
    _check_adapters(cfg)
    _check_mesh(cfg)
    _check_optim(cfg)
    _check_cadence(cfg)
    if cfg.loss.objective == "preference" or _is_online(cfg):
        _check_loss(cfg)  # online DPO/CPO trains a pairwise loss on sampled pairs
    else:
        _check_objective_hparams(cfg)
    if cfg.loss.objective == "rlhf":
        _check_rl(cfg)
    elif cfg.rl is not None:
        raise ConfigError(
            f"an rl: section is given, but loss.objective={cfg.loss.objective!r} trains offline "
            f"from data files and reads none of it",
            where="config key rl",
            hint="remove the rl: section, or set loss.objective: rlhf for on-policy RL",
        )
