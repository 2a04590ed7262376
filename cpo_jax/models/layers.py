"""Flax NNX building blocks: projections, norms, embeddings, RoPE, MLP and attention.

Every parameter carries its logical axes as ``out_sharding`` metadata (for example
``("embed", "mlp")``); :mod:`cpo_jax.parallel.sharding` maps them onto a device mesh. Projection
kernels are stored ``[in, out]`` with heads flattened into the feature axis (``[D, N * H]``), so HF
weights load with a transpose only, and a tensor-parallel split of ``heads`` keeps whole heads
together whenever ``N`` divides evenly.

A :class:`Linear` may hold its kernel quantised instead (QLoRA, :func:`cpo_jax.models.quantize.quantize_model`): the
codes and scales of :class:`cpo_jax.ops.quant.QuantizedTensor` as two :class:`QuantizedWeight` variables, its static
fields as the Python attribute ``Linear.quant`` (a :class:`QuantFormat`, part of the graphdef), and no ``kernel``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpo_jax.models.config import RopeSpec, TransformerConfig
from cpo_jax.ops.attention import MaskSpec, dot_product_attention
from cpo_jax.ops.quant import QuantizedTensor, dequantize, quantized_matmul

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], init: str, dtype) -> nnx.Param:
    """A parameter with logical-axis metadata. ``init`` is ``"normal"`` (std 0.02), ``"zeros"`` or ``"ones"``."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and axes {axes} differ in rank")
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class QuantizedWeight(nnx.Variable):
    """The codes or the scales of a quantised frozen kernel (QLoRA).

    Not an ``nnx.Param``: ``nnx.state(model, nnx.Param)`` leaves it out, ``nnx.split(model, nnx.LoRAParam, ...)`` puts
    it in the frozen rest, and an optimiser over ``nnx.Param`` or ``nnx.LoRAParam`` never sees it. Metadata:
    ``out_sharding``, the logical axes the array is placed by (the kernel's, with ``in`` set to None when its shards
    do not hold whole blocks), and ``kernel_axes``, the kernel's own logical axes (restored by dequantisation)."""


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """The static fields of a quantised kernel (:class:`~cpo_jax.ops.quant.QuantizedTensor`'s meta fields).

    Attributes:
      kind: ``"nf4"`` or ``"int8"``.
      block_size: rows of ``in`` per absmax scale.
      dtype: dtype of the kernel that was quantised (dequantisation restores it).
      shape: ``(in, out)`` of one matrix (a stacked kernel's leading ``layers`` axis lives only in the arrays).
    """

    kind: str
    block_size: int
    dtype: np.dtype
    shape: tuple[int, int]

    def tensor(self, codes: jax.Array, scales: jax.Array) -> QuantizedTensor:
        """The :class:`QuantizedTensor` of ``codes`` and ``scales`` (one matrix, or a stack)."""
        return QuantizedTensor(
            codes=codes, scales=scales, shape=self.shape, dtype=self.dtype, block_size=self.block_size, kind=self.kind
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def frozen_quantized_matmul(fmt: QuantFormat, h: jax.Array, codes: jax.Array, scales: jax.Array) -> jax.Array:
    """``h @ dequantize(codes, scales)`` in ``h.dtype``, differentiable in ``h`` only (the weight is frozen).

    The custom VJP keeps only ``codes`` and ``scales`` for the backward pass and dequantises again there
    (``dh = g @ W.T``), as bitsandbytes' ``MatMul4Bit`` does: plain autodiff would keep every layer's dequantised
    ``[in, out]`` weight alive from the forward to the backward pass (without remat), i.e. the full-precision base
    that quantising was meant to drop. No gradient flows to ``codes`` or ``scales``; forward-mode autodiff
    (``jax.jvp``) is not defined through it."""
    return quantized_matmul(h, fmt.tensor(codes, scales), h.dtype)


def _frozen_quantized_matmul_fwd(fmt, h, codes, scales):
    return quantized_matmul(h, fmt.tensor(codes, scales), h.dtype), (codes, scales)


def _frozen_quantized_matmul_bwd(fmt, residuals, g):
    codes, scales = residuals
    return jnp.matmul(g, dequantize(fmt.tensor(codes, scales), g.dtype).T), None, None


frozen_quantized_matmul.defvjp(_frozen_quantized_matmul_fwd, _frozen_quantized_matmul_bwd)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``[in, out]``.

    With LoRA adapters attached (:func:`cpo_jax.models.lora.add_lora`) it adds
    ``lora_scale * (dropout(x) @ lora_a) @ lora_b``, ``lora_a`` ``[in, r]`` and ``lora_b`` ``[r, out]`` being
    ``nnx.LoRAParam`` variables; without them (``lora_a is None``) the projection is exactly the plain one.

    Quantised (``quant`` not None, :func:`cpo_jax.models.quantize.quantize_model`): ``kernel`` is None and the weight
    is ``kernel_codes`` / ``kernel_scales`` (:class:`QuantizedWeight`), dequantised blockwise inside the matmul in
    the compute dtype (:func:`frozen_quantized_matmul`); bias and LoRA are added as before.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: tuple[str | None, str | None],
        *,
        bias: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.kernel = param(rngs, (d_in, d_out), axes, "normal", param_dtype)
        self.bias = param(rngs, (d_out,), (axes[1],), "zeros", param_dtype) if bias else None
        self.dtype = dtype
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_dropout = nnx.data(None)  # an nnx.Dropout when the adapter has dropout
        self.lora_scale = 0.0
        self.kernel_codes = nnx.data(None)  # QuantizedWeight when quantised
        self.kernel_scales = nnx.data(None)
        self.quant: QuantFormat | None = None

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """``(*layers, in, out)`` of the weight, stored plain or quantised."""
        if self.quant is None:
            return tuple(self.kernel[...].shape)
        return (*self.kernel_codes[...].shape[:-2], *self.quant.shape)

    def quantized_kernel(self) -> QuantizedTensor:
        """The stored weight as a :class:`QuantizedTensor` (stacked under ``scan_layers``); only when quantised."""
        if self.quant is None:
            raise ValueError("this projection is not quantised")
        return self.quant.tensor(self.kernel_codes[...], self.kernel_scales[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., in] -> [..., out]`` in the compute dtype."""
        h = x.astype(self.dtype)
        if self.quant is not None:
            y = frozen_quantized_matmul(self.quant, h, self.kernel_codes[...], self.kernel_scales[...])
        else:
            y = jnp.dot(h, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            if self.lora_dropout is not None:
                h = self.lora_dropout(h)
            delta = jnp.dot(jnp.dot(h, self.lora_a[...].astype(self.dtype)), self.lora_b[...].astype(self.dtype))
            y = y + delta * jnp.asarray(self.lora_scale, self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (``x * rsqrt(mean(x^2) + eps) * (offset + w)``) or LayerNorm, computed in float32."""

    def __init__(
        self, dim: int, *, kind: str, eps: float, offset: float, param_dtype, rngs: nnx.Rngs, axis_name: str = "norm"
    ):
        self.kind, self.eps, self.offset = kind, eps, offset
        self.scale = param(rngs, (dim,), (axis_name,), "zeros" if offset else "ones", param_dtype)
        self.bias = param(rngs, (dim,), (axis_name,), "zeros", param_dtype) if kind == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise the last axis; returns ``x.dtype``."""
        h = x.astype(jnp.float32)
        if self.kind == "layer":
            h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        if self.offset:
            # Gemma: (x * (1 + w)) in float32, then cast.
            return (h * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        if self.kind == "layer":
            return (h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
        # Llama: cast first, then scale in the input dtype.
        return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


def rope_tables(
    positions: jax.Array, inv_freq: jax.Array, dtype, attention_scaling: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[B, T, head_dim]`` (HF rotate-half layout: frequencies repeated twice).

    Both are multiplied by ``attention_scaling`` in float32 before the cast, as HF's rotary embedding does
    (YaRN's and LongRoPE's attention factor)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.astype(dtype), sin.astype(dtype)


def rope_for_positions(positions: jax.Array, spec: RopeSpec, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` ``[B, T, head_dim]`` of one layer type's :class:`RopeSpec` at ``positions`` ``[B, T]``.

    ``dynamic`` and ``longrope`` choose their frequencies from the batch's longest position, as HF's
    ``dynamic_rope_update`` does with ``max(position_ids) + 1``; the choice is traced, so under ``jit`` one compiled
    function serves every length. With a KV cache, cached keys keep the rotation they were written with (as in HF).
    Unlike HF's ``dynamic``, nothing is remembered between calls: HF keeps a grown base for a later, shorter call
    that is still past ``original_max_position_embeddings``; here each call uses its own longest position.
    """
    if spec.length_dependent:
        inv_freq = spec.inv_freq_for_length(head_dim, jnp.max(positions).astype(jnp.int32) + 1)
    else:
        inv_freq = jnp.asarray(spec.inv_freq(head_dim))
    return rope_tables(positions, inv_freq, dtype, spec.attention_scaling)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, T, heads, head_dim]`` by position: ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class MLP(nnx.Module):
    """Gated (``down(act(gate x) * up x)``) or plain (``down(act(up x))``) feed-forward block."""

    def __init__(self, cfg: TransformerConfig, *, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear(d, f, ("embed", "mlp"), **kw) if cfg.gated_mlp else None
        self.up = Linear(d, f, ("embed", "mlp"), **kw)
        self.down = Linear(f, d, ("mlp", "embed"), **kw)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        act = _ACTIVATIONS[self.activation]
        h = act(self.gate(x)) * self.up(x) if self.gate is not None else act(self.up(x))
        return self.down(h)


class Attention(nnx.Module):
    """Grouped-query self-attention with optional qkv bias, qk-norm, RoPE, soft-capping and a KV cache."""

    def __init__(self, cfg: TransformerConfig, *, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=cfg.dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear(d, n * h, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
        self.k = Linear(d, k * h, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v = Linear(d, k * h, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o = Linear(n * h, d, ("heads", "embed"), bias=cfg.o_bias, **kw)
        norm_kw = dict(
            kind="rms",
            eps=cfg.norm_eps,
            offset=cfg.norm_offset,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        # per head (Qwen3, Gemma 3: weights [H]) or over the whole projection (OLMo 2: weights [N * H] / [K * H])
        self.qk_norm_per_head = cfg.qk_norm_scope == "head"
        q_dim, k_dim, q_axis, k_axis = (
            (h, h, "head_dim", "head_dim") if self.qk_norm_per_head else (n * h, k * h, "heads", "kv_heads")
        )
        self.q_norm = Norm(q_dim, axis_name=q_axis, **norm_kw) if cfg.qk_norm else None
        self.k_norm = Norm(k_dim, axis_name=k_axis, **norm_kw) if cfg.qk_norm else None
        # gpt-oss: one learned sink logit per query head (see cpo_jax.ops.attention)
        self.sinks = param(rngs, (n,), ("heads",), "zeros", param_dtype) if cfg.attention_sinks else None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.scale, self.softcap, self.impl = cfg.scale, cfg.attn_softcap, cfg.attention_impl

    def __call__(
        self,
        x: jax.Array,
        mask: MaskSpec | jax.Array,
        rope: tuple[jax.Array, jax.Array] | None,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attend ``x`` ``[B, T, D]``.

        Args:
          mask: the :class:`~cpo_jax.ops.attention.MaskSpec` that ``Transformer.forward`` builds (the fused
            ``attention_impl`` paths read its structure), or a dense ``[B, T, S]`` bool mask; ``S = T`` without a
            cache, the cache length with one.
          rope: ``(cos, sin)`` ``[B, T, head_dim]``, or None (learned positions).
          kv_cache: ``(k, v)`` ``[B, S, K, H]``; the new keys/values are written at ``cache_index``.

        Returns:
          ``([B, T, D], updated (k, v) or None)``.
        """
        b, t, _ = x.shape
        q, k = self.q(x), self.k(x)
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            kv_cache = (k, v)
        out = dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask,
            scale=self.scale,
            softcap=self.softcap,
            sinks=None if self.sinks is None else self.sinks[...],
            implementation=self.impl,
        )
        return self.o(out.reshape(b, t, self.num_heads * self.head_dim)), kv_cache
