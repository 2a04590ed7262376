"""optax optimisers by name, learning-rate schedules, weight-decay masks and the non-finite guard."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import optax

from cpo_jax.train.config import OptimConfig

#: Consecutive non-finite steps optax may skip before it would apply them anyway; the trainer stops
#: long before (``TrainConfig.max_nonfinite_steps``), so a NaN update is never applied.
_NEVER = 2**31 - 1


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine or linear decay to ``min_lr_ratio`` of it, or constant."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, floor, decay_steps)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}: expected 'cosine', 'linear' or 'constant'")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


#: The optimisers' own defaults (optax's, the same as torch.optim's and HF's); a key absent here is not a
#: setting of that optimiser.
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "lion": {"b1": 0.9, "b2": 0.99},
    "sgd": {"momentum": 0.0},
    "adafactor": {},
}
_TUNABLE = ("b1", "b2", "eps", "momentum")


def effective_settings(optim: Mapping) -> dict:
    """``optim`` (an ``OptimConfig`` as a dict) with every unset setting replaced by the optimiser's default and
    every setting it does not take set to None: two configs train the same way exactly when these are equal.

    A config written before ``momentum`` existed used ``b1`` as SGD's momentum; that is what it meant."""
    out = dict(optim)
    defaults = OPTIMIZER_DEFAULTS.get(out.get("name", "adamw"), {})
    if out.get("name") == "sgd" and "momentum" not in out:
        out["momentum"] = out.get("b1") or 0.0
    for key in _TUNABLE:
        out[key] = (defaults[key] if out.get(key) is None else out[key]) if key in defaults else None
    out["nesterov"] = bool(out.get("nesterov", False)) if "momentum" in defaults else None
    return out


def decay_mask(params):
    """True for matrices (kernels, embeddings); False for norm scales and biases (1-D)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``apply_if_finite(chain(clip_by_global_norm, <name>))`` with the configured schedule."""
    lr = learning_rate_schedule(cfg, total_steps)
    mask = None if cfg.decay_norms_and_biases else decay_mask
    o = effective_settings(dataclasses.asdict(cfg))
    if cfg.name == "adamw":
        base = optax.adamw(lr, b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adam":
        base = optax.adam(lr, b1=o["b1"], b2=o["b2"], eps=o["eps"])
    elif cfg.name == "lion":
        base = optax.lion(lr, b1=o["b1"], b2=o["b2"], weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "sgd":  # torch.optim.SGD / HF optim="sgd": no momentum unless asked for
        base = optax.sgd(lr, momentum=o["momentum"] or None, nesterov=o["nesterov"])
        if cfg.weight_decay:  # torch's SGD adds weight_decay * param to the gradient (coupled L2)
            base = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask), base)
    elif cfg.name == "adafactor":
        base = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    else:
        raise ValueError(f"optim.name={cfg.name!r}: expected one of adamw, adam, lion, sgd, adafactor")
    chain = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.apply_if_finite(optax.chain(*chain, base), max_consecutive_errors=_NEVER)
