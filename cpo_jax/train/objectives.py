"""What a train step optimises, as pure functions of (model, batch): preference, SFT and reward-model
objectives over the batch layout of :mod:`cpo_jax.data.batching`.

Chosen and rejected sequences are rows (or packed segments) of one batch, so they share one forward
pass. Log-probs come from the final hidden states through the chunked, memory-lean
:func:`cpo_jax.ops.chunked_token_logps` (no ``[R, L, V]`` logits), in float32.

Each objective returns ``(sum of per-example losses over real examples, metrics)``; the step divides by
the number of real examples in the whole (accumulated) batch, so gradient accumulation over
micro-batches equals one large batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cpo_jax import losses
from cpo_jax.losses import PairLogps, reference_free
from cpo_jax.ops.logprobs import chunked_token_logps

Batch = dict[str, jax.Array]


def reference_free_losses() -> frozenset[str]:
    """Registered losses that take no reference log-probs (SimPO, ORPO, contrastive, SFT)."""
    return frozenset(n for n in losses.names() if losses.get(n).__module__ == reference_free.__name__)


def hidden_from_batch(model, batch: Batch, *, return_aux: bool = False):
    """Final hidden states ``[R, L, D]`` of a batch, packed segments and positions honoured; with ``return_aux``,
    ``(hidden, aux)`` where ``aux["router_aux_loss"]`` is an MoE model's load-balancing loss (0 for dense ones)."""
    segments = batch["segment_ids"]
    extra = {"return_aux": True} if return_aux else {}  # a model without routers need not take the keyword
    return model.hidden_states(
        batch["input_ids"], attention_mask=segments > 0, positions=batch["positions"], segment_ids=segments, **extra
    )


def token_logps_from_batch(model, batch: Batch, *, chunk_size: int = 1024, return_aux: bool = False):
    """``[R, L]`` float32 log-prob of ``targets`` at every position (0 where there is no target); with
    ``return_aux``, ``(log-probs, aux)`` (see :func:`hidden_from_batch`)."""
    out = hidden_from_batch(model, batch, return_aux=return_aux)
    hidden, aux = out if return_aux else (out, None)
    logps = chunked_token_logps(
        hidden, model.unembedding(), batch["targets"], chunk_size=chunk_size, logit_softcap=model.logit_softcap
    )
    return (logps, aux) if return_aux else logps


def uses_router_loss(model) -> bool:
    """Whether the objective adds the model's load-balancing loss: an MoE model with a non-zero
    ``router_aux_loss_coef`` (HF's, when its config sets ``output_router_logits``, as TRL; or the run's
    ``model.router_aux_loss_coef``)."""
    experts = getattr(getattr(model, "config", None), "num_experts", 0)
    return experts > 0 and getattr(model, "router_aux_loss_coef", 0.0) > 0


def _policy_token_logps(model, batch: Batch, chunk_size: int, metrics_out: dict) -> jax.Array:
    """The policy's token log-probs; with a router loss, ``metrics_out["router_aux_loss"]`` gets the batch's value."""
    if not uses_router_loss(model):
        return token_logps_from_batch(model, batch, chunk_size=chunk_size)
    logps, aux = token_logps_from_batch(model, batch, chunk_size=chunk_size, return_aux=True)
    metrics_out["router_aux_loss"] = aux["router_aux_loss"]
    return logps


def with_router_loss(model, loss_sum: jax.Array, metrics: dict, batch: Batch) -> jax.Array:
    """``loss_sum`` plus ``coef * router_aux_loss`` per real pair, so that after the step divides by the pairs the
    batch's load-balancing loss enters with its coefficient (TRL adds ``router_aux_loss_coef * aux_loss``)."""
    if "router_aux_loss" not in metrics:
        return loss_sum
    pairs = jnp.sum(batch["pair_mask"]).astype(jnp.float32)
    return loss_sum + model.router_aux_loss_coef * metrics["router_aux_loss"] * pairs


def sequence_sums(values: jax.Array, batch: Batch, num_sequences: int) -> jax.Array:
    """Sum ``values * loss_mask`` ``[R, L]`` per sequence slot -> ``[num_sequences]``."""
    ids = batch["sequence_ids"]
    weighted = (values * batch["loss_mask"]).ravel()
    safe_ids = jnp.where(ids >= 0, ids, num_sequences).ravel()
    return jax.ops.segment_sum(weighted, safe_ids, num_segments=num_sequences + 1)[:num_sequences]


def pair_logps(token_logps: jax.Array, batch: Batch) -> PairLogps:
    """Chosen/rejected summed log-probs, completion lengths and the real-pair mask ``[P]`` from token log-probs
    (no reference log-probs); empty slots have zero sums and lengths."""
    p = batch["pair_mask"].shape[-1]
    sums = sequence_sums(token_logps, batch, 2 * p).reshape(p, 2)
    lengths = sequence_sums(jnp.ones_like(token_logps), batch, 2 * p).reshape(p, 2)
    return PairLogps(
        sums[:, 0],
        sums[:, 1],
        chosen_lengths=lengths[:, 0],
        rejected_lengths=lengths[:, 1],
        mask=batch["pair_mask"] > 0,
    )


