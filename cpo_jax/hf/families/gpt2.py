"""GPT-2: learned absolute positions, LayerNorm, a plain GELU MLP, biases everywhere.

HF stores GPT-2's projections as ``Conv1D`` with weights ``[in, out]`` (no transpose needed), and
fuses q, k and v into ``c_attn`` ``[D, 3D]``; the table splits it into three parts along the output
axis on import and concatenates them on export.
"""

from __future__ import annotations

from cpo_jax.hf.config import attention_dims, int_value, number_value, require_model_type, require_value
from cpo_jax.hf.weights import WeightRule
from cpo_jax.models.config import TransformerConfig

MODEL_TYPES = ("gpt2",)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict) -> TransformerConfig:
    """Translate a GPT-2 ``config.json`` dict. Unsupported options raise."""
    model_type = require_model_type(hf, MODEL_TYPES, "gpt2")
    require_value(hf, "activation_function", _ACTIVATIONS, model_type)
    require_value(hf, "scale_attn_by_inverse_layer_idx", (False,), model_type)
    require_value(hf, "add_cross_attention", (False,), model_type)
    require_value(hf, "scale_attn_weights", (True,), model_type)
    dims = attention_dims(hf, model_type, hidden="n_embd", heads="n_head", kv_heads=None, head_dim=None)
    inner = int_value(hf, "n_inner", model_type, required=False)
    eps = number_value(hf, "layer_norm_epsilon", model_type, required=False, positive=False)
    return TransformerConfig(
        family="gpt2",
        model_type=model_type,
        vocab_size=int_value(hf, "vocab_size", model_type),
        intermediate_size=inner or 4 * dims["hidden_size"],
        num_layers=int_value(hf, "n_layer", model_type),
        **dims,
        max_position_embeddings=int_value(hf, "n_positions", model_type),
        norm="layer",
        norm_eps=1e-5 if eps is None else eps,
        activation=_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=True,
        o_bias=True,
        position="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        hf_config=hf,
    )


def weight_table(cfg: TransformerConfig) -> list[WeightRule]:
    """HF <-> cpo_jax names for GPT-2 (``Conv1D`` is ``[in, out]``: no transpose; c_attn split in 3)."""
    layer = "transformer.h.{i}"
    rules = [
        WeightRule("transformer.wte.weight", "embed"),
        WeightRule("transformer.wpe.weight", "pos_embed"),
    ]
    for part, ours in enumerate(("q", "k", "v")):
        rules += [
            WeightRule(f"{layer}.attn.c_attn.weight", f"layers.{{i}}.attn.{ours}.kernel", split=(1, part, 3)),
            WeightRule(f"{layer}.attn.c_attn.bias", f"layers.{{i}}.attn.{ours}.bias", split=(0, part, 3)),
        ]
    rules += [
        WeightRule(f"{layer}.attn.c_proj.weight", "layers.{i}.attn.o.kernel"),
        WeightRule(f"{layer}.attn.c_proj.bias", "layers.{i}.attn.o.bias"),
        WeightRule(f"{layer}.ln_1.weight", "layers.{i}.attn_norm.scale"),
        WeightRule(f"{layer}.ln_1.bias", "layers.{i}.attn_norm.bias"),
        WeightRule(f"{layer}.ln_2.weight", "layers.{i}.mlp_norm.scale"),
        WeightRule(f"{layer}.ln_2.bias", "layers.{i}.mlp_norm.bias"),
        WeightRule(f"{layer}.mlp.c_fc.weight", "layers.{i}.mlp.up.kernel"),
        WeightRule(f"{layer}.mlp.c_fc.bias", "layers.{i}.mlp.up.bias"),
        WeightRule(f"{layer}.mlp.c_proj.weight", "layers.{i}.mlp.down.kernel"),
        WeightRule(f"{layer}.mlp.c_proj.bias", "layers.{i}.mlp.down.bias"),
        WeightRule("transformer.ln_f.weight", "final_norm.scale"),
        WeightRule("transformer.ln_f.bias", "final_norm.bias"),
    ]
    if not cfg.tie_embeddings:
        rules.append(WeightRule("lm_head.weight", "lm_head.kernel", transpose=True))
    return rules
