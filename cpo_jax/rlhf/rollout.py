"""Rollouts: sampling completions from the policy and reading them back (log-probs, values, entropy).

Layout. Prompts are left-padded ``[P, Tp]``; each is repeated ``K`` times (``B = P * K`` rows, row
``i`` answers prompt ``i // K``) and continued by :func:`cpo_jax.models.generate.generate` into
``[B, N]`` completion tokens with a ``[B, N]`` mask (1 up to and including end-of-sequence). A scoring
pass runs the policy (or reference) on the ``[B, Tp + N]`` concatenation and keeps the ``N`` hidden states
that predict the completion tokens (positions ``Tp - 1 .. Tp + N - 2``), so nothing of shape
``[B, Tp + N, V]`` is formed: log-probs and the entropy come from :mod:`cpo_jax.ops.logprobs` in
vocabulary chunks.

Sampling and scoring read the same parameter arrays (the train state's ``params["model"]``), so the
policy is held once, in the mesh sharding training uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from cpo_jax.models.generate import (
    GenerationOutput,
    SamplingConfig,
    generate_from_state,
)
from cpo_jax.ops.logprobs import chunked_token_entropy, chunked_token_logps

Array = jax.Array


@struct.dataclass
class Rollout:
    """One step's samples and everything the update needs, rows ``[B]`` = prompts x generations.

    Attributes:
      prompt_ids, prompt_mask: ``[B, Tp]`` left-padded prompts (each repeated K times).
      tokens, mask: ``[B, N]`` completions and their mask.
      old_logps: ``[B, N]`` log-probs under the policy that sampled (recomputed by a scoring pass).
      ref_logps: ``[B, N]`` log-probs under the frozen reference.
      values: ``[B, N]`` value-head estimates (zeros without a value head).
      scores: ``[B]`` reward (verifier or reward model) minus any missing-EOS penalty.
      advantages, returns: ``[B, N]`` (returns: PPO only, else zeros).
    """

    prompt_ids: Array
    prompt_mask: Array
    tokens: Array
    mask: Array
    old_logps: Array
    ref_logps: Array
    values: Array
    scores: Array
    advantages: Array
    returns: Array


def repeat_prompts(prompt_ids: Array, prompt_mask: Array, num_generations: int) -> tuple[Array, Array]:
    """``[P, Tp]`` -> ``[P * K, Tp]``, each prompt repeated K times in a row."""
    return jnp.repeat(prompt_ids, num_generations, axis=0), jnp.repeat(prompt_mask, num_generations, axis=0)


def sample(
    graphdef,
    params,
    prompt_ids: Array,
    prompt_mask: Array,
    rng: Array,
    *,
    num_generations: int,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
) -> tuple[Array, Array, GenerationOutput]:
    """``K`` sampled completions per prompt with the KV-cache generator (jitted, static shapes).

    Equals ``generate(nnx.merge(graphdef, params), *repeat_prompts(...), rng=rng, ...)`` token for token.
    Returns ``(repeated prompt ids, repeated prompt mask, GenerationOutput [B, N])``.
    """
    ids, mask = repeat_prompts(prompt_ids, prompt_mask, num_generations)
    out = generate_from_state(
        graphdef,
        params,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        rng=rng,
    )
    return ids, mask, out


def completion_hidden(
    model, prompt_ids: Array, prompt_mask: Array, tokens: Array, mask: Array, *, return_aux: bool = False
) -> Array | tuple[Array, dict]:
    """``[B, N, D]`` final hidden states that predict each completion token.

    Runs the model once on prompt + completion ``[B, Tp + N]``; positions count real tokens, so left
    padding and the padding after end-of-sequence change nothing. With ``return_aux`` also the model's auxiliary
    outputs (the MoE load-balancing loss over the real prompt and completion tokens, as TRL's GRPO forward).
    """
    tp = prompt_ids.shape[1]
    input_ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    attention = jnp.concatenate([prompt_mask, mask], axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(attention, axis=1) - 1, 0)
    out = model.hidden_states(
        input_ids, attention_mask=attention > 0, positions=positions, segment_ids=attention, return_aux=return_aux
    )
    hidden, aux = out if return_aux else (out, None)
    hidden = hidden[:, tp - 1 : tp - 1 + tokens.shape[1]]
    return (hidden, aux) if return_aux else hidden


def completion_logps(model, hidden: Array, tokens: Array, *, temperature: float = 1.0, chunk_size: int = 1024) -> Array:
    """float32 ``[B, N]`` log-probs of ``tokens`` from :func:`completion_hidden` (logits / temperature)."""
    return chunked_token_logps(
        hidden,
        model.unembedding(),
        tokens,
        chunk_size=chunk_size,
        temperature=temperature,
        logit_softcap=model.logit_softcap,
    )


def completion_entropy(model, hidden: Array, *, temperature: float = 1.0, chunk_size: int = 1024) -> Array:
    """float32 ``[B, N]`` entropy of each next-token distribution (a metric: gradients stopped)."""
    return chunked_token_entropy(
        jax.lax.stop_gradient(hidden),
        jax.lax.stop_gradient(model.unembedding()),
        chunk_size=chunk_size,
        temperature=temperature,
        logit_softcap=model.logit_softcap,
    )


def value_predictions(hidden: Array, value_head: dict) -> Array:
    """float32 ``[B, N]`` values ``h · w + b`` of a scalar value head ``{"kernel": [D], "bias": []}``."""
    return hidden.astype(jnp.float32) @ value_head["kernel"].astype(jnp.float32) + value_head["bias"]


def init_value_head(hidden_size: int) -> dict:
    """A zero value head (every value starts at 0, as TRL's ``ValueHead`` after zero init)."""
    return {"kernel": jnp.zeros((hidden_size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}
