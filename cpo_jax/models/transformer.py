"""The decoder-only transformer that every family instantiates, plus its KV cache.

``Transformer(cfg)`` holds: token embedding ``[V, D]``, optional learned positions ``[P, D]``, the
blocks (a Python list, or one stacked block with a leading ``layers`` axis when ``cfg.scan_layers``),
a final norm and, when embeddings are untied, ``lm_head`` ``[D, V]``.

Calls:

* ``model(input_ids, attention_mask=None, positions=None, segment_ids=None) -> logits [B, T, V]``
* ``model.hidden_states(...) -> [B, T, D]`` (final-normed; feed it with ``model.unembedding()``
  to :func:`cpo_jax.ops.sequence_logps_from_hidden` so that ``[B, T, V]`` is never materialised)
* ``model.forward(..., cache=cache) -> (hidden, cache)`` for prefill and decode.
* ``return_aux=True`` on any of the three also returns a dict with the MoE load-balancing loss
  (``"router_aux_loss"``, 0 for dense models), to be added with weight ``model.router_aux_loss_coef``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from cpo_jax.models.config import FULL, SLIDING, TransformerConfig
from cpo_jax.models.layers import MLP, Attention, Linear, Norm, param, rope_for_positions
from cpo_jax.models.moe import MoE, RouterStats, load_balancing_loss
from cpo_jax.ops.attention import MaskSpec
from cpo_jax.parallel.sharding import constrain

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class KVCache:
    """Per-layer keys and values for incremental decoding.

    Attributes:
      k, v: ``[L, B, S, K, H]``.
      valid: ``[B, S]`` bool, True at slots holding a real (non-padding) token.
      index: int32 scalar, the next slot to write.
      length: ``[B]`` int32, real tokens seen so far per row (the next position id).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    length: jax.Array


def init_cache(cfg: TransformerConfig, batch: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache for ``batch`` rows of at most ``max_length`` tokens (prompt + generation)."""
    dtype = dtype or cfg.dtype
    shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_length), bool),
        index=jnp.zeros((), jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
    )


def positions_from_mask(attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Position ids ``[B, T]``: count of real tokens before each token (within its segment when packed)."""
    mask = attention_mask.astype(jnp.int32)
    if segment_ids is None:
        return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    t = segment_ids.shape[-1]
    idx = jnp.arange(t)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1
    )
    segment_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - segment_start


#: Logical axes of the residual stream ``[B, T, D]``: rows over the batch axes (``data``, ``fsdp``); the model
#: dimension takes only a mesh axis that the batch left unused (none in the default rules when the rows divide).
RESIDUAL = ("batch", "length", "embed")


