"""Hugging Face checkpoint interop: declarative weight tables and the GGUF -> HF safetensors converter.

``from_pretrained`` / ``save_pretrained`` live in :mod:`cpo_jax.hf.pretrained` and are re-exported from
:mod:`cpo_jax.models`.
"""

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
    "WeightRule",
    "gguf_state_dict",
    "gguf_to_hf",
    "hf_tensor_name",
    "llama_config_from_gguf",
    "smollm2_gguf_path",
    "unpermute_rope_rows",
]
