"""SmolLM3 (``smollm3``): the Llama decoder with NoPE layers (weights named as Llama's).

* ``no_rope_layers``: one entry per layer (at least), ``1`` for a layer that applies RoPE and ``0`` for a NoPE layer,
  whose q and k carry no position (``TransformerConfig.nope_layers``). Without it, every
  ``no_rope_layer_interval``-th layer (default 4: layers 3, 7, ...) is NoPE, as transformers derives it.
* ``layer_types``: sliding layers need ``use_sliding_window`` and ``sliding_window``; without ``layer_types`` the NoPE
  layers slide when ``use_sliding_window`` is set, as transformers derives it.
* ``attention_bias`` (q, k, v and o), ``mlp_bias``, tied embeddings by default; RoPE's default base is 2e6.
"""

from __future__ import annotations

from cpo_jax.errors import UnsupportedConfig
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
from cpo_jax.hf.families.llama import weight_table as llama_weight_table
from cpo_jax.hf.weights import WeightRule
from cpo_jax.models.config import FULL, SLIDING, TransformerConfig

MODEL_TYPES = ("smollm3",)
_DEFAULT_THETA = 2000000.0  # SmolLM3Config.default_theta


def _rope_flags(hf: dict, num_layers: int, model_type: str) -> tuple[bool, ...]:
    """Per layer: True when it applies RoPE (``no_rope_layers``, or the ``no_rope_layer_interval`` pattern)."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = int_value(hf, "no_rope_layer_interval", model_type, required=False) or 4
        return tuple((i + 1) % interval != 0 for i in range(num_layers))
    if not isinstance(flags, list) or not all(f in (0, 1) and isinstance(f, int) for f in flags):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets no_rope_layers={flags!r}; it must be a list of 0 (NoPE) and 1 (RoPE)"
        )
    if len(flags) < num_layers:
        raise UnsupportedConfig(
            f"{model_type}: config.json lists {len(flags)} no_rope_layers for num_hidden_layers={num_layers}"
        )
    return tuple(bool(f) for f in flags[:num_layers])


def config_from_hf(hf: dict) -> TransformerConfig:
    """Translate a SmolLM3 ``config.json`` dict. Unsupported options raise."""
    model_type = require_model_type(hf, MODEL_TYPES, "smollm3")
    require_value(hf, "hidden_act", ACTIVATIONS, model_type)
    require_value(hf, "attention_dropout", (0, 0.0), model_type)
    dims = decoder_dims(hf, default_max_positions=32768, model_type=model_type)
    n_layers = dims["num_layers"]
    rotates = _rope_flags(hf, n_layers, model_type)
    use_window = hf.get("use_sliding_window", False)
    if not isinstance(use_window, bool):
        raise UnsupportedConfig(f"{model_type}: config.json sets use_sliding_window={use_window!r}; true or false")
    if hf.get("layer_types") is None:
        slides = use_window and hf.get("sliding_window") is not None
        types = tuple(SLIDING if slides and not r else FULL for r in rotates)
    else:
        types = layer_types(hf, n_layers, model_type)
        if SLIDING in types and not use_window:
            # transformers masks these layers with a window but tells the attention kernels none: refuse the mix
            raise UnsupportedConfig(
                f"{model_type}: config.json lists sliding_attention layer_types with use_sliding_window=false"
            )
    rope_hf = hf if "rope_parameters" in hf or "rope_theta" in hf else {**hf, "rope_theta": _DEFAULT_THETA}
    attention_bias = bool(hf.get("attention_bias", False))
    return TransformerConfig(
        family="smollm3",
        model_type=model_type,
        **dims,
        norm="rms",
        activation=ACTIVATIONS[hf.get("hidden_act", "silu")],
        gated_mlp=True,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        rope=rope_specs(
            rope_hf, model_type, max_position_embeddings=dims["max_position_embeddings"], head_dim=dims["head_dim"]
        ),
        nope_layers=tuple(i for i, r in enumerate(rotates) if not r),
        layer_types=types,
        sliding_window=sliding_window(hf, types, model_type),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        padding_idx=padding_row(hf, dims["vocab_size"]),
        hf_config=hf,
    )


def weight_table(cfg: TransformerConfig) -> list[WeightRule]:
    """HF <-> cpo_jax names for SmolLM3: the Llama family's table."""
    return llama_weight_table(cfg)