def preference_objective(
    model,
    batch: Batch,
    reference: PairLogps | None,
    *,
    loss_name: str,
    hparams: dict[str, Any],
    chunk_size: int = 1024,
    reference_is_policy: jax.Array | bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over real pairs of ``losses.get(loss_name)``, and the TRL/paper metrics (means over real pairs).

    ``reference``: its ``chosen``/``rejected`` are the reference's summed log-probs. The loss sees the batch's
    ``pair_mask`` as ``PairLogps.mask``, so losses that couple the batch (``losses.couples_batch``) ignore
    empty slots.

    ``reference_is_policy`` (a traced bool): the policy's weights *are* the reference's (the first step of a run),
    so the reference log-probs are the policy's own, gradient stopped. XLA compiles the policy's forward inside
    the gradient computation and the reference's alone with different fusions (summed log-probs differ by ~1e-5
    on the CPU), so computing them twice would give rewards of ~1e-7 where TRL's are exactly 0."""
    router: dict = {}
    policy = pair_logps(_policy_token_logps(model, batch, chunk_size, router), batch)
    # Padding slots have zero lengths and sums; give them length 1 so normalised losses stay finite.
    logps = policy.replace(
        chosen_lengths=jnp.maximum(policy.chosen_lengths, 1.0),
        rejected_lengths=jnp.maximum(policy.rejected_lengths, 1.0),
    )
    if reference is not None:
        rc, rr = (
            jnp.where(reference_is_policy, jax.lax.stop_gradient(own), ref)
            for own, ref in ((policy.chosen, reference.chosen), (policy.rejected, reference.rejected))
        )
        logps = logps.replace(ref_chosen=rc, ref_rejected=rr)
    per_pair = losses.get(loss_name)(logps, **hparams)
    metrics = {**losses.preference_metrics(logps, beta=hparams.get("beta", 0.1), gamma=hparams.get("gamma")), **router}
    return with_router_loss(model, jnp.sum(jnp.where(logps.real(), per_pair, 0.0)), metrics, batch), metrics


def sft_objective(model, batch: Batch, *, chunk_size: int = 1024) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative log-likelihood of the chosen completions, summed over pairs (per-pair token means)."""
    router: dict = {}
    policy = pair_logps(_policy_token_logps(model, batch, chunk_size, router), batch)
    mask = batch["pair_mask"].astype(jnp.float32)
    nll = -policy.chosen / jnp.maximum(policy.chosen_lengths, 1.0)
    total = jnp.sum(nll * mask)
    metrics = {"nll": total / jnp.maximum(mask.sum(), 1.0), **router}
    return with_router_loss(model, total, metrics, batch), metrics


def last_token_positions(batch: Batch, num_sequences: int) -> jax.Array:
    """Flat ``[num_sequences]`` index into ``[R * L]`` of each sequence's last token (HF's "last non-pad token")."""
    ids = batch["sequence_ids"].ravel()
    flat = jnp.arange(ids.shape[0])
    present = ids >= 0
    safe_ids = jnp.where(present, ids, num_sequences)
    last = jax.ops.segment_max(jnp.where(present, flat, -1), safe_ids, num_segments=num_sequences + 1)
    return jnp.maximum(last[:num_sequences], 0)


def sequence_rewards(model, head: jax.Array, batch: Batch) -> jax.Array:
    """``[2P]`` scalar rewards ``h · head`` (float32) from the final hidden state at each sequence's last token.

    This is what HF's ``*ForSequenceClassification`` with ``num_labels=1`` computes (its ``score`` layer on the
    last non-pad token), so a head trained here exports as ``score.weight``.
    """
    hidden = hidden_from_batch(model, batch)
    positions = last_token_positions(batch, 2 * batch["pair_mask"].shape[-1])
    h = hidden.reshape(-1, hidden.shape[-1])[positions].astype(jnp.float32)
    return h @ head.astype(jnp.float32)


def reward_objective(
    model, head: jax.Array, batch: Batch, *, margin: float = 0.0, center_rewards_coefficient: float | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry loss of a scalar head ``[D]`` on :func:`sequence_rewards`, summed over real pairs."""
    p = batch["pair_mask"].shape[-1]
    rewards = sequence_rewards(model, head, batch).reshape(p, 2)
    mask = batch["pair_mask"].astype(jnp.float32)
    per_pair = losses.bradley_terry_loss(
        rewards[:, 0], rewards[:, 1], margin=margin, center_rewards_coefficient=center_rewards_coefficient
    )
    count = jnp.maximum(mask.sum(), 1.0)
    metrics = {
        "rewards/chosen": jnp.sum(rewards[:, 0] * mask) / count,
        "rewards/rejected": jnp.sum(rewards[:, 1] * mask) / count,
        "rewards/accuracies": jnp.sum((rewards[:, 0] > rewards[:, 1]) * mask) / count,
        "rewards/margins": jnp.sum((rewards[:, 0] - rewards[:, 1]) * mask) / count,
    }
    return jnp.sum(per_pair * mask), metrics
