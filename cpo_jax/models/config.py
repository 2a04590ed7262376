"""The decoder configuration shared by every family, and RoPE frequency tables.

Each family module (``llama.py``, ``gemma.py``, ``gpt2.py``) translates a Hugging Face ``config.json``
into one :class:`TransformerConfig`. The decoder in ``transformer.py`` reads only this dataclass, so
a family differs from another in its translation and its weight table, not in module code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding frequencies for one layer type (HF ``rope_parameters`` entry).

    ``rope_type`` is ``"default"``, ``"linear"`` or ``"llama3"``; other HF types are rejected at
    translation time so that nothing is silently ignored.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies ``[head_dim // 2]`` in float32, as transformers computes them."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.rope_type == "default":
            return inv
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv, self)
        raise ValueError(f"unsupported rope_type {self.rope_type!r}")


def _llama3_inv_freq(inv: np.ndarray, spec: RopeSpec) -> np.ndarray:
    """Llama 3.1 frequency smoothing (Meta's ``apply_scaling``)."""
    low_wavelen = spec.original_max_position_embeddings / spec.low_freq_factor
    high_wavelen = spec.original_max_position_embeddings / spec.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / spec.factor, inv)
    smooth = (spec.original_max_position_embeddings / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything the decoder needs; see ``docs/models.md`` for which HF option maps to which field.

    Attributes (shapes use D = hidden_size, F = intermediate_size, N/K = query/key-value heads):
      family: ``"llama"``, ``"gemma"`` or ``"gpt2"`` (selects the weight table).
      model_type: the HF ``model_type`` this config came from.
      norm: ``"rms"`` or ``"layer"``; ``norm_offset`` 1.0 gives Gemma's ``x * (1 + w)``.
      block: ``"pre"`` (norm -> sublayer -> add) or ``"sandwich"`` (Gemma 2/3: also a norm after each
        sublayer, before the residual add).
      position: ``"rope"`` or ``"learned"`` (GPT-2 absolute embeddings).
      rope: ``((layer_type, RopeSpec), ...)``, one entry per layer type present.
      layer_types: per-layer ``"full_attention"`` / ``"sliding_attention"``.
      query_scale: multiplier of q.k (``head_dim ** -0.5``, or Gemma's ``query_pre_attn_scalar ** -0.5``).
      attn_softcap, final_softcap: Gemma 2 logit soft-capping (None: off).
      embed_scale: multiply embeddings by this (Gemma: sqrt(D)); None: off.
      scan_layers: run the layers with ``jax.lax.scan`` over stacked parameters.
      remat: activation checkpointing policy per layer (``"none"``, ``"full"``, ``"dots"``,
        ``"dots_no_batch"``); one string applies to all layers.
      attention_impl: ``"xla"`` or ``"auto"`` (see :mod:`cpo_jax.ops.attention`).
      padding_idx: the embedding row whose lookups get no gradient, as in HF's ``nn.Embedding(padding_idx=
        pad_token_id)`` (Llama and Gemma families; GPT-2 has none). The forward value is unchanged, and with tied
        embeddings the output projection's gradient still reaches that row, exactly as in PyTorch.
      hf_config: the source ``config.json`` as a dict, written back on export.
    """

    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    block: Literal["pre", "sandwich"] = "pre"
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = "silu"
    gated_mlp: bool = True
    mlp_bias: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    query_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    position: Literal["rope", "learned"] = "rope"
    rope: tuple[tuple[str, RopeSpec], ...] = ((FULL, RopeSpec()),)
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    tie_embeddings: bool = False
    padding_idx: int | None = None
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str | tuple[str, ...] = "none"
    attention_impl: Literal["xla", "auto"] = "xla"
    hf_config: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = set(self.layer_types) - {FULL, SLIDING}
        if unknown:
            raise ValueError(f"unsupported layer_types {sorted(unknown)}; expected {FULL!r} or {SLIDING!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a positive sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if isinstance(self.remat, tuple) and len(self.remat) != self.num_layers:
            raise ValueError(f"remat lists {len(self.remat)} policies for {self.num_layers} layers")

    @property
    def scale(self) -> float:
        """The attention score multiplier."""
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def rope_for(self, layer_type: str) -> RopeSpec:
        """The RoPE spec of a layer type (sliding layers fall back to the full spec)."""
        specs = dict(self.rope)
        return specs.get(layer_type, specs.get(FULL, RopeSpec()))

    def remat_policies(self) -> tuple[str, ...]:
        """One remat policy per layer."""
        if isinstance(self.remat, str):
            return (self.remat,) * self.num_layers
        return tuple(self.remat)

    def replace(self, **changes) -> TransformerConfig:
        """A copy with some fields changed (e.g. ``scan_layers``, ``remat``, ``dtype``)."""
        return dataclasses.replace(self, **changes)
