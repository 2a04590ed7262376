"""Sparse Mixture-of-Experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE (Llama-style attention, MoE MLP).

Attention is the Llama family's (:func:`cpo_jax.hf.families.llama.projection_rules`):

* ``mixtral``: no biases; a sliding window on every layer when ``sliding_window`` is set (as Mistral).
* ``qwen2_moe``: q, k, v biases (``qkv_bias``), per-layer sliding windows (``layer_types``, or HF's derivation
  from ``use_sliding_window`` / ``max_window_layers``).
* ``qwen3_moe``: qk-norm, ``attention_bias`` on q, k, v and o, a window on every layer with ``use_sliding_window``.

Every layer's MLP is :class:`cpo_jax.models.moe.MoE`: a softmax router, top-``num_experts_per_tok`` experts
(renormalised with ``norm_topk_prob``; always for Mixtral) and, for Qwen2-MoE, a sigmoid-gated shared expert.
Qwen2/3-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step``) get a plain gated MLP of
``intermediate_size`` (``TransformerConfig.dense_layers``; such a model runs with ``scan_layers=False``). Mixtral's
training-time ``router_jitter_noise`` is refused.

Weights are named as ``save_pretrained`` writes them (transformers 5 converts its fused ``experts.gate_up_proj``
``[E, 2F, D]`` back to one tensor per expert on save, the layout of the Hub checkpoints): the ``E`` tensors
``...experts.{e}.gate_proj.weight`` ``[F, D]`` stack into our ``expert_gate`` ``[E, D, F]`` (``{e}`` rules of
:mod:`cpo_jax.hf.weights`), Mixtral's ``w1`` / ``w3`` / ``w2`` being gate / up / down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from cpo_jax.errors import UnsupportedConfig
from cpo_jax.hf.config import (
    ACTIVATIONS,
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
from cpo_jax.hf.families.llama import projection_rules
from cpo_jax.hf.weights import WeightRule
from cpo_jax.models.config import FULL, SLIDING, TransformerConfig

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
_DEFAULT_AUX_COEF = 0.001  # transformers' default router_aux_loss_coef for all three


def _num_experts(hf: Mapping, model_type: str) -> int:
    # transformers 5 writes num_local_experts for all three (Qwen's attribute_map); Hub Qwen configs say num_experts.
    key = "num_local_experts" if "num_local_experts" in hf or model_type == "mixtral" else "num_experts"
    return int_value(hf, key, model_type)


def _dense_layers(hf: Mapping, model_type: str, n_layers: int) -> tuple[int, ...]:
    """Qwen2/3-MoE's dense layers, as HF's decoder layer decides: layer ``i`` is sparse when it is not in
    ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``."""
    step = int_value(hf, "decoder_sparse_step", model_type, required=False, minimum=1) or 1
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets mlp_only_layers={only!r}; expected a list of layer indices"
        )
    outside = [i for i in only if not 0 <= i < n_layers]
    if outside:
        raise UnsupportedConfig(
            f"{model_type}: config.json's mlp_only_layers names layers {outside} outside [0, {n_layers}) "
            "(num_hidden_layers)"
        )
    return tuple(i for i in range(n_layers) if i in only or (i + 1) % step)


def _attention(hf: Mapping, model_type: str, n_layers: int) -> dict:
    """Biases, qk-norm, layer types and window of the attention of ``model_type``."""
    if model_type == "mixtral":  # a window on every layer, or none
        window = int_value(hf, "sliding_window", model_type, required=False)
        types = (SLIDING if window else FULL,) * n_layers
        return dict(qkv_bias=False, o_bias=False, qk_norm=False, layer_types=types, sliding_window=window)
    if model_type == "qwen3_moe":
        bias = bool(hf.get("attention_bias", False))
        window = int_value(hf, "sliding_window", model_type) if hf.get("use_sliding_window") else None
        types = (SLIDING if window else FULL,) * n_layers
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, layer_types=types, sliding_window=window)
    if hf.get("layer_types") is None:  # qwen2_moe: HF's derivation (Qwen2MoeConfig.__post_init__)
        slide = bool(hf.get("use_sliding_window", False))
        below = int_value(hf, "max_window_layers", model_type, required=False, minimum=0) or 0
        types = tuple(SLIDING if slide and (i + 1) % 2 and i < below else FULL for i in range(n_layers))
    else:
        types = layer_types(hf, n_layers, model_type)
        if SLIDING in types and not hf.get("use_sliding_window"):
            raise UnsupportedConfig(
                f"{model_type}: layer_types has sliding_attention layers but use_sliding_window is not true "
                "(transformers then uses a window of 0)"
            )
    qkv_bias = hf.get("qkv_bias", True)
    return dict(
        qkv_bias=bool(qkv_bias),
        o_bias=False,
        qk_norm=False,
        layer_types=types,
        sliding_window=sliding_window(hf, types, model_type),
    )


def config_from_hf(hf: dict) -> TransformerConfig:
    """Translate a Mixtral / Qwen2-MoE / Qwen3-MoE ``config.json`` dict. Unsupported options raise."""
    model_type = require_model_type(hf, MODEL_TYPES, "moe")
    require_value(hf, "hidden_act", ACTIVATIONS, model_type)
    require_value(hf, "attention_dropout", (0, 0.0), model_type)
    dims = decoder_dims(hf, default_max_positions=32768, model_type=model_type)
    n_layers = dims["num_layers"]
    experts = _num_experts(hf, model_type)
    top_k = int_value(hf, "num_experts_per_tok", model_type)
    if top_k > experts:
        raise UnsupportedConfig(f"{model_type}: config.json sets num_experts_per_tok={top_k} > {experts} experts")
    if model_type == "mixtral":
        require_value(hf, "router_jitter_noise", (0, 0.0), model_type)
        moe_size, normalize, shared = 0, True, 0
        dense = ()
    else:
        dense = _dense_layers(hf, model_type, n_layers)
        moe_size = int_value(hf, "moe_intermediate_size", model_type)
        normalize = bool(hf.get("norm_topk_prob", False))
        shared = int_value(hf, "shared_expert_intermediate_size", model_type) if model_type == "qwen2_moe" else 0
    coef = number_value(hf, "router_aux_loss_coef", model_type, required=False, positive=False)
    coef = _DEFAULT_AUX_COEF if coef is None else coef
    return TransformerConfig(
        family="moe",
        model_type=model_type,
        **dims,
        norm="rms",
        activation=ACTIVATIONS[hf.get("hidden_act", "silu")],
        gated_mlp=True,
        **_attention(hf, model_type, n_layers),
        rope=rope_specs(hf, model_type),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        padding_idx=padding_row(hf, dims["vocab_size"]),
        num_experts=experts,
        dense_layers=dense,
        experts_per_token=top_k,
        moe_intermediate_size=moe_size,
        norm_topk_prob=normalize,
        shared_expert_size=shared,
        router_aux_loss_coef=coef if hf.get("output_router_logits") else 0.0,
        hf_config=hf,
    )


def moe_rules(cfg: TransformerConfig, layer: str = "model.layers.{i}") -> list[WeightRule]:
    """Router, stacked experts and (Qwen2-MoE) shared expert of the MoE layers, and the dense MLP of the layers in
    ``cfg.dense_layers`` (Llama's ``mlp.*_proj`` names)."""
    if cfg.model_type == "mixtral":
        prefix, names = f"{layer}.block_sparse_moe", (("expert_gate", "w1"), ("expert_up", "w3"), ("expert_down", "w2"))
    else:
        prefix = f"{layer}.mlp"
        names = (("expert_gate", "gate_proj"), ("expert_up", "up_proj"), ("expert_down", "down_proj"))
    rules = [WeightRule(f"{prefix}.gate.weight", "layers.{i}.mlp.router", transpose=True)]
    for ours, theirs in names:
        rules.append(WeightRule(f"{prefix}.experts.{{e}}.{theirs}.weight", f"layers.{{i}}.mlp.{ours}", transpose=True))
    if cfg.shared_expert_size:
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            rules.append(
                WeightRule(f"{prefix}.shared_expert.{theirs}.weight", f"layers.{{i}}.mlp.shared.{ours}.kernel", True)
            )
        rules.append(WeightRule(f"{prefix}.shared_expert_gate.weight", "layers.{i}.mlp.shared_gate", transpose=True))
    if not cfg.dense_layers:
        return rules
    sparse = tuple(i for i in range(cfg.num_layers) if cfg.is_sparse(i))
    dense_mlp = [r for r in projection_rules(cfg, layer) if ".mlp." in r.ours]
    return [dataclasses.replace(r, layers=sparse) for r in rules] + [
        dataclasses.replace(r, layers=cfg.dense_layers) for r in dense_mlp
    ]


def weight_table(cfg: TransformerConfig) -> list[WeightRule]:
    """HF <-> cpo_jax names for the MoE families (``nn.Linear`` ``[out, in]``: transposed, per expert too)."""
    return sparse_decoder_table(cfg, moe_rules(cfg))


def sparse_decoder_table(cfg: TransformerConfig, mlp_rules: list[WeightRule]) -> list[WeightRule]:
    """The table of an MoE decoder with Llama's module names: the embedding, the attention projections of
    :func:`~cpo_jax.hf.families.llama.projection_rules`, the family's ``mlp_rules`` (router and experts, plus
    anything else it adds), each layer's two norms, the final norm and an untied ``lm_head``."""
    layer = "model.layers.{i}"
    attention = [r for r in projection_rules(cfg, layer) if ".attn." in r.ours]
    rules = [WeightRule("model.embed_tokens.weight", "embed"), *attention, *mlp_rules]
    rules += [
        WeightRule(f"{layer}.input_layernorm.weight", "layers.{i}.attn_norm.scale"),
        WeightRule(f"{layer}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale"),
        WeightRule("model.norm.weight", "final_norm.scale"),
    ]
    if not cfg.tie_embeddings:
        rules.append(WeightRule("lm_head.weight", "lm_head.kernel", transpose=True))
    return rules
