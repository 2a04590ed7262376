"""Helpers for reading a transformers-5 ``config.json`` strictly: unknown options are errors."""

from __future__ import annotations

from typing import Any

from cpo_jax.models.config import FULL, SLIDING, RopeSpec

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedConfig(ValueError):
    """A config.json value that cpo_jax cannot honour (it is never silently ignored)."""


def require_model_type(hf: dict, model_types: tuple[str, ...], family: str) -> str:
    """``hf["model_type"]``, or :class:`UnsupportedConfig` when ``family`` does not cover it."""
    model_type = hf["model_type"]
    if model_type not in model_types:
        raise UnsupportedConfig(f"{family} family does not cover model_type {model_type!r}")
    return model_type


def require_value(hf: dict, key: str, allowed, model_type: str) -> None:
    """Raise :class:`UnsupportedConfig` when ``hf[key]`` is set to a value outside ``allowed``."""
    if key in hf and hf[key] not in allowed:
        raise UnsupportedConfig(f"{model_type}: config.json sets {key}={hf[key]!r}; cpo_jax supports {list(allowed)}")


def rope_spec(params: dict[str, Any] | None, model_type: str, key: str = "rope_parameters") -> RopeSpec:
    """Translate one HF rope parameters dict (``rope_theta``, ``rope_type``, scaling keys)."""
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfig(
            f"{model_type}: config.json {key}.rope_type={rope_type!r} is not supported; "
            f"cpo_jax supports {list(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfig(f"{model_type}: {key}.partial_rotary_factor != 1 is not supported")
    if "rope_theta" not in params:
        raise UnsupportedConfig(f"{model_type}: config.json {key} has no rope_theta")
    spec = RopeSpec(theta=float(params["rope_theta"]), rope_type=rope_type)
    if rope_type == "linear":
        spec = RopeSpec(theta=spec.theta, rope_type="linear", factor=float(params["factor"]))
    elif rope_type == "llama3":
        spec = RopeSpec(
            theta=spec.theta,
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return spec


def rope_specs(hf: dict, model_type: str) -> tuple[tuple[str, RopeSpec], ...]:
    """Per-layer-type RoPE specs from ``rope_parameters`` (flat, or keyed by layer type as in Gemma 3).

    Older configs with ``rope_theta`` / ``rope_scaling`` at the top level are read too.
    """
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        if "rope_local_base_freq" in hf:
            params = {FULL: params, SLIDING: {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}}
    if FULL in params or SLIDING in params:
        unknown = set(params) - {FULL, SLIDING}
        if unknown:
            raise UnsupportedConfig(f"{model_type}: rope_parameters has unknown layer types {sorted(unknown)}")
        return tuple((kind, rope_spec(p, model_type, f"rope_parameters.{kind}")) for kind, p in params.items())
    return ((FULL, rope_spec(params, model_type)),)


def layer_types(hf: dict, num_layers: int, model_type: str) -> tuple[str, ...]:
    """``layer_types`` from config.json, or all full attention."""
    types = hf.get("layer_types")
    if types is None:
        return (FULL,) * num_layers
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise UnsupportedConfig(f"{model_type}: layer_types contains unsupported {unknown}")
    return tuple(types)


def decoder_dims(hf: dict, default_max_positions: int) -> dict[str, Any]:
    """The :class:`TransformerConfig` size fields shared by the Llama and Gemma ``config.json`` layouts."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", default_max_positions),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )
