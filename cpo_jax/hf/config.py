"""Helpers for reading a transformers-5 ``config.json`` strictly: unknown options are errors.

Every problem is an :class:`~cpo_jax.errors.UnsupportedConfig` (a :class:`~cpo_jax.errors.ModelError`) that names
the key and its value; :func:`located` adds the file. The family modules in :mod:`cpo_jax.hf.families` use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from cpo_jax.errors import ModelError, UnsupportedConfig
from cpo_jax.models.config import FULL, ROPE_TYPES, SLIDING, RopeSpec

SUPPORTED_ROPE_TYPES = ROPE_TYPES
_FIX_HINT = "use the config.json saved with these weights (transformers: model.config.save_pretrained(dir))"


@contextlib.contextmanager
def located(where: str | None) -> Iterator[None]:
    """Re-raise a :class:`ModelError` that has no location yet with ``where`` (the config.json path) as its location."""
    try:
        yield
    except ModelError as err:
        if where is None or err.where is not None:
            raise
        raise type(err)(err.problem, where=where, hint=err.hint) from None


#: HF ``hidden_act`` -> our activation name, for the Llama-like families (GPT-2 has its own ``gelu_new``).
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def require_model_type(hf: Mapping, model_types: tuple[str, ...], family: str) -> str:
    """``hf["model_type"]``, or :class:`UnsupportedConfig` when it is missing or ``family`` does not cover it."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedConfig(f"config.json has no model_type string (got {model_type!r})", hint=_FIX_HINT)
    if model_type not in model_types:
        raise UnsupportedConfig(f"{family} family does not cover model_type {model_type!r}")
    return model_type


def require_value(hf: Mapping, key: str, allowed, model_type: str) -> None:
    """Raise :class:`UnsupportedConfig` when ``hf[key]`` is set to a value outside ``allowed``."""
    if key not in hf:
        return
    try:
        ok = hf[key] in allowed
    except TypeError:  # an unhashable value (a list, a dict) tested against a dict of names
        ok = False
    if not ok:
        raise UnsupportedConfig(f"{model_type}: config.json sets {key}={hf[key]!r}; cpo_jax supports {list(allowed)}")


def _required(hf: Mapping, key: str, name: str, model_type: str, required: bool):
    """``hf[key]``; None when absent or null, or :class:`UnsupportedConfig` when ``required``."""
    value = hf.get(key)
    if value is None and required:
        raise UnsupportedConfig(f"{model_type}: config.json has no {name} (required)", hint=_FIX_HINT)
    return value


def int_value(
    hf: Mapping, key: str, model_type: str, *, required: bool = True, minimum: int = 1, name: str | None = None
) -> int | None:
    """``hf[key]`` as an integer ``>= minimum``; None when optional and absent or null.

    ``name`` is the key as the message shows it (``rope_parameters.factor``); it defaults to ``key``.
    Raises :class:`UnsupportedConfig` naming the key for a missing required key, a non-integer (booleans and
    floats included) or a value below ``minimum``.
    """
    name = name or key
    value = _required(hf, key, name, model_type, required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets {name}={value!r}; it must be an integer", hint=_FIX_HINT
        )
    if value < minimum:
        raise UnsupportedConfig(
            f"{model_type}: config.json sets {name}={value!r}; it must be >= {minimum}", hint=_FIX_HINT
        )
    return value


def number_value(
    hf: Mapping, key: str, model_type: str, *, required: bool = True, positive: bool = True, name: str | None = None
) -> float | None:
    """``hf[key]`` as a finite float (``> 0`` when ``positive``, else ``>= 0``); None when optional and absent."""
    name = name or key
    value = _required(hf, key, name, model_type, required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets {name}={value!r}; it must be a finite number", hint=_FIX_HINT
        )
    if value < 0 or (positive and value == 0):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets {name}={value!r}; it must be {'> 0' if positive else '>= 0'}",
            hint=_FIX_HINT,
        )
    return float(value)


