"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3 (one module, flags only).

Differences handled by :class:`~cpo_jax.models.config.TransformerConfig` flags:

* ``llama``: ``attention_bias`` (q, k, v and o), ``mlp_bias``, tied or untied embeddings, GQA.
* ``mistral``: ``sliding_window`` on every layer when set.
* ``qwen2``: q, k, v biases (o has none); per-layer sliding windows via ``layer_types``.
* ``qwen3``: per-head RMSNorm on q and k (qk-norm) before RoPE; ``attention_bias`` on q, k, v and o.

Every member takes ``rope_type`` default, linear, llama3, yarn, dynamic or longrope (see ``RopeSpec``).
"""

from __future__ import annotations

from cpo_jax.hf.config import (
    ACTIVATIONS,
    decoder_dims,
    int_value,
    layer_types,
    padding_row,
    require_model_type,
    require_value,
    rope_specs,
    sliding_window,
)
from cpo_jax.hf.weights import WeightRule
from cpo_jax.models.config import FULL, SLIDING, TransformerConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def config_from_hf(hf: dict) -> TransformerConfig:
    """Translate a Llama/Mistral/Qwen2/Qwen3 ``config.json`` dict. Unsupported options raise."""
    model_type = require_model_type(hf, MODEL_TYPES, "llama")
    require_value(hf, "hidden_act", ACTIVATIONS, model_type)
    require_value(hf, "attention_dropout", (0, 0.0), model_type)
    require_value(hf, "pretraining_tp", (1,), model_type)
    dims = decoder_dims(hf, default_max_positions=2048, model_type=model_type)
    n_layers = dims["num_layers"]
    attention_bias = bool(hf.get("attention_bias", False))
    if model_type == "mistral":  # a window (any positive size) on every layer, or none
        window = int_value(hf, "sliding_window", model_type, required=False)
        types = (SLIDING if window else FULL,) * n_layers
    else:
        types = layer_types(hf, n_layers, model_type)
        window = sliding_window(hf, types, model_type)
    return TransformerConfig(
        family="llama",
        model_type=model_type,
        **dims,
        norm="rms",
        activation=ACTIVATIONS[hf.get("hidden_act", "silu")],
        gated_mlp=True,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        qk_norm=model_type == "qwen3",
        rope=rope_specs(
            hf, model_type, max_position_embeddings=dims["max_position_embeddings"], head_dim=dims["head_dim"]
        ),
        layer_types=types,
        sliding_window=window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        padding_idx=padding_row(hf, dims["vocab_size"]),
        hf_config=hf,
    )


def projection_rules(cfg: TransformerConfig, layer: str = "model.layers.{i}") -> list[WeightRule]:
    """Attention and MLP projections (+ biases, qk-norm) under HF's ``self_attn.*_proj`` / ``mlp.*_proj`` names.

    Shared by the Llama family and Gemma, whose projections are named alike.
    """
    rules = []
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        rules.append(
            WeightRule(f"{layer}.self_attn.{theirs}.weight", f"layers.{{i}}.attn.{ours}.kernel", transpose=True)
        )
        if cfg.o_bias if ours == "o" else cfg.qkv_bias:
            rules.append(WeightRule(f"{layer}.self_attn.{theirs}.bias", f"layers.{{i}}.attn.{ours}.bias"))
    if cfg.qk_norm:
        rules += [
            WeightRule(f"{layer}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale"),
            WeightRule(f"{layer}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale"),
        ]
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        rules.append(WeightRule(f"{layer}.mlp.{theirs}.weight", f"layers.{{i}}.mlp.{ours}.kernel", transpose=True))
        if cfg.mlp_bias:
            rules.append(WeightRule(f"{layer}.mlp.{theirs}.bias", f"layers.{{i}}.mlp.{ours}.bias"))
    return rules


def decoder_table(cfg: TransformerConfig, layer_norms: list[tuple[str, str]]) -> list[WeightRule]:
    """The embedding, :func:`projection_rules`, each layer's norms (``(HF module, our module)``, e.g.
    ``("input_layernorm", "attn_norm")``), the final norm and an untied ``lm_head``: the table of every decoder with
    Llama's module names, whatever its norm placement."""
    layer = "model.layers.{i}"
    rules = [WeightRule("model.embed_tokens.weight", "embed"), *projection_rules(cfg, layer)]
    rules += [WeightRule(f"{layer}.{theirs}.weight", f"layers.{{i}}.{ours}.scale") for theirs, ours in layer_norms]
    rules.append(WeightRule("model.norm.weight", "final_norm.scale"))
    if not cfg.tie_embeddings:
        rules.append(WeightRule("lm_head.weight", "lm_head.kernel", transpose=True))
    return rules


def weight_table(cfg: TransformerConfig) -> list[WeightRule]:
    """HF <-> cpo_jax names for the Llama family (HF ``nn.Linear`` is ``[out, in]``: transposed)."""
    return decoder_table(cfg, [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")])
