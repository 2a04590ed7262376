"""The decoder configuration shared by every family, and RoPE frequency tables.

Each family module (``llama.py``, ``gemma.py``, ``gpt2.py``) translates a Hugging Face ``config.json``
into one :class:`TransformerConfig`. The decoder in ``transformer.py`` reads only this dataclass, so
a family differs from another in its translation and its weight table, not in module code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.errors import ConfigError

FULL = "full_attention"
SLIDING = "sliding_attention"
#: The values of ``TransformerConfig.attention_impl`` (:mod:`cpo_jax.ops.attention`).
ATTENTION_IMPLS = ("xla", "auto", "cudnn", "splash", "best")


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding frequencies for one layer type (HF ``rope_parameters`` entry).

    ``rope_type`` is one of :data:`ROPE_TYPES`; other HF types are rejected at translation time so that nothing
    is silently ignored. Every table is computed as transformers 5's ``ROPE_INIT_FUNCTIONS`` computes it
    (``modeling_rope_utils.py``), in float32.

    Attributes:
      theta: the base (``rope_theta``).
      factor: the scaling factor of ``linear``, ``llama3``, ``yarn`` and ``dynamic``; ``longrope`` uses it only for
        its default attention factor.
      low_freq_factor, high_freq_factor: ``llama3`` smoothing band.
      original_max_position_embeddings: the pre-training context length: ``llama3`` and ``yarn`` frequencies, the
        short/long switch of ``longrope``, and for ``dynamic`` the length past which the base grows (HF uses
        ``max_position_embeddings`` there; the translation stores it here).
      beta_fast, beta_slow, truncate: ``yarn``'s ramp between extrapolated and interpolated frequencies.
      attention_factor: the multiplier of cos and sin (``yarn``, ``longrope``); None: HF's default from ``factor``
        (and ``mscale`` / ``mscale_all_dim`` for ``yarn``), see :attr:`attention_scaling`.
      mscale, mscale_all_dim: ``yarn``'s DeepSeek-style attention factor inputs (None: unset).
      short_factor, long_factor: ``longrope``'s per-frequency divisors (``head_dim // 2`` each), used up to and
        past ``original_max_position_embeddings``.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @property
    def attention_scaling(self) -> float:
        """The multiplier HF applies to cos and sin (1.0 but for ``yarn`` and ``longrope``)."""
        if self.rope_type not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.rope_type == "longrope":
            if self.factor <= 1.0:
                return 1.0
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))
        if self.mscale and self.mscale_all_dim:
            return float(_yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim))
        return _yarn_mscale(self.factor)

    @property
    def length_dependent(self) -> bool:
        """Whether the frequencies depend on the longest position of the batch (``dynamic``, ``longrope``)."""
        return self.rope_type in ("dynamic", "longrope")

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies ``[head_dim // 2]`` in float32, as transformers computes them at model init.

        For ``dynamic`` and ``longrope`` this is the table up to ``original_max_position_embeddings``; see
        :meth:`inv_freq_for_length` for longer sequences.
        """
        exponents = _exponents(head_dim)
        if self.rope_type == "longrope":
            return _longrope_inv_freq(self.theta, self.short_factor, exponents)
        if self.rope_type == "dynamic":  # HF's _compute_dynamic_ntk_parameters(seq_len=None), in Python floats
            ratio = self.factor * self.original_max_position_embeddings / self.original_max_position_embeddings
            base = self.theta * (ratio - (self.factor - 1)) ** (head_dim / (head_dim - 2))
            return (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
        if self.rope_type == "yarn":
            return _yarn_inv_freq(self, head_dim)
        inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.rope_type == "default":
            return inv
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv, self)
        raise ValueError(f"unsupported rope_type {self.rope_type!r}")

    def inv_freq_for_length(self, head_dim: int, seq_len: jax.Array) -> jax.Array:
        """Inverse frequencies for a batch whose longest position is ``seq_len - 1`` (a traced int scalar).

        This is HF's ``dynamic_rope_update`` with ``seq_len = max(position_ids) + 1``: ``longrope`` takes
        ``long_factor`` once ``seq_len > original_max_position_embeddings``; ``dynamic`` grows the base to
        ``theta * (factor * seq_len / original - (factor - 1)) ** (d / (d - 2))`` (float32, as HF's tensor path).
        The choice is a ``jnp.where``, so one compiled function serves every length. Other types ignore ``seq_len``.
        """
        short = jnp.asarray(self.inv_freq(head_dim))
        if not self.length_dependent:
            return short
        original = self.original_max_position_embeddings
        seq_len = jnp.asarray(seq_len)
        if self.rope_type == "longrope":
            long = jnp.asarray(_longrope_inv_freq(self.theta, self.long_factor, _exponents(head_dim)))
        else:
            seq = jnp.maximum(seq_len, original).astype(jnp.float32)
            factor = jnp.float32(self.factor)
            growth = (factor * seq / jnp.float32(original) - jnp.float32(self.factor - 1)) ** jnp.float32(
                head_dim / (head_dim - 2)
            )
            base = jnp.float32(self.theta) * growth
            long = 1.0 / (base ** jnp.asarray(_exponents(head_dim)))
        return jnp.where(seq_len > original, long, short)


