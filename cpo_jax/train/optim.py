"""optax optimisers by name, learning-rate schedules, weight-decay masks and the non-finite guard."""

from __future__ import annotations

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


def decay_mask(params):
    """True for matrices (kernels, embeddings); False for norm scales and biases (1-D)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``apply_if_finite(chain(clip_by_global_norm, <name>))`` with the configured schedule."""
    lr = learning_rate_schedule(cfg, total_steps)
    mask = None if cfg.decay_norms_and_biases else decay_mask
    if cfg.name == "adamw":
        base = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adam":
        base = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "lion":
        base = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "sgd":
        base = optax.sgd(lr, momentum=cfg.b1 or None)
    elif cfg.name == "adafactor":
        base = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    else:
        raise ValueError(f"optim.name={cfg.name!r}: expected one of adamw, adam, lion, sgd, adafactor")
    chain = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.apply_if_finite(optax.chain(*chain, base), max_consecutive_errors=_NEVER)
