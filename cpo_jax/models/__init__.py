"""Flax NNX ports of Hugging Face causal LMs (Llama family, Gemma 1/2/3, GPT-2).

``from_pretrained(path)`` loads an HF checkpoint directory; ``save_pretrained(model, path)`` writes one
back. ``generate`` (in :mod:`cpo_jax.models.generate`) decodes with a KV cache.
"""

from cpo_jax.models.config import RopeSpec, TransformerConfig
from cpo_jax.models.hf_config import UnsupportedConfig
from cpo_jax.models.transformer import KVCache, Transformer, init_cache, positions_from_mask

_HF_API = ("FAMILIES", "config_from_hf", "from_pretrained", "read_hf_config", "save_pretrained")


def __getattr__(name: str):
    """Resolve the HF import/export API lazily (``cpo_jax.hf.pretrained`` imports the family modules)."""
    if name in _HF_API:
        from cpo_jax.hf import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'cpo_jax.models' has no attribute {name!r}")

__all__ = [
    "FAMILIES",
    "KVCache",
    "RopeSpec",
    "Transformer",
    "TransformerConfig",
    "UnsupportedConfig",
    "config_from_hf",
    "from_pretrained",
    "init_cache",
    "positions_from_mask",
    "read_hf_config",
    "save_pretrained",
]