def attention_dims(
    hf: Mapping, model_type: str, *, hidden: str, heads: str, kv_heads: str | None, head_dim: str | None
) -> dict[str, int]:
    """``hidden_size``, ``num_heads``, ``num_kv_heads`` and ``head_dim``, checked for consistency.

    The arguments name the keys of the family's layout (``n_embd`` / ``n_head`` for GPT-2); ``kv_heads`` and
    ``head_dim`` keys are optional in config.json (defaulting to the query heads and ``hidden // heads``).
    """
    d = int_value(hf, hidden, model_type)
    n = int_value(hf, heads, model_type)
    k = int_value(hf, kv_heads, model_type, required=False) if kv_heads else None
    k = n if k is None else k
    if n % k:
        raise UnsupportedConfig(
            f"{model_type}: config.json sets {kv_heads}={k}, which does not divide {heads}={n}", hint=_FIX_HINT
        )
    h = int_value(hf, head_dim, model_type, required=False) if head_dim else None
    if h is None:
        if d % n:
            raise UnsupportedConfig(
                f"{model_type}: config.json sets {hidden}={d}, which is not divisible by "
                f"{heads}={n}" + (f" (and has no {head_dim})" if head_dim else ""),
                hint=_FIX_HINT,
            )
        h = d // n
    return dict(hidden_size=d, num_heads=n, num_kv_heads=k, head_dim=h)


