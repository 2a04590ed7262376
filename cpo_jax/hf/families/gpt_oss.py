"""OpenAI gpt-oss (``model_type`` ``gpt_oss``): Llama-style attention with sinks, and a biased MoE MLP.

What transformers 5's ``GptOssForCausalLM`` computes, and the :class:`TransformerConfig` fields that say it:

* attention: q, k, v and o biases (``attention_bias``, default true), GQA, per-layer sliding/full alternation
  (``layer_types``; HF's default: even layers slide) with ``sliding_window``, one learned sink logit per query head
  (``attention_sinks``, ``self_attn.sinks``), YaRN RoPE (HF's default ``rope_parameters``: ``factor`` 32 over 4096
  positions, ``truncate: false``, ``rope_theta`` 150000), RMSNorm with ``rms_norm_eps`` (default 1e-5);
* router: a linear layer with a bias (``router_bias``), the top-``num_experts_per_tok`` raw logits pick the experts and
  the softmax over those ``k`` logits weighs them (``router_softmax="topk"``);
* experts: ``x @ W + b`` per expert (``expert_bias``) and the clamped SwiGLU
  ``(clip(up, -l, l) + 1) * g * sigmoid(a * g)``, ``g = min(gate, l)``, ``l`` = ``swiglu_limit`` (7.0), ``a`` =
  ``swiglu_alpha`` (1.702). ``hidden_act`` is unused by HF's experts (their gate is fixed), so it is not read here
  either.
* the load-balancing loss: HF's ``load_balancing_loss_func`` on the raw router logits (softmax over all experts),
  weighted by ``router_aux_loss_coef`` when ``output_router_logits``, as for the other MoE families.

Keys a ``config.json`` may omit take ``GptOssConfig``'s defaults (``head_dim`` 64, ``num_key_value_heads`` 8, ...), so
a hand-written or older config (``rope_scaling`` + ``rope_theta``, as the Hub's) means what it means to transformers.

Weights are named as ``save_pretrained`` writes them (no conversion mapping): the experts of a layer are fused
tensors with no per-expert index and no transpose, ``mlp.experts.gate_up_proj`` ``[E, D, 2F]`` (gate and up
interleaved: ``[..., 0::2]`` / ``[..., 1::2]``, an ``interleaved`` split of :class:`~cpo_jax.hf.weights.WeightRule`),
``gate_up_proj_bias`` ``[E, 2F]``, ``down_proj`` ``[E, F, D]``, ``down_proj_bias`` ``[E, D]``; the router is
``mlp.router.weight`` ``[E, D]`` (transposed) and ``mlp.router.bias``.

The Hub's checkpoints store ``gate_up_proj`` and ``down_proj`` in MXFP4 (``quantization_config.quant_method``
``"mxfp4"``; tensors ``*_blocks`` / ``*_scales``). Those rules carry ``packing="mxfp4"``: each device block is
dequantised on import exactly as transformers' ``convert_moe_packed_tensors`` does
(:func:`cpo_jax.hf.weights.dequantize_mxfp4`), into bfloat16 (exact) unless ``param_dtype`` says otherwise. The model
then holds plain weights and its ``hf_config`` drops ``quantization_config``, so an export is an unquantised
checkpoint. Any other ``quant_method`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

from cpo_jax.errors import UnsupportedConfig
from cpo_jax.hf.config import (
    decoder_dims,
    int_value,
    layer_types,
    number_value,
    padding_row,
    require_model_type,
    require_value,
    rope_specs,
    sliding_window,
)
from cpo_jax.hf.families.moe import sparse_decoder_table
from cpo_jax.hf.weights import WeightRule
from cpo_jax.models.config import FULL, SLIDING, TransformerConfig

MODEL_TYPES = ("gpt_oss",)

#: ``quantization_config.quant_method`` values whose checkpoints the weight table reads (dequantised on import).
QUANT_METHODS = ("mxfp4",)

# GptOssConfig's defaults for keys a config.json may leave out (transformers 5).
_DEFAULTS = dict(
    num_hidden_layers=36,
    num_local_experts=128,
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    sliding_window=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    num_experts_per_tok=4,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
    router_aux_loss_coef=0.001,
    attention_bias=True,
)
_DEFAULT_THETA = 150000.0
_DEFAULT_ROPE = dict(
    rope_type="yarn",
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
)


def _with_defaults(hf: Mapping) -> dict:
    """``hf`` with ``GptOssConfig``'s defaults filled in, as ``GptOssConfig(**hf)`` reads it.

    An absent key takes the default; an explicit null ``num_key_value_heads`` / ``head_dim`` means the query heads /
    ``hidden_size // num_attention_heads`` (``__post_init__``, and :func:`decoder_dims` does the same). RoPE, in
    transformers' order of precedence: a non-empty legacy ``rope_scaling``, else ``rope_parameters``, else (null or
    absent) HF's YaRN default; ``rope_theta`` from that dict, else the top-level key, else 150000 (``default_theta``).
    """
    out = {**_DEFAULTS, **{k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling")}}
    rope = hf.get("rope_parameters")
    rope = hf.get("rope_scaling") or (dict(_DEFAULT_ROPE) if rope is None else rope)
    if isinstance(rope, Mapping) and FULL not in rope and SLIDING not in rope and "rope_theta" not in rope:
        rope = {**rope, "rope_theta": hf.get("rope_theta", _DEFAULT_THETA)}
    out["rope_parameters"] = rope
    return out


def _num_experts(hf: Mapping, model_type: str) -> int:
    """``num_local_experts`` (``num_experts`` is HF's alias for it)."""
    key = "num_experts" if "num_experts" in hf and "num_local_experts" not in hf else "num_local_experts"
    return int_value({**_DEFAULTS, **hf}, key, model_type)


def config_from_hf(hf: dict) -> TransformerConfig:
    """Translate a gpt-oss ``config.json`` dict. Unsupported options raise :class:`UnsupportedConfig` naming the key."""
    model_type = require_model_type(hf, MODEL_TYPES, "gpt_oss")
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, Mapping) else None
        if method not in QUANT_METHODS:
            raise UnsupportedConfig(
                f"{model_type}: config.json sets quantization_config with quant_method={method!r}; cpo_jax reads "
                f"{list(QUANT_METHODS)} (dequantised on import) and unquantised checkpoints",
                hint="dequantize it with transformers first (from_pretrained, then save_pretrained)",
            )
        hf = {k: v for k, v in hf.items() if k != "quantization_config"}  # the model holds dequantised weights
    full = _with_defaults(hf)
    require_value(full, "attention_dropout", (0, 0.0), model_type)
    dims = decoder_dims(full, default_max_positions=_DEFAULTS["max_position_embeddings"], model_type=model_type)
    n_layers = dims["num_layers"]
    experts = _num_experts(hf, model_type)
    top_k = int_value(full, "num_experts_per_tok", model_type)
    if top_k > experts:
        raise UnsupportedConfig(f"{model_type}: config.json sets num_experts_per_tok={top_k} > {experts} experts")
    if hf.get("layer_types") is None:  # GptOssConfig.__post_init__: even layers (0, 2, ...) slide
        types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n_layers))
    else:
        types = layer_types(full, n_layers, model_type)
    bias = full.get("attention_bias")
    if not isinstance(bias, bool):
        raise UnsupportedConfig(f"{model_type}: config.json sets attention_bias={bias!r}; it must be true or false")
    coef = number_value(full, "router_aux_loss_coef", model_type, positive=False)
    return TransformerConfig(
        family="gpt_oss",
        model_type=model_type,
        **dims,
        norm="rms",
        qkv_bias=bias,
        o_bias=bias,
        attention_sinks=True,
        layer_types=types,
        sliding_window=sliding_window(full, types, model_type),
        rope=rope_specs(full, model_type),
        tie_embeddings=bool(full.get("tie_word_embeddings", False)),
        padding_idx=padding_row(full, dims["vocab_size"]),
        num_experts=experts,
        experts_per_token=top_k,
        router_bias=True,
        router_softmax="topk",
        expert_bias=True,
        swiglu_limit=number_value(full, "swiglu_limit", model_type),
        swiglu_alpha=number_value(full, "swiglu_alpha", model_type, positive=False),
        router_aux_loss_coef=coef if full.get("output_router_logits") else 0.0,
        hf_config=hf,
    )


