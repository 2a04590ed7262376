"""Autoregressive generation with a KV cache: prefill once, then one token per step.

Prompts are **left-padded** ``[B, T]`` with an attention mask, as for HF ``generate``. The whole loop
(prefill + ``lax.while_loop`` of decode steps) is one jitted function, so generation costs one
compilation per (batch, prompt length, max_new_tokens, sampling config).

Sampling follows HF's order: temperature, then top-k, then top-p (nucleus). ``temperature == 0`` is
greedy decoding. Rows that emit an end-of-sequence token keep their length; later slots hold
``pad_token_id`` and a 0 in ``mask``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from cpo_jax.models.transformer import Transformer, init_cache
from cpo_jax.parallel.multihost import global_to_host


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@struct.dataclass
class GenerationOutput:
    """Generated continuation.

    Attributes:
      tokens: ``[B, N]`` generated ids (``pad_token_id`` after a row's end-of-sequence token).
      mask: ``[B, N]`` 1 for generated tokens up to and including end-of-sequence.
      logprobs: ``[B, N]`` log-probability of each token under the sampling distribution
        (temperature, top-k and top-p applied; 0 for greedy choices of a unique maximum).
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Apply temperature, top-k and top-p to ``[B, V]`` float32 logits (removed tokens get -inf)."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
        keep_sorted = before < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample_token(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row from ``[B, V]`` logits; returns ``(tokens [B], logprobs [B])``."""
    if sampling.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    filtered = filter_logits(logits, sampling)
    tokens = jax.random.categorical(key, filtered, axis=-1)
    logp = jax.nn.log_softmax(filtered, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _check_left_padded(attention_mask) -> None:
    if isinstance(attention_mask, jax.core.Tracer):
        return
    mask = global_to_host(attention_mask).astype(bool)  # the whole batch, also when it spans hosts
    if not (mask[:, -1] | ~mask.any(axis=1)).all():  # an all-padding row is an empty batch slot, allowed
        raise ValueError("generate() needs left-padded prompts: every row's last token must be real")


def generate(
    model: Transformer,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    rng: jax.Array | None = None,
) -> GenerationOutput:
    """Continue left-padded prompts ``[B, T]`` by up to ``max_new_tokens`` tokens.

    Stops early once every row has produced an ``eos_token_id``.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    _check_left_padded(attention_mask)
    graphdef, state = nnx.split(model)
    return generate_from_state(
        graphdef,
        state,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        rng=rng,
    )


def generate_from_state(
    graphdef,
    state,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    rng: jax.Array | None = None,
) -> GenerationOutput:
    """:func:`generate` on a split model ``(graphdef, state)``: the state's arrays are read in place,
    with their sharding, so a trainer samples from the very parameters it updates."""
    eos = jnp.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(
        graphdef,
        state,
        jnp.asarray(input_ids),
        jnp.asarray(attention_mask),
        eos,
        rng,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        pad_token_id=pad_token_id,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "pad_token_id"))
def _generate(graphdef, state, input_ids, attention_mask, eos, rng, *, max_new_tokens, sampling, pad_token_id):
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    cache = init_cache(model.config, b, t + max_new_tokens)
    hidden, cache = model.forward(input_ids, attention_mask=attention_mask, cache=cache)
    logits = model.logits(hidden[:, -1])

    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    mask = jnp.zeros((b, max_new_tokens), jnp.int32)
    logprobs = jnp.zeros((b, max_new_tokens), jnp.float32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        step, _, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, tokens, mask, done, logprobs, rng = carry
        rng, key = jax.random.split(rng)
        token, logp = sample_token(logits, key, sampling)
        token = jnp.where(done, pad_token_id, token).astype(jnp.int32)
        tokens = tokens.at[:, step].set(token)
        mask = mask.at[:, step].set((~done).astype(jnp.int32))
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logp))
        done = done | jnp.isin(token, eos)
        if model.config.generate_refill_at is None:
            logits, cache = decode(token, cache, step, tokens)
        else:
            logits, cache = jax.lax.cond(
                cache.index == model.config.generate_refill_at, refill, decode, token, cache, step, tokens
            )
        return step + 1, logits, cache, tokens, mask, done, logprobs, rng

    def decode(token, cache, step, tokens):
        hidden, cache = model.forward(token[:, None], attention_mask=jnp.ones((b, 1), bool), cache=cache)
        return model.logits(hidden[:, -1]), cache

    def refill(token, cache, step, tokens):
        """Prompt and every token fed so far (``tokens[:, :step + 1]``) through a fresh cache (HF Phi-3 at the
        LongRoPE switch); the cache then continues at the next slot, later slots being overwritten as decoding goes."""
        fed = jnp.concatenate(
            [attention_mask.astype(bool), jnp.broadcast_to(jnp.arange(max_new_tokens) <= step, tokens.shape)], 1
        )
        hidden, fresh = model.forward(
            jnp.concatenate([input_ids, tokens], 1),
            attention_mask=fed,
            cache=init_cache(model.config, b, t + max_new_tokens),
        )
        last = jax.lax.dynamic_index_in_dim(hidden, t + step, axis=1, keepdims=False)
        return model.logits(last), fresh.replace(index=cache.index + 1)

    carry = (jnp.zeros((), jnp.int32), logits, cache, tokens, mask, done, logprobs, rng)
    _, _, _, tokens, mask, _, logprobs, _ = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(tokens=tokens, mask=mask, logprobs=logprobs)
