"""Flax NNX decoder for Hugging Face causal LMs (Llama family, Gemma 1/2/3, GPT-2), as one config-driven module.

The families differ only in :class:`TransformerConfig` switches. Reading and writing HF checkpoints
(``config.json`` translation, weight tables, ``from_pretrained`` / ``save_pretrained``) is :mod:`cpo_jax.hf`'s
job: ``cpo_jax.hf`` imports this package, never the other way round. ``generate`` (in
:mod:`cpo_jax.models.generate`) decodes with a KV cache.
"""

from cpo_jax.models.config import RopeSpec, TransformerConfig
from cpo_jax.models.transformer import KVCache, Transformer, init_cache, positions_from_mask

__all__ = [
    "KVCache",
    "RopeSpec",
    "Transformer",
    "TransformerConfig",
    "init_cache",
    "positions_from_mask",
]
