"""Gemma 1, Gemma 2 and Gemma 3 (text) as flags on the shared decoder.

* All: RMSNorm as ``x * (1 + w)`` in float32, embeddings scaled by ``sqrt(hidden_size)``, GeGLU MLP
  (tanh GELU), explicit ``head_dim``, tied embeddings.
* Gemma 2: sandwich norms (a norm after attention and after the MLP, before each residual add),
  attention-logit and final-logit soft-capping, ``query_pre_attn_scalar`` scaling, and
  sliding/global alternation through ``layer_types``.
* Gemma 3: Gemma 2 plus qk-norm and a separate RoPE base (and scaling) for sliding and global layers;
  soft-capping is normally off.
"""

from __future__ import annotations

from cpo_jax.hf.config import (
    decoder_dims,
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
from cpo_jax.models.config import FULL, TransformerConfig

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_TANH_GELU = ("gelu_pytorch_tanh", "gelu")  # transformers maps Gemma's legacy "gelu" to the tanh form


def config_from_hf(hf: dict) -> TransformerConfig:
    """Translate a Gemma/Gemma 2/Gemma 3 text ``config.json`` dict. Unsupported options raise."""
    model_type = require_model_type(hf, MODEL_TYPES, "gemma")
    act_key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    require_value(hf, act_key, _TANH_GELU, model_type)
    require_value(hf, "attention_dropout", (0, 0.0), model_type)
    require_value(hf, "attention_bias", (False,), model_type)
    require_value(hf, "use_bidirectional_attention", (None, False), model_type)
    dims = decoder_dims(hf, default_max_positions=8192, model_type=model_type)
    n_layers = dims["num_layers"]
    later = model_type != "gemma"
    types = layer_types(hf, n_layers, model_type) if later else (FULL,) * n_layers
    return TransformerConfig(
        family="gemma",
        model_type=model_type,
        **dims,
        norm="rms",
        norm_offset=1.0,
        block="sandwich" if later else "pre",
        activation="gelu_tanh",
        gated_mlp=True,
        qk_norm=model_type == "gemma3_text",
        query_scale=number_value(hf, "query_pre_attn_scalar", model_type) ** -0.5 if later else None,
        attn_softcap=number_value(hf, "attn_logit_softcapping", model_type, required=False) if later else None,
        final_softcap=number_value(hf, "final_logit_softcapping", model_type, required=False) if later else None,
        embed_scale=dims["hidden_size"] ** 0.5,
        rope=rope_specs(hf, model_type),
        layer_types=types,
        sliding_window=sliding_window(hf, types, model_type),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        padding_idx=padding_row(hf, dims["vocab_size"]),
        hf_config=hf,
    )


def weight_table(cfg: TransformerConfig) -> list[WeightRule]:
    """HF <-> cpo_jax names for Gemma 1/2/3 text."""
    layer = "model.layers.{i}"
    rules = [WeightRule("model.embed_tokens.weight", "embed"), *projection_rules(cfg, layer)]
    rules.append(WeightRule(f"{layer}.input_layernorm.weight", "layers.{i}.attn_norm.scale"))
    if cfg.block == "sandwich":
        rules += [
            WeightRule(f"{layer}.post_attention_layernorm.weight", "layers.{i}.post_attn_norm.scale"),
            WeightRule(f"{layer}.pre_feedforward_layernorm.weight", "layers.{i}.mlp_norm.scale"),
            WeightRule(f"{layer}.post_feedforward_layernorm.weight", "layers.{i}.post_mlp_norm.scale"),
        ]
    else:
        rules.append(WeightRule(f"{layer}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale"))
    rules.append(WeightRule("model.norm.weight", "final_norm.scale"))
    if not cfg.tie_embeddings:
        rules.append(WeightRule("lm_head.weight", "lm_head.kernel", transpose=True))
    return rules
