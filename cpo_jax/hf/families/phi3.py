"""Phi-3 (``phi3``): a Llama-shaped decoder whose HF checkpoint fuses projections.

* ``self_attn.qkv_proj`` ``[N * H + 2 * K * H, D]`` is our q, k and v, and ``mlp.gate_up_proj`` ``[2F, D]`` our gate
  and up (gate first): the table splits them on import (parts of relative sizes ``(N, K, K)`` and ``(1, 1)``) and
  concatenates them on export. LoRA sees each as one PEFT module whose parts share ``A``.
* ``sliding_window``, when set, applies to every layer (as Mistral).
* No biases. RoPE is read like the Llama family's, including Phi-3's ``longrope`` (with the top-level
  ``original_max_position_embeddings``); a ``partial_rotary_factor`` below 1 (Phi-4-mini) is refused.
* ``resid_pdrop`` and ``embd_pdrop`` (training-time dropout) must be 0, like ``attention_dropout``.
"""

from __future__ import annotations

from cpo_jax.hf.config import (
    ACTIVATIONS,
    decoder_dims,
    int_value,
    padding_row,
    require_model_type,
    require_value,
    rope_specs,
)
from cpo_jax.hf.weights import WeightRule
from cpo_jax.models.config import FULL, SLIDING, TransformerConfig

MODEL_TYPES = ("phi3",)


def _legacy_rope_type(hf: dict) -> dict:
    """``hf`` with an early Phi-3 release's RoPE type ``su`` (or ``yarn``) read as ``longrope``, as ``Phi3Config``
    does for backward compatibility (``Phi-3-mini-128k-instruct``'s first ``config.json`` said ``"type": "su"``)."""
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key)
        if isinstance(params, dict) and params.get("rope_type", params.get("type")) in ("su", "yarn"):
            renamed = {k: v for k, v in params.items() if k != "type"}
            return {**hf, key: {**renamed, "rope_type": "longrope"}}
    return hf


def config_from_hf(hf: dict) -> TransformerConfig:
    """Translate a Phi-3 ``config.json`` dict. Unsupported options raise."""
    model_type = require_model_type(hf, MODEL_TYPES, "phi3")
    hf = _legacy_rope_type(hf)
    require_value(hf, "hidden_act", ACTIVATIONS, model_type)
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
        require_value(hf, key, (0, 0.0), model_type)
    dims = decoder_dims(hf, default_max_positions=4096, model_type=model_type)
    if hf.get("rms_norm_eps") is None:
        dims["norm_eps"] = 1e-5  # Phi3Config's default
    window = int_value(hf, "sliding_window", model_type, required=False)
    # Phi3Config always has a top-level original_max_position_embeddings (4096 by default), which HF's RoPE prefers.
    original = int_value(hf, "original_max_position_embeddings", model_type, required=False) or 4096
    rope = rope_specs(
        dict(hf, original_max_position_embeddings=original),
        model_type,
        max_position_embeddings=dims["max_position_embeddings"],
        head_dim=dims["head_dim"],
    )
    return TransformerConfig(
        family="phi3",
        model_type=model_type,
        **dims,
        norm="rms",
        activation=ACTIVATIONS[hf.get("hidden_act", "silu")],
        gated_mlp=True,
        rope=rope,
        # HF's Phi3ForCausalLM.prepare_inputs_for_generation drops the KV cache when generation reaches the LongRoPE
        # switch, so every key is re-rotated with the long factors (for other RoPE types a recompute changes nothing).
        generate_refill_at=original if any(spec.length_dependent for _, spec in rope) else None,
        layer_types=(SLIDING if window else FULL,) * dims["num_layers"],
        sliding_window=window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        padding_idx=padding_row(hf, dims["vocab_size"]),
        hf_config=hf,
    )


def weight_table(cfg: TransformerConfig) -> list[WeightRule]:
    """HF <-> cpo_jax names for Phi-3 (``nn.Linear`` ``[out, in]``: transposed; fused qkv and gate/up split)."""
    layer = "model.layers.{i}"
    qkv = (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)  # relative sizes of q, k and v in qkv_proj
    rules = [WeightRule("model.embed_tokens.weight", "embed")]
    for part, ours in enumerate(("q", "k", "v")):
        name = f"layers.{{i}}.attn.{ours}.kernel"
        rules.append(WeightRule(f"{layer}.self_attn.qkv_proj.weight", name, transpose=True, split=(0, part, qkv)))
    rules.append(WeightRule(f"{layer}.self_attn.o_proj.weight", "layers.{i}.attn.o.kernel", transpose=True))
    for part, ours in enumerate(("gate", "up")):
        name = f"layers.{{i}}.mlp.{ours}.kernel"
        rules.append(WeightRule(f"{layer}.mlp.gate_up_proj.weight", name, transpose=True, split=(0, part, 2)))
    rules += [
        WeightRule(f"{layer}.mlp.down_proj.weight", "layers.{i}.mlp.down.kernel", transpose=True),
        WeightRule(f"{layer}.input_layernorm.weight", "layers.{i}.attn_norm.scale"),
        WeightRule(f"{layer}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale"),
        WeightRule("model.norm.weight", "final_norm.scale"),
    ]
    if not cfg.tie_embeddings:
        rules.append(WeightRule("lm_head.weight", "lm_head.kernel", transpose=True))
    return rules
