"""A tiny HF Llama with the byte-level chat tokenizer (vocab 260), and arithmetic preference files."""

from __future__ import annotations

from pathlib import Path

from cpo_jax.data import arithmetic_preferences, byte_chat_tokenizer, write_jsonl


def tiny_policy(directory: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32, intermediate: int = 64) -> Path:
    """Save a random tiny Llama (D=``hidden``, 4 heads, 2 kv heads) and the byte tokenizer into ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=260,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=3,
        pad_token_id=0,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
    byte_chat_tokenizer().save_pretrained(directory)
    return directory


def arithmetic_files(directory: Path, *, train: int = 64, eval: int = 16) -> tuple[Path, Path]:
    """Train and eval JSONL files of the bundled arithmetic preferences."""
    return (
        write_jsonl(arithmetic_preferences(train, seed=0, max_operand=20), directory / "train.jsonl"),
        write_jsonl(arithmetic_preferences(eval, seed=1, max_operand=20), directory / "eval.jsonl"),
    )