def rope_spec(
    params: Any,
    model_type: str,
    key: str = "rope_parameters",
    *,
    max_position_embeddings: int | None = None,
    head_dim: int | None = None,
    original_max_position_embeddings: int | None = None,
    nested: bool = False,
) -> RopeSpec:
    """Translate one HF rope parameters dict (``rope_theta``, ``rope_type``, scaling keys).

    Follows transformers 5's standardisation and ``ROPE_INIT_FUNCTIONS``: ``original_max_position_embeddings``
    (``llama3``, ``yarn``, ``longrope``) is the argument when given (a top-level key, which HF prefers), else the
    entry's own, else ``max_position_embeddings``; ``dynamic`` grows past ``max_position_embeddings``; a null
    ``factor`` of ``yarn`` / an absent one of ``longrope`` is ``max_position_embeddings / original``. Inside a
    per-layer-type dict (``nested``) HF ignores ``truncate`` (it reads the outer dict), so it is True there.
    ``head_dim`` checks the length of ``longrope``'s factor lists.
    """
    if not isinstance(params, Mapping):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets {key}={params!r}; it must be an object", hint=_FIX_HINT
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfig(
            f"{model_type}: config.json {key}.rope_type={rope_type!r} is not supported; "
            f"cpo_jax supports {list(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfig(f"{model_type}: {key}.partial_rotary_factor != 1 is not supported")

    def number(name: str, *, required: bool = True, positive: bool = True) -> float | None:
        return number_value(params, name, model_type, required=required, positive=positive, name=f"{key}.{name}")

    def max_positions() -> int:
        if max_position_embeddings is None:
            raise UnsupportedConfig(
                f"{model_type}: config.json has no max_position_embeddings (required by {key}.rope_type={rope_type!r})",
                hint=_FIX_HINT,
            )
        return max_position_embeddings

    def original() -> int:
        if original_max_position_embeddings is not None:
            return original_max_position_embeddings
        own = int_value(
            params,
            "original_max_position_embeddings",
            model_type,
            required=False,
            name=f"{key}.original_max_position_embeddings",
        )
        return max_positions() if own is None else own

    theta = number("rope_theta")
    if rope_type == "default":
        return RopeSpec(theta=theta)
    if rope_type in ("linear", "dynamic"):
        spec = RopeSpec(theta=theta, rope_type=rope_type, factor=number("factor"))
        if rope_type == "dynamic":
            spec = dataclasses.replace(spec, original_max_position_embeddings=max_positions())
        return spec
    if rope_type == "llama3":
        spec = RopeSpec(
            theta=theta,
            rope_type="llama3",
            factor=number("factor"),
            low_freq_factor=number("low_freq_factor"),
            high_freq_factor=number("high_freq_factor"),
            original_max_position_embeddings=original(),
        )
        if spec.high_freq_factor <= spec.low_freq_factor:
            raise UnsupportedConfig(
                f"{model_type}: config.json {key} has high_freq_factor="
                f"{spec.high_freq_factor} <= low_freq_factor={spec.low_freq_factor}",
                hint=_FIX_HINT,
            )
        return spec
    if rope_type == "yarn":
        if "factor" not in params:  # HF: a required key, though it may be null
            raise UnsupportedConfig(f"{model_type}: config.json has no {key}.factor (required)", hint=_FIX_HINT)
        orig = original()
        factor = number("factor", required=False)
        truncate = params.get("truncate", True)
        if truncate is not None and not isinstance(truncate, bool):
            raise UnsupportedConfig(
                f"{model_type}: config.json sets {key}.truncate={truncate!r}; it must be true or false", hint=_FIX_HINT
            )
        return RopeSpec(
            theta=theta,
            rope_type="yarn",
            factor=max_positions() / orig if factor is None else factor,
            original_max_position_embeddings=orig,
            beta_fast=number("beta_fast", required=False, positive=False) or 32.0,  # HF: `or 32`
            beta_slow=number("beta_slow", required=False, positive=False) or 1.0,
            truncate=True if nested else bool(truncate),
            attention_factor=number("attention_factor", required=False),
            mscale=number("mscale", required=False, positive=False),
            mscale_all_dim=number("mscale_all_dim", required=False, positive=False),
        )
    # longrope
    short = _factor_list(params, "short_factor", key, model_type, head_dim)
    long = _factor_list(params, "long_factor", key, model_type, head_dim)
    orig = original()
    factor = number("factor", required=False)
    return RopeSpec(
        theta=theta,
        rope_type="longrope",
        factor=max_positions() / orig if factor is None else factor,
        original_max_position_embeddings=orig,
        attention_factor=number("attention_factor", required=False),
        short_factor=short,
        long_factor=long,
    )


def _factor_list(params: Mapping, name: str, key: str, model_type: str, head_dim: int | None) -> tuple[float, ...]:
    """``longrope``'s ``short_factor`` / ``long_factor``: ``head_dim // 2`` positive numbers."""
    value = params.get(name)
    if value is None:
        raise UnsupportedConfig(
            f"{model_type}: config.json has no {key}.{name} (required by rope_type 'longrope')", hint=_FIX_HINT
        )
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in value
    ):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets {key}.{name}={value!r}; it must be a list of positive numbers",
            hint=_FIX_HINT,
        )
    if head_dim is not None and len(value) != head_dim // 2:
        raise UnsupportedConfig(
            f"{model_type}: config.json sets {key}.{name} with {len(value)} entries; it needs head_dim // 2 = "
            f"{head_dim // 2}",
            hint=_FIX_HINT,
        )
    return tuple(float(x) for x in value)