def moe_rules(layer: str = "model.layers.{i}") -> list[WeightRule]:
    """Router (weight and bias) and the fused experts of one layer: ``gate_up_proj`` ``[E, D, 2F]`` and its bias
    ``[E, 2F]`` split interleaved into gate (even entries) and up (odd), ``down_proj`` ``[E, F, D]`` and its bias as
    they are; the two weights may be stored in MXFP4."""
    experts, ours = f"{layer}.mlp.experts", "layers.{i}.mlp"
    rules = [
        WeightRule(f"{layer}.mlp.router.weight", f"{ours}.router", transpose=True),
        WeightRule(f"{layer}.mlp.router.bias", f"{ours}.router_bias"),
    ]
    for suffix, packing in (("", "mxfp4"), ("_bias", None)):
        for part, name in enumerate(("expert_gate", "expert_up")):
            gate_up = f"{experts}.gate_up_proj{suffix}"
            rules.append(
                WeightRule(gate_up, f"{ours}.{name}{suffix}", split=(-1, part, 2), interleaved=True, packing=packing)
            )
        rules.append(WeightRule(f"{experts}.down_proj{suffix}", f"{ours}.expert_down{suffix}", packing=packing))
    return rules


def weight_table(cfg: TransformerConfig) -> list[WeightRule]:
    """HF <-> cpo_jax names for gpt-oss: the Llama attention projections (with biases), ``self_attn.sinks``, the
    router and fused experts (:func:`moe_rules`), the two norms of each layer, the final norm and ``lm_head``."""
    sinks = WeightRule("model.layers.{i}.self_attn.sinks", "layers.{i}.attn.sinks")
    return sparse_decoder_table(cfg, [sinks, *moe_rules()])