class Block(nnx.Module):
    """One decoder layer: pre-norm (Llama, Gemma 1, GPT-2), sandwich-norm (Gemma 2/3) or post-norm (OLMo 2)."""

    def __init__(self, cfg: TransformerConfig, *, param_dtype, rngs: nnx.Rngs, sparse: bool | None = None):
        """``sparse``: an MoE MLP (default: ``cfg.num_experts > 0``); False gives a dense layer in an MoE model."""
        norm = lambda: Norm(
            cfg.hidden_size, kind=cfg.norm, eps=cfg.norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype, rngs=rngs
        )
        before, after = cfg.block in ("pre", "sandwich"), cfg.block in ("sandwich", "post")
        self.attn_norm = norm() if before else None
        self.attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = norm() if after else None
        self.mlp_norm = norm() if before else None
        sparse = bool(cfg.num_experts) if sparse is None else sparse
        self.mlp = (MoE if sparse else MLP)(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_mlp_norm = norm() if after else None

    def __call__(self, x, mask, rope, kv_cache=None, cache_index=None, token_mask=None):
        """``[B, T, D] -> ([B, T, D], updated kv, RouterStats or None)``; see :meth:`Attention.__call__` for the
        other args. ``token_mask`` ``[B, T]`` marks the real tokens an MoE layer counts in its router statistics.

        The residual stream is pinned to :data:`RESIDUAL` on entry and on exit
        (:func:`~cpo_jax.parallel.sharding.constrain`, a no-op outside ``activation_sharding``). Without it GSPMD
        follows the FSDP-sharded weights: it splits the matmuls over ``embed`` and all-reduces activations of the
        whole batch on every device (``docs/benchmarks.md``, collectives of the train step)."""
        x = constrain(x, RESIDUAL)
        h, kv_cache = self.attn(_apply(self.attn_norm, x), mask, rope, kv_cache, cache_index)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        stats = None
        if isinstance(self.mlp, MoE):
            h, stats = self.mlp(_apply(self.mlp_norm, x), token_mask)
        else:
            h = self.mlp(_apply(self.mlp_norm, x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return constrain(x + h, RESIDUAL), kv_cache, stats


def _apply(norm, x):
    """``norm(x)``, or ``x`` when the block has no such norm (post-norm blocks have no pre-norms)."""
    return x if norm is None else norm(x)


def _no_rotation(rope):
    """RoPE tables that leave q and k unchanged (``cos = 1``, ``sin = 0``): a NoPE layer under ``scan_layers``."""
    cos, sin = rope
    return jnp.ones_like(cos), jnp.zeros_like(sin)


def _select(flag, a, b):
    """``a if flag else b`` for a Python bool, elementwise ``where`` for a traced one."""
    if isinstance(flag, bool):
        return a if flag else b
    return jax.tree.map(lambda u, v: jnp.where(flag, u, v), a, b)


def _draws_random(module: nnx.Module) -> bool:
    """True when ``module`` holds an active dropout (rate > 0, not deterministic), whose RNG stream the layer loops
    must carry out of ``jax.checkpoint`` / ``jax.lax.scan`` so that the next call draws a new mask."""
    return any(isinstance(m, nnx.Dropout) and m.rate > 0 and not m.deterministic for _, m in nnx.iter_modules(module))


def _checkpointed(fn, policy: str):
    if policy == "none":
        return fn
    if policy not in _REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; expected one of {['none', *_REMAT_POLICIES]}")
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy])


class Transformer(nnx.Module):
    """Decoder-only language model driven by a :class:`TransformerConfig`."""

    def __init__(self, cfg: TransformerConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal", param_dtype)
        self.pos_embed = (
            param(rngs, (cfg.max_position_embeddings, cfg.hidden_size), ("positions", "embed"), "normal", param_dtype)
            if cfg.position == "learned"
            else None
        )
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs):
                return Block(cfg, param_dtype=param_dtype, rngs=rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List(
                [Block(cfg, param_dtype=param_dtype, rngs=rngs, sparse=cfg.is_sparse(i)) for i in range(cfg.num_layers)]
            )
        self.final_norm = Norm(
            cfg.hidden_size, kind=cfg.norm, eps=cfg.norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype, rngs=rngs
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                bias=False,
                dtype=cfg.dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )

    # ----------------------------------------------------------------------------------------------
    def unembedding(self) -> jax.Array:
        """The output projection ``[D, V]`` (the transposed embedding when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...]

    @property
    def logit_softcap(self) -> float | None:
        """Final logit soft-cap (Gemma 2), to pass to the chunked log-prob ops."""
        return self.config.final_softcap

    @property
    def router_aux_loss_coef(self) -> float:
        """Weight of ``aux["router_aux_loss"]`` in a training loss (0 for dense models; see ``forward``)."""
        return self.config.router_aux_loss_coef

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None, *, return_aux=False):
        """Logits ``[B, T, V]`` in float32 for ``input_ids`` ``[B, T]``; ``(logits, aux)`` with ``return_aux``."""
        out = self.forward(
            input_ids,
            attention_mask=attention_mask,
            positions=positions,
            segment_ids=segment_ids,
            return_aux=return_aux,
        )
        return (self.logits(out[0]), out[2]) if return_aux else self.logits(out[0])

    def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None, *, return_aux=False):
        """Final-normed hidden states ``[B, T, D]``; ``(hidden, aux)`` with ``return_aux`` (see :meth:`forward`)."""
        out = self.forward(
            input_ids,
            attention_mask=attention_mask,
            positions=positions,
            segment_ids=segment_ids,
            return_aux=return_aux,
        )
        return (out[0], out[2]) if return_aux else out[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Project ``[..., D]`` hidden states to float32 logits ``[..., V]`` (soft-capped if configured)."""
        w = self.unembedding().astype(self.config.dtype)
        logits = jnp.dot(hidden.astype(self.config.dtype), w, preferred_element_type=jnp.float32)
        cap = self.config.final_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        return_aux: bool = False,
    ) -> tuple[jax.Array, KVCache | None] | tuple[jax.Array, KVCache | None, dict[str, jax.Array]]:
        """Run the decoder.

        Args:
          input_ids: ``[B, T]`` int.
          attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (default all ones).
          positions: ``[B, T]`` position ids; default counts real tokens (left padding safe), within
            each segment when ``segment_ids`` is given, and continues from ``cache.length``.
          segment_ids: ``[B, T]`` packed-sequence ids; tokens attend within their segment only.
          cache: a :class:`KVCache`; the tokens are written at ``cache.index`` and attend to all
            earlier valid slots. Not combinable with ``segment_ids``.

          return_aux: also return the auxiliary outputs.

        Returns:
          ``(hidden [B, T, D], updated cache or None)``, plus with ``return_aux`` a dict: ``"router_aux_loss"``, the
          load-balancing loss of HF's ``load_balancing_loss_func`` (float32 scalar; 0.0 for a dense model) pooled over
          every MoE layer and every real token (``attention_mask``), and for an MoE model ``"expert_load"`` ``[E]``,
          the fraction of top-k assignments per expert (sums to ``experts_per_token``). A trainer adds
          ``model.router_aux_loss_coef * aux["router_aux_loss"]`` to its loss.
        """
        cfg = self.config
        b, t = input_ids.shape
        padded = attention_mask is not None or cache is not None  # else the mask has no padding, statically
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
        if positions is None:
            positions = positions_from_mask(attention_mask, segment_ids)
            if cache is not None:
                positions = positions + cache.length[:, None]

        if cache is None:
            query_slots = jnp.arange(t)
            key_slots, key_valid, index = query_slots, attention_mask, None
        else:
            index = cache.index
            query_slots = index + jnp.arange(t)
            key_slots = jnp.arange(cache.valid.shape[1])
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
        # the structure of each layer type's mask; the XLA path derives the dense [B, T, S] mask from it
        masks = {
            kind: MaskSpec(
                query_slots=query_slots,
                key_slots=key_slots,
                key_valid=key_valid if padded else None,
                segment_ids=segment_ids,
                window=cfg.sliding_window if kind == SLIDING else None,
                causal=cache is None,
            )
            for kind in set(cfg.layer_types)
        }
        ropes = (
            {
                kind: rope_for_positions(positions, cfg.rope_for(kind), cfg.head_dim, cfg.dtype)
                for kind in set(cfg.layer_types)
            }
            if cfg.position == "rope"
            else None
        )

        x = jnp.take(self.embed[...], input_ids, axis=0).astype(cfg.dtype)
        if cfg.padding_idx is not None:  # nn.Embedding(padding_idx): no gradient into that row through the lookup
            x = jnp.where((input_ids == cfg.padding_idx)[..., None], jax.lax.stop_gradient(x), x)
        if cfg.embed_scale is not None:
            x = x * jnp.asarray(cfg.embed_scale, cfg.dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(cfg.dtype)

        if cfg.scan_layers:
            x, new_kv, stats = self._scan_layers(x, masks, ropes, cache, index, attention_mask)
        else:
            x, new_kv, stats = self._loop_layers(x, masks, ropes, cache, index, attention_mask)
        x = self.final_norm(x)

        if cache is not None:
            cache = KVCache(
                k=new_kv[0],
                v=new_kv[1],
                valid=key_valid,
                index=index + t,
                length=cache.length + attention_mask.sum(-1).astype(jnp.int32),
            )
        if not return_aux:
            return x, cache
        if stats is None:
            return x, cache, {"router_aux_loss": jnp.zeros((), jnp.float32)}
        load = stats.counts / jnp.maximum(stats.tokens, 1.0)
        return x, cache, {"router_aux_loss": load_balancing_loss(stats), "expert_load": load}

    def _layer_inputs(self, kind_is_sliding, masks, ropes):
        pick = lambda d: _select(kind_is_sliding, d.get(SLIDING), d.get(FULL))
        if len(masks) == 1:
            (mask,) = masks.values()
            rope = None if ropes is None else next(iter(ropes.values()))
            return mask, rope
        if isinstance(kind_is_sliding, bool):
            mask = masks[SLIDING if kind_is_sliding else FULL]
        else:  # a traced flag (scan): the sliding spec, its window on only in sliding layers
            mask = masks[SLIDING].window_if(kind_is_sliding)
        return mask, (None if ropes is None else pick(ropes))

    def _loop_layers(self, x, masks, ropes, cache, index, token_mask):
        cfg = self.config
        ks, vs = [], []
        total: RouterStats | None = None
        for i, (block, policy) in enumerate(zip(self.layers, cfg.remat_policies())):
            mask, rope = self._layer_inputs(cfg.layer_types[i] == SLIDING, masks, ropes)
            if i in cfg.nope_layers:
                rope = None
            kv = None if cache is None else (cache.k[i], cache.v[i])
            graphdef, rng_state, state = nnx.split(block, nnx.RngState, ...)

            def run(rng_state, state, x, mask, rope, kv, index, token_mask, graphdef=graphdef):
                layer = nnx.merge(graphdef, rng_state, state)
                x, kv, stats = layer(x, mask, rope, kv, index, token_mask)
                return x, kv, stats, nnx.state(layer, nnx.RngState)

            x, kv, stats, rng_state = _checkpointed(run, policy)(rng_state, state, x, mask, rope, kv, index, token_mask)
            if stats is not None:
                total = stats if total is None else total + stats
            if _draws_random(block):
                nnx.update(block, rng_state)  # advance the dropout RNG streams (LoRA dropout in train mode)
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        return x, ((jnp.stack(ks), jnp.stack(vs)) if cache is not None else None), total

    def _scan_layers(self, x, masks, ropes, cache, index, token_mask):
        cfg = self.config
        policies = set(cfg.remat_policies())
        if len(policies) != 1:
            raise ValueError(f"scan_layers needs one remat policy for all layers, got {sorted(policies)}")
        graphdef, rng_state, state = nnx.split(self.layers, nnx.RngState, ...)
        is_sliding = jnp.asarray([kind == SLIDING for kind in cfg.layer_types])
        uses_rope = jnp.asarray([i not in cfg.nope_layers for i in range(cfg.num_layers)])

        def body(x, xs):
            layer_rng, layer_state, sliding, rotates, kv = xs
            mask, rope = self._layer_inputs(sliding, masks, ropes)
            if cfg.nope_layers and rope is not None:
                rope = _select(rotates, rope, _no_rotation(rope))
            layer = nnx.merge(graphdef, layer_rng, layer_state)
            x, kv, stats = layer(x, mask, rope, kv, index, token_mask)
            return x, (kv, stats, nnx.state(layer, nnx.RngState))

        body = _checkpointed(body, policies.pop())
        kv_in = None if cache is None else (cache.k, cache.v)
        x, (kv_out, stats, rng_state) = jax.lax.scan(body, x, (rng_state, state, is_sliding, uses_rope, kv_in))
        if _draws_random(self.layers):
            nnx.update(self.layers, rng_state)  # advance the dropout RNG streams (LoRA dropout in train mode)
        stats = None if stats is None else jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)
        return x, kv_out, stats