def _exponents(head_dim: int) -> np.ndarray:
    """``arange(0, head_dim, 2) / head_dim`` in float32 (HF's ``torch.arange(..., dtype=int64).float() / dim``)."""
    return np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)


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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(spec: RopeSpec, head_dim: int) -> np.ndarray:
    """YaRN (Peng et al. 2023, arXiv:2309.00071): interpolate low frequencies by ``factor``, keep high ones.

    A linear ramp over the dimensions whose wavelengths complete between ``beta_fast`` and ``beta_slow`` turns
    over ``original_max_position_embeddings`` blends the two (HF's ``_compute_yarn_parameters``).
    """
    dim, base = head_dim, spec.theta

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(spec.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevent a singularity
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(base) ** _exponents(head_dim)
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    interpolation = (1.0 / (np.float32(spec.factor) * pos_freqs)).astype(np.float32)
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv.astype(np.float32)


def _longrope_inv_freq(theta: float, factors, exponents: np.ndarray) -> np.ndarray:
    """LongRoPE (Ding et al. 2024, arXiv:2402.13753): ``1 / (factor_i * theta ** (2i / d))``, a factor per frequency."""
    ext = np.asarray(factors, np.float32)
    return (1.0 / (ext * (np.float32(theta) ** exponents))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything the decoder needs; see ``docs/models.md`` for which HF option maps to which field.

    Attributes (shapes use D = hidden_size, F = intermediate_size, N/K = query/key-value heads):
      family: the :mod:`cpo_jax.hf.families` module (``"llama"``, ``"gemma"``, ``"gpt2"``, ``"olmo2"``, ``"phi3"``...).
      model_type: the HF ``model_type`` this config came from.
      norm: ``"rms"`` or ``"layer"``; ``norm_offset`` 1.0 gives Gemma's ``x * (1 + w)``.
      block: ``"pre"`` (norm -> sublayer -> add), ``"sandwich"`` (Gemma 2/3: also a norm after each
        sublayer, before the residual add) or ``"post"`` (OLMo 2: only the norm after each sublayer,
        ``x + norm(attn(x))``; the block has no ``attn_norm`` / ``mlp_norm``).
      position: ``"rope"`` or ``"learned"`` (GPT-2 absolute embeddings).
      rope: ``((layer_type, RopeSpec), ...)``, one entry per layer type present.
      generate_refill_at: :func:`~cpo_jax.models.generate.generate` re-runs prompt and generated tokens with a fresh
        KV cache at the decode step whose cache holds exactly this many slots (prompt padding included), as HF's
        ``Phi3ForCausalLM`` does at ``original_max_position_embeddings`` so that every cached key takes LongRoPE's long
        factors. None: never (HF's generic behaviour: cached keys keep the rotation they were written with).
      layer_types: per-layer ``"full_attention"`` / ``"sliding_attention"``.
      qk_norm: RMSNorm q and k before RoPE; ``qk_norm_scope`` ``"head"`` normalises each head (Qwen3, Gemma 3,
        weights ``[head_dim]``), ``"all_heads"`` the whole projection (OLMo 2, weights ``[N * H]`` and ``[K * H]``).
      nope_layers: indices of layers that skip RoPE (SmolLM3's NoPE layers); their q and k carry no position.
      query_scale: multiplier of q.k (``head_dim ** -0.5``, or Gemma's ``query_pre_attn_scalar ** -0.5``).
      attn_softcap, final_softcap: Gemma 2 logit soft-capping (None: off).
      attention_sinks: a learned sink logit per query head in every softmax (gpt-oss; parameter ``attn.sinks`` [N]).
      embed_scale: multiply embeddings by this (Gemma: sqrt(D)); None: off.
      scan_layers: run the layers with ``jax.lax.scan`` over stacked parameters.
      remat: activation checkpointing policy per layer (``"none"``, ``"full"``, ``"dots"``,
        ``"dots_no_batch"``); one string applies to all layers.
      attention_impl: ``"xla"`` (einsum reference, the default), ``"auto"`` (``jax.nn.dot_product_attention``),
        ``"cudnn"`` (cuDNN flash attention on a GPU), ``"splash"`` (the TPU Pallas kernel) or ``"best"`` (whichever
        fused kernel the machine has, quietly ``"xla"`` where none can take the call); a requested fused path falls
        back to ``"xla"`` with a logged reason where it cannot take a call (see :mod:`cpo_jax.ops.attention`).
      padding_idx: the embedding row whose lookups get no gradient, as in HF's ``nn.Embedding(padding_idx=
        pad_token_id)`` (Llama and Gemma families; GPT-2 has none). The forward value is unchanged, and with tied
        embeddings the output projection's gradient still reaches that row, exactly as in PyTorch.
      num_experts: routed experts per layer (Mixture-of-Experts, :mod:`cpo_jax.models.moe`); 0: a dense MLP.
        Every layer not in ``dense_layers`` is then an MoE layer.
      dense_layers: indices of the layers of an MoE model whose MLP is dense (``intermediate_size``), as Qwen2/3-MoE's
        ``mlp_only_layers`` and ``decoder_sparse_step``. Mixed layers cannot be stacked, so they need
        ``scan_layers=False``.
      experts_per_token: top-k experts each token is routed to (HF ``num_experts_per_tok``).
      moe_intermediate_size: F of one expert (0: ``intermediate_size``, as Mixtral).
      norm_topk_prob: renormalise the top-k router probabilities to sum to 1 (Mixtral: always).
      shared_expert_size: F of Qwen2-MoE's sigmoid-gated shared expert (0: none).
      router_bias: the router is a linear layer with a bias ``[E]`` (gpt-oss; parameter ``mlp.router_bias``).
      router_softmax: ``"all"``: softmax over the ``E`` router logits, the ``k`` largest probabilities are the
        experts and their weights (Mixtral, Qwen); ``"topk"``: the ``k`` largest logits are the experts and the
        softmax over those ``k`` logits their weights (gpt-oss; ``norm_topk_prob`` is then moot).
      expert_bias: biases on the experts' gate and up ``[E, F]`` and down ``[E, D]`` projections (gpt-oss).
      swiglu_limit: gpt-oss's clamped SwiGLU in the experts when set: ``g = min(gate, limit)``,
        ``u = clip(up, -limit, limit)``, ``h = (u + 1) * g * sigmoid(swiglu_alpha * g)`` instead of
        ``act(gate) * up`` (``activation`` is then unused by the experts). None: off.
      swiglu_alpha: the sigmoid gain of that clamped SwiGLU (HF ``swiglu_alpha``, 1.702).
      router_aux_loss_coef: weight of the load-balancing loss a trainer should add (HF's ``router_aux_loss_coef``
        when the config sets ``output_router_logits``, else 0, as TRL does); see ``Transformer.forward(return_aux)``.
      moe_impl: grouped expert matmul, ``"auto"``, ``"ragged"`` or ``"blocked"`` (see :mod:`cpo_jax.models.moe`).
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
    block: Literal["pre", "sandwich", "post"] = "pre"
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = "silu"
    gated_mlp: bool = True
    mlp_bias: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    qk_norm_scope: Literal["head", "all_heads"] = "head"
    nope_layers: tuple[int, ...] = ()
    query_scale: float | None = None
    attn_softcap: float | None = None
    attention_sinks: bool = False
    final_softcap: float | None = None
    embed_scale: float | None = None
    position: Literal["rope", "learned"] = "rope"
    rope: tuple[tuple[str, RopeSpec], ...] = ((FULL, RopeSpec()),)
    generate_refill_at: int | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    tie_embeddings: bool = False
    padding_idx: int | None = None
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str | tuple[str, ...] = "none"
    attention_impl: Literal["xla", "auto", "cudnn", "splash", "best"] = "xla"
    num_experts: int = 0
    dense_layers: tuple[int, ...] = ()
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_size: int = 0
    router_bias: bool = False
    router_softmax: Literal["all", "topk"] = "all"
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    router_aux_loss_coef: float = 0.0
    moe_impl: Literal["auto", "ragged", "blocked"] = "auto"
    hf_config: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"unknown attention_impl {self.attention_impl!r}; expected one of {list(ATTENTION_IMPLS)}",
                where="attention_impl",
            )
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
        if self.router_softmax not in ("all", "topk"):
            raise ValueError(f"unknown router_softmax {self.router_softmax!r}; expected 'all' or 'topk'")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} not in [1, num_experts={self.num_experts}]")
        if isinstance(self.remat, tuple) and len(self.remat) != self.num_layers:
            raise ValueError(f"remat lists {len(self.remat)} policies for {self.num_layers} layers")
        if self.block not in ("pre", "sandwich", "post"):
            raise ValueError(f"unknown block {self.block!r}; expected 'pre', 'sandwich' or 'post'")
        if self.qk_norm_scope not in ("head", "all_heads"):
            raise ValueError(f"unknown qk_norm_scope {self.qk_norm_scope!r}; expected 'head' or 'all_heads'")
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers {self.dense_layers} name layers outside [0, {self.num_layers})")
        if self.dense_layers and not self.num_experts:
            raise ValueError("dense_layers is only meaningful for an MoE model (num_experts > 0)")
        if self.scan_layers and self.dense_layers and len(self.dense_layers) < self.num_layers:
            raise ValueError(
                f"scan_layers stacks identical layers, but layers {list(self.dense_layers)} are dense and the others "
                "MoE; set scan_layers=False (model.scan_layers: false) for this model"
            )
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise ValueError(f"nope_layers {self.nope_layers} name layers outside [0, {self.num_layers})")

    @property
    def scale(self) -> float:
        """The attention score multiplier."""
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def is_sparse(self, layer: int) -> bool:
        """True when layer ``layer``'s MLP is the MoE block."""
        return bool(self.num_experts) and layer not in self.dense_layers

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
