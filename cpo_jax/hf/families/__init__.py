"""Per-family HF translation: each module maps a ``config.json`` dict to a
:class:`~cpo_jax.models.config.TransformerConfig` (``config_from_hf``) and names the weights (``weight_table``).

The Flax modules themselves are family-independent (:mod:`cpo_jax.models.transformer`); a family here is only
data about Hugging Face's layout, so ``cpo_jax.models`` never imports this package.
"""

from __future__ import annotations

from types import ModuleType

from cpo_jax.errors import UnsupportedConfig
from cpo_jax.hf.families import gemma, gpt2, gpt_oss, llama, moe, olmo2, phi3, smollm3

FAMILIES: dict[str, ModuleType] = {
    t: module for module in (llama, gemma, gpt2, gpt_oss, moe, olmo2, phi3, smollm3) for t in module.MODEL_TYPES
}


def family_of(model_type: str) -> ModuleType:
    """The family module (``llama``, ``gemma``, ``gpt2``, ``moe``, ``olmo2``, ``phi3``...) for an HF ``model_type``."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnsupportedConfig(f"unsupported model_type {model_type!r}; cpo_jax supports {sorted(FAMILIES)}")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "family_of", "gemma", "gpt2", "gpt_oss", "llama", "moe", "olmo2", "phi3", "smollm3"]
