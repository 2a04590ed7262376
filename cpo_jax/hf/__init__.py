"""Hugging Face checkpoint interop: config.json translation, weight tables, safetensors import/export, GGUF.

Import the heavy parts from their modules: ``from cpo_jax.hf.pretrained import from_pretrained, save_pretrained``
(JAX, Flax and the model code), :mod:`cpo_jax.hf.families` (per-family ``config_from_hf`` and ``weight_table``),
:mod:`cpo_jax.hf.tokenizer` and :mod:`cpo_jax.hf.resolve`. This package itself imports only NumPy: the names below
are the light ones (``gguf`` is imported inside the functions that read files).
"""

from cpo_jax.errors import UnsupportedConfig
from cpo_jax.hf.gguf import (
    gguf_state_dict,
    gguf_to_hf,
    hf_tensor_name,
    llama_config_from_gguf,
    smollm2_gguf_path,
    unpermute_rope_rows,
)
from cpo_jax.hf.weights import WeightRule

__all__ = [
    "UnsupportedConfig",
    "WeightRule",
    "gguf_state_dict",
    "gguf_to_hf",
    "hf_tensor_name",
    "llama_config_from_gguf",
    "smollm2_gguf_path",
    "unpermute_rope_rows",
]
