"""OLMo 2 (``olmo2``): a Llama-shaped decoder with post-norm blocks and whole-projection qk-norm.

* Post-norm blocks (``block="post"``): ``h = x + norm(attn(x))``, then ``h + norm(mlp(h))``; a layer has no input
  norm, only ``post_attention_layernorm`` and ``post_feedforward_layernorm``.
* qk-norm over the whole projected q ``[N * H]`` and k ``[K * H]`` (``qk_norm_scope="all_heads"``), before RoPE,
  unlike Qwen3's per-head norm.
* ``attention_bias`` puts biases on q, k, v and o.

HF's OLMo 2 RMSNorm multiplies by its weight in float32 and then casts (Llama casts first): the same in float32,
up to one rounding in bfloat16.
"""

from __future__ import annotations

from cpo_jax.hf.config import (
    ACTIVATIONS,
    decoder_dims,
    padding_row,
    require_model_type,
    require_value,
    rope_specs,
)
from cpo_jax.hf.families.llama import decoder_table
from cpo_jax.hf.weights import WeightRule
from cpo_jax.models.config import TransformerConfig

MODEL_TYPES = ("olmo2",)


def config_from_hf(hf: dict) -> TransformerConfig:
    """Translate an OLMo 2 ``config.json`` dict. Unsupported options raise."""
    model_type = require_model_type(hf, MODEL_TYPES, "olmo2")
    require_value(hf, "hidden_act", ACTIVATIONS, model_type)
    require_value(hf, "attention_dropout", (0, 0.0), model_type)
    dims = decoder_dims(hf, default_max_positions=2048, model_type=model_type)
    if hf.get("rms_norm_eps") is None:
        dims["norm_eps"] = 1e-5  # Olmo2Config's default
    attention_bias = bool(hf.get("attention_bias", False))
    return TransformerConfig(
        family="olmo2",
        model_type=model_type,
        **dims,
        norm="rms",
        block="post",
        activation=ACTIVATIONS[hf.get("hidden_act", "silu")],
        gated_mlp=True,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=True,
        qk_norm_scope="all_heads",
        rope=rope_specs(
            hf, model_type, max_position_embeddings=dims["max_position_embeddings"], head_dim=dims["head_dim"]
        ),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        padding_idx=padding_row(hf, dims["vocab_size"]),
        hf_config=hf,
    )


def weight_table(cfg: TransformerConfig) -> list[WeightRule]:
    """HF <-> cpo_jax names for OLMo 2 (the Llama projections and qk-norm; post-norms only)."""
    return decoder_table(
        cfg, [("post_attention_layernorm", "post_attn_norm"), ("post_feedforward_layernorm", "post_mlp_norm")]
    )
