"""The two jitted pieces of an RLHF step after sampling: scoring a rollout and updating on it.

* :func:`score_rollout`: one forward pass each of the policy (log-probs, entropy, values) and the frozen
  reference over prompt + completion, then advantages (:func:`cpo_jax.rlhf.algorithms.advantages_and_returns`).
* :func:`update`: ``ppo_epochs`` shuffled passes of ``num_mini_batches`` optimiser updates over the rollout,
  all inside one ``lax.scan``, with the same clipping / non-finite guard as the preference trainer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from cpo_jax import losses
from cpo_jax.losses.rlhf import masked_mean
from cpo_jax.rlhf.algorithms import advantages_and_returns, online_pairs, policy_objective
from cpo_jax.rlhf.rollout import (
    Rollout,
    completion_entropy,
    completion_hidden,
    completion_logps,
    value_predictions,
)
from cpo_jax.train import weighted
from cpo_jax.train.config import TrainConfig
from cpo_jax.train.objectives import uses_router_loss
from cpo_jax.train.step import TrainState, model_of, nonfinite_counts, update_size


def score_rollout(
    params,
    ref_params,
    prompt_ids,
    prompt_mask,
    tokens,
    mask,
    scores,
    kl_coef,
    frozen=None,
    *,
    cfg: TrainConfig,
    graphdef,
) -> tuple[Rollout, dict]:
    """Old-policy and reference log-probs, values and advantages of sampled completions ``[B, N]``.

    ``frozen``: the frozen base when ``params["model"]`` and ``ref_params["model"]`` hold only adapters."""
    rl, chunk = cfg.rl, cfg.model.logprob_chunk_size
    policy = model_of(graphdef, params["model"], frozen)
    hidden = completion_hidden(policy, prompt_ids, prompt_mask, tokens, mask)
    old_logps = completion_logps(policy, hidden, tokens, temperature=rl.temperature, chunk_size=chunk)
    entropy = completion_entropy(policy, hidden, temperature=rl.temperature, chunk_size=chunk)
    if "value_head" in params:
        values = value_predictions(hidden, params["value_head"])
    else:
        values = jnp.zeros(tokens.shape, jnp.float32)
    reference = model_of(graphdef, ref_params["model"], frozen)
    ref_hidden = completion_hidden(reference, prompt_ids, prompt_mask, tokens, mask)
    ref_logps = completion_logps(reference, ref_hidden, tokens, temperature=rl.temperature, chunk_size=chunk)
    old_logps, ref_logps, values = (jax.lax.stop_gradient(x) for x in (old_logps, ref_logps, values))
    maskf = mask.astype(jnp.float32)
    advantages, returns, metrics = advantages_and_returns(rl, scores, old_logps, ref_logps, values, maskf, kl_coef)
    lengths = jnp.sum(maskf, axis=-1)
    metrics.update(
        {
            "policy/entropy_avg": masked_mean(entropy, maskf),
            "response_length/mean": jnp.mean(lengths),
            "response_length/max": jnp.max(lengths),
            "response_length/min": jnp.min(lengths),
        }
    )
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        tokens=tokens,
        mask=mask,
        old_logps=old_logps,
        ref_logps=ref_logps,
        values=values,
        scores=scores,
        advantages=advantages,
        returns=returns,
    )
    return rollout, metrics


def online_objective(cfg: TrainConfig, logps: jax.Array, mb: Rollout) -> tuple[jax.Array, dict]:
    """Online DPO/CPO on one mini-batch: ``cfg.loss.name`` on :func:`online_pairs` of the mini-batch's completions,
    averaged over the ranked pairs (0 when none is), with TRL's reward metrics and the paper's diagnostics."""
    pairs = online_pairs(mb.scores, logps, mb.ref_logps, mb.mask, ties=cfg.rl.online_ties)
    hparams = dict(cfg.loss.hparams)
    per_pair = losses.get(cfg.loss.name)(pairs, **hparams)
    ranked = pairs.real()
    loss = jnp.sum(jnp.where(ranked, per_pair, 0.0)) / jnp.maximum(jnp.sum(ranked), 1)
    metrics = losses.preference_metrics(pairs, beta=hparams.get("beta", 0.1), gamma=hparams.get("gamma"))
    metrics.update({"loss/total": loss, "loss/policy_avg": loss, "online/ranked_pairs": jnp.mean(ranked)})
    return loss, metrics


def _minibatches(rollout: Rollout, key: jax.Array, epochs: int, num_mini_batches: int, group: int = 1) -> Rollout:
    """``[B, ...]`` -> ``[epochs * M, B / M, ...]``, rows shuffled afresh for each epoch; with ``group`` > 1, whole
    groups of ``group`` consecutive rows (an online pair's two completions) move together."""
    b = rollout.tokens.shape[0]
    size = b // num_mini_batches

    def one_epoch(k):
        perm = jax.random.permutation(k, b // group)
        perm = (perm[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)
        return jax.tree.map(lambda x: x[perm].reshape((num_mini_batches, size) + x.shape[1:]), rollout)

    per_epoch = [one_epoch(k) for k in jax.random.split(key, epochs)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *per_epoch)


def update(
    state: TrainState,
    rollout: Rollout,
    kl_coef,
    frozen=None,
    *,
    cfg: TrainConfig,
    graphdef,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
) -> tuple[TrainState, dict]:
    """``ppo_epochs x num_mini_batches`` optimiser updates on ``rollout``; metrics are means over them.

    Adapters' dropout stays off, as in TRL's RL trainers (``disable_dropout``): the probability ratios compare the
    policy with itself."""
    rl, chunk = cfg.rl, cfg.model.logprob_chunk_size
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    online = rl.algorithm == "online"
    batches = _minibatches(rollout, key, rl.ppo_epochs, rl.num_mini_batches, group=2 if online else 1)

    def loss_fn(params, mb: Rollout):
        model = model_of(graphdef, params["model"], frozen)
        router = uses_router_loss(model)
        out = completion_hidden(model, mb.prompt_ids, mb.prompt_mask, mb.tokens, mb.mask, return_aux=router)
        hidden, aux = out if router else (out, None)
        logps = completion_logps(model, hidden, mb.tokens, temperature=rl.temperature, chunk_size=chunk)
        values = value_predictions(hidden, params["value_head"]) if "value_head" in params else None
        if online:
            loss, metrics = online_objective(cfg, logps, mb)
        else:
            loss, metrics = policy_objective(
                rl,
                logps,
                mb.old_logps,
                mb.ref_logps,
                mb.advantages,
                mb.mask,
                kl_coef,
                values=values,
                old_values=mb.values,
                returns=mb.returns,
            )
        if router:  # TRL's GRPO: loss + router_aux_loss_coef * aux_loss, per mini-batch
            loss = loss + model.router_aux_loss_coef * aux["router_aux_loss"]
            metrics = {**metrics, "router_aux_loss": aux["router_aux_loss"], "loss/total": loss}
        return loss, metrics

    def body(carry, mb):
        params, opt_state, step = carry
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {
            **metrics,
            "grad_norm": grad_norm,
            "learning_rate": schedule(step),
            "finite": finite.astype(jnp.float32),
            **update_size(params, updates),
        }
        params = optax.apply_updates(params, updates)
        return (params, opt_state, step + 1), metrics

    (params, opt_state, step), metrics = jax.lax.scan(body, (state.params, state.opt_state, state.step), batches)
    largest_update = jnp.max(metrics["update_ratio"])  # the explosion check looks at the worst mini-batch
    # Mini-batches hold equal numbers of rollouts: each metric is the mean of the mini-batches' values (TRL, verl).
    metrics = weighted.means(
        weighted.sum_over(weighted.from_means(metrics, jnp.ones(rl.ppo_epochs * rl.num_mini_batches)))
    )
    metrics["update_ratio"] = largest_update
    consecutive, total = nonfinite_counts(opt_state)
    metrics.update({"nonfinite/consecutive": consecutive, "nonfinite/total": total})
    return TrainState(step=step, params=params, opt_state=opt_state, rng=state.rng), metrics


def jit_score(cfg: TrainConfig, graphdef):
    """``jax.jit`` of :func:`score_rollout` for this config and model."""
    return jax.jit(functools.partial(score_rollout, cfg=cfg, graphdef=graphdef))


def jit_update(cfg: TrainConfig, graphdef, optimizer, schedule, state_shardings):
    """``jax.jit`` of :func:`update`, the state donated and kept in its shardings."""
    fn = functools.partial(update, cfg=cfg, graphdef=graphdef, optimizer=optimizer, schedule=schedule)
    return jax.jit(fn, out_shardings=(state_shardings, None), donate_argnums=(0,))
