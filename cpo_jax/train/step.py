"""The train state and the pure, jitted train/eval steps.

One step takes a batch with a leading micro-batch axis ``[M, ...]`` (gradient accumulation), runs the
policy (and, for ``reference="separate"``, the frozen reference) on every micro-batch inside one
``lax.scan``, sums gradients of ``sum(per-example loss) / (real examples in the whole step)`` so that
accumulation equals one big batch, clips, and applies the optax update. A non-finite loss or gradient
turns the whole update into NaN, which ``optax.apply_if_finite`` skips and counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from cpo_jax.losses import PairLogps
from cpo_jax.train import weighted
from cpo_jax.train.config import TrainConfig
from cpo_jax.train.objectives import (
    pair_logps,
    preference_objective,
    reward_objective,
    sft_objective,
    token_logps_from_batch,
)

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to continue bit for bit (besides the data-iterator state).

    Attributes:
      step: int32 scalar, updates applied so far (skipped non-finite steps included).
      params: ``{"model": nnx.State}`` (+ ``"head": [D]`` for a reward model).
      opt_state: the optax state (with ``apply_if_finite``'s counters).
      rng: ``[2]`` uint32 key data.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state (call under ``jax.jit`` with out_shardings to place the optimiser state)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def state_shardings(
    params_shardings, optimizer: optax.GradientTransformation, abstract_state: TrainState, replicated
) -> TrainState:
    """Shardings of a train state: every optimiser leaf that mirrors a parameter (Adam's moments, momentum) takes
    that parameter's sharding, everything else (counters, the step, the RNG) is ``replicated``.

    Without this, ``jax.jit(init_state)`` lets the compiler choose, and it replicates the moments: under FSDP each
    device would hold the whole optimiser state (2x the model in fp32 for Adam)."""
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        params_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(step=replicated, params=params_shardings, opt_state=opt, rng=replicated)


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
    """``(consecutive, total)`` skipped non-finite steps from ``apply_if_finite``'s state."""
    return opt_state.notfinite_count, opt_state.total_notfinite


def update_size(params, updates) -> dict[str, jax.Array]:
    """``param_norm`` (before the update) and ``update_ratio = ||updates|| / ||params||``: an update as large as
    the parameters themselves is an explosion even when nothing is NaN (checked against ``max_update_ratio``).

    Two reductions over the parameters: ``2P`` FLOPs and one read of ``P`` values each, negligible next to a
    forward and backward pass."""
    param_norm = optax.tree.norm(params)
    return {
        "param_norm": param_norm,
        "update_ratio": optax.tree.norm(updates) / jnp.maximum(param_norm, jnp.finfo(jnp.float32).tiny),
    }


def model_of(graphdef, model_state, frozen=None):
    """The NNX model of ``model_state`` (the trained variables) and, with adapters, the ``frozen`` base."""
    return nnx.merge(graphdef, model_state) if frozen is None else nnx.merge(graphdef, model_state, frozen)


def starts_at_reference(cfg: TrainConfig) -> bool:
    """Whether the untrained policy *is* the reference: both load ``model.path`` (``separate``), or adapters whose
    reference is their own start (fresh adapters with ``base``: ``B = 0``; ``adapter``: the imported ones)."""
    return not (cfg.loss.reference == "base" and cfg.model.adapter_path is not None)


def _reference_logps(cfg: TrainConfig, graphdef, ref_params, mb: Batch, params, frozen) -> PairLogps | None:
    mode = cfg.loss.reference
    if mode == "none" or cfg.loss.objective != "preference":
        return None
    if mode == "precomputed":
        return PairLogps(mb["ref_chosen"], mb["ref_rejected"])
    if mode == "base":  # the adapters off: B = 0 adds exactly 0 to every adapted projection
        from cpo_jax.models.lora import zero_adapters

        ref_model = model_of(graphdef, zero_adapters(params["model"]), frozen)
    else:  # separate: a full second model; adapter: the imported adapters, frozen, on the shared base
        ref_model = model_of(graphdef, ref_params["model"], frozen)
    ref = pair_logps(token_logps_from_batch(ref_model, mb, chunk_size=cfg.model.logprob_chunk_size), mb)
    return jax.tree.map(jax.lax.stop_gradient, ref)


def objective_sum(
    cfg: TrainConfig,
    graphdef,
    params,
    mb: Batch,
    reference,
    reference_is_policy: jax.Array | bool = False,
    frozen=None,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Sum over real examples of the configured objective, and its metrics, each a
    :class:`~cpo_jax.train.weighted.Weighted` over the real pairs of ``mb``.

    ``reference_is_policy``: see :func:`cpo_jax.train.objectives.preference_objective`. ``frozen``: the frozen
    base weights when only adapters train (``params["model"]`` holds the adapters). ``dropout_key``: train mode
    (the adapters' dropout on, its streams seeded from this key); None: every dropout off (evaluation)."""
    if dropout_key is not None:
        # Fresh variables at this trace level (the dropout streams are mutated while the model runs); the arrays
        # are the same, nothing is copied.
        frozen = jax.tree.map(lambda x: x, frozen)
    model = model_of(graphdef, params["model"], frozen)
    if dropout_key is not None:
        model.train()
        nnx.reseed(model, dropout=dropout_key, policy="match_shape")
    chunk = cfg.model.logprob_chunk_size
    if cfg.loss.objective == "preference":
        loss_sum, means = preference_objective(
            model,
            mb,
            reference,
            loss_name=cfg.loss.name,
            hparams=dict(cfg.loss.hparams),
            chunk_size=chunk,
            reference_is_policy=reference_is_policy,
        )
    elif cfg.loss.objective == "sft":
        loss_sum, means = sft_objective(model, mb, chunk_size=chunk)
    elif cfg.loss.objective == "reward":
        loss_sum, means = reward_objective(model, params["head"], mb, **dict(cfg.loss.hparams))
    else:
        raise ValueError(f"loss.objective={cfg.loss.objective!r}: expected 'preference', 'sft' or 'reward'")
    return loss_sum, weighted.from_means(means, real_pairs(mb))


def real_pairs(mb: Batch) -> jax.Array:
    """Real (non-empty) pair slots of a micro-batch, float32."""
    return jnp.sum(mb["pair_mask"]).astype(jnp.float32)


def _micro_batches(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "index"}


def train_step(
    state: TrainState,
    batch: Batch,
    ref_params,
    frozen=None,
    *,
    cfg: TrainConfig,
    graphdef,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
) -> tuple[TrainState, dict]:
    """One optimiser update from ``batch`` (leading axis: micro-batches). Returns ``(state, metrics)``.

    ``frozen``: the frozen base weights when ``state.params["model"]`` holds only adapters (None otherwise)."""
    batch = _micro_batches(batch)
    total = jnp.maximum(jnp.sum(batch["pair_mask"]), 1).astype(jnp.float32)
    initial = (state.step == 0) & starts_at_reference(cfg)
    dropout = cfg.model.lora is not None and cfg.model.lora.dropout > 0
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def micro_loss(params, mb, index):
        reference = _reference_logps(cfg, graphdef, ref_params, mb, params, frozen)
        # Before the first update the policy's weights are the reference's (both load model.path).
        loss_sum, metrics = objective_sum(
            cfg,
            graphdef,
            params,
            mb,
            reference,
            reference_is_policy=initial,
            frozen=frozen,
            dropout_key=jax.random.fold_in(step_key, index) if dropout else None,
        )
        return loss_sum / total, metrics

    def body(carry, xs):
        grads_acc, loss_acc, metrics_acc = carry
        (loss, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(state.params, *xs)
        return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss, weighted.add(metrics_acc, metrics)), None

    first = jax.tree.map(lambda x: x[0], batch)
    metric_shapes = jax.eval_shape(lambda p: micro_loss(p, first, 0)[1], state.params)
    zeros = (
        jax.tree.map(jnp.zeros_like, state.params),
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
    )
    micro = batch["pair_mask"].shape[0]
    (grads, loss, metrics), _ = jax.lax.scan(body, zeros, (batch, jnp.arange(micro)))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    consecutive, total_skipped = nonfinite_counts(opt_state)
    metrics = {
        **weighted.means(metrics),
        "loss": loss,
        "grad_norm": grad_norm,
        **update_size(state.params, updates),
        "learning_rate": schedule(state.step),
        "finite": finite,
        "nonfinite/consecutive": consecutive,
        "nonfinite/total": total_skipped,
        "tokens": jnp.sum(batch["segment_ids"] > 0),
        "pairs": jnp.sum(batch["pair_mask"]),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics


def eval_step(
    params, batch: Batch, ref_params, reference_is_policy=False, frozen=None, *, cfg: TrainConfig, graphdef
) -> dict:
    """Loss and metrics of one batch without gradients (for periodic evaluation), each a
    :class:`~cpo_jax.train.weighted.Weighted` over its real pairs, to be added over batches.

    ``reference_is_policy``: ``params`` are the initial weights (the reference's); see :func:`objective_sum`."""
    batch = _micro_batches(batch)
    reference = _reference_logps(cfg, graphdef, ref_params, batch, params, frozen)
    loss_sum, metrics = objective_sum(cfg, graphdef, params, batch, reference, reference_is_policy, frozen)
    return {**metrics, "loss": weighted.Weighted(loss_sum, real_pairs(batch))}


def jit_train_step(
    cfg: TrainConfig,
    graphdef,
    optimizer,
    schedule,
    state_shardings,
    batch_shardings,
    ref_shardings,
    frozen_shardings=None,
):
    """``jax.jit`` of :func:`train_step` with explicit in/out shardings and the state donated."""
    fn = functools.partial(train_step, cfg=cfg, graphdef=graphdef, optimizer=optimizer, schedule=schedule)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_shardings, ref_shardings, frozen_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