def rope_specs(
    hf: Mapping, model_type: str, *, max_position_embeddings: int | None = None, head_dim: int | None = None
) -> tuple[tuple[str, RopeSpec], ...]:
    """Per-layer-type RoPE specs from ``rope_parameters`` (flat, or keyed by layer type as in Gemma 3).

    Older configs with ``rope_theta`` / ``rope_scaling`` at the top level are read too. ``max_position_embeddings``
    and ``head_dim`` default to config.json's (``hidden_size // num_attention_heads`` without ``head_dim``); a
    top-level ``original_max_position_embeddings`` (Phi-3) overrides a flat dict's, as in transformers.
    """
    if max_position_embeddings is None:
        max_position_embeddings = int_value(hf, "max_position_embeddings", model_type, required=False)
    if head_dim is None:
        head_dim = hf.get("head_dim")
        if not isinstance(head_dim, int) or isinstance(head_dim, bool):
            hidden, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
            head_dim = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
    sizes = dict(max_position_embeddings=max_position_embeddings, head_dim=head_dim)
    params = hf.get("rope_parameters")
    if params is None:
        scaling = hf.get("rope_scaling") or {}
        if not isinstance(scaling, Mapping):
            raise UnsupportedConfig(
                f"{model_type}: config.json sets rope_scaling={scaling!r}; it must be an object", hint=_FIX_HINT
            )
        params = dict(scaling)
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        if "rope_local_base_freq" in hf:
            params = {FULL: params, SLIDING: {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}}
    if not isinstance(params, Mapping):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets rope_parameters={params!r}; it must be an object", hint=_FIX_HINT
        )
    if FULL in params or SLIDING in params:
        unknown = set(params) - {FULL, SLIDING}
        if unknown:
            raise UnsupportedConfig(f"{model_type}: rope_parameters has unknown layer types {sorted(unknown)}")
        return tuple(
            (kind, rope_spec(p, model_type, f"rope_parameters.{kind}", nested=True, **sizes))
            for kind, p in params.items()
        )
    top = int_value(hf, "original_max_position_embeddings", model_type, required=False)
    return ((FULL, rope_spec(params, model_type, original_max_position_embeddings=top, **sizes)),)


def layer_types(hf: Mapping, num_layers: int, model_type: str) -> tuple[str, ...]:
    """``layer_types`` from config.json (one per layer), or all full attention."""
    types = hf.get("layer_types")
    if types is None:
        return (FULL,) * num_layers
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise UnsupportedConfig(
            f"{model_type}: config.json sets layer_types={types!r}; it must be a list of strings", hint=_FIX_HINT
        )
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise UnsupportedConfig(f"{model_type}: layer_types contains unsupported {unknown}")
    if len(types) != num_layers:
        raise UnsupportedConfig(
            f"{model_type}: config.json lists {len(types)} layer_types for num_hidden_layers={num_layers}",
            hint=_FIX_HINT,
        )
    return tuple(types)


def sliding_window(hf: Mapping, types: tuple[str, ...], model_type: str) -> int | None:
    """``sliding_window`` (a positive integer) when some layer slides, else None."""
    if SLIDING not in types:
        return None
    return int_value(hf, "sliding_window", model_type)


def decoder_dims(hf: Mapping, default_max_positions: int, model_type: str) -> dict[str, Any]:
    """The :class:`TransformerConfig` size fields shared by the Llama and Gemma ``config.json`` layouts, validated."""
    max_positions = int_value(hf, "max_position_embeddings", model_type, required=False)
    eps = number_value(hf, "rms_norm_eps", model_type, required=False, positive=False)
    return dict(
        vocab_size=int_value(hf, "vocab_size", model_type),
        intermediate_size=int_value(hf, "intermediate_size", model_type),
        num_layers=int_value(hf, "num_hidden_layers", model_type),
        **attention_dims(
            hf,
            model_type,
            hidden="hidden_size",
            heads="num_attention_heads",
            kv_heads="num_key_value_heads",
            head_dim="head_dim",
        ),
        max_position_embeddings=default_max_positions if max_positions is None else max_positions,
        norm_eps=1e-6 if eps is None else eps,
    )


def padding_row(hf: Mapping, vocab_size: int) -> int | None:
    """The row HF's ``nn.Embedding(vocab_size, hidden, padding_idx=pad_token_id)`` freezes, or None.

    ``pad_token_id`` may be absent or null (no frozen row); a negative id counts from the end, as in PyTorch."""
    pad = hf.get("pad_token_id")
    if pad is None or isinstance(pad, bool) or not isinstance(pad, int) or not -vocab_size <= pad < vocab_size:
        return None
    return pad % vocab_size
