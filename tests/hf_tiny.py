"""Tiny random Hugging Face models, one per family and option, built locally with transformers + torch.

Weights are drawn at a larger scale than HF's init (std 0.02) and every norm/bias vector is perturbed,
so that a wrong norm offset, bias, RoPE table or mask shows up clearly in the logits.
"""

from __future__ import annotations

import functools
from pathlib import Path

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name -> (config class name, kwargs)
TINY = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2_sliding": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, num_hidden_layers=3),
    ),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1)),
    "gemma2": (
        "Gemma2Config",
        dict(
            num_hidden_layers=3,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=3,
            sliding_window=4,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                "full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=8.0),
            },
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            initializer_range=0.15,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def _config(name: str):
    import transformers

    cls_name, overrides = TINY[name]
    kwargs = {} if cls_name == "GPT2Config" else dict(COMMON)
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


def build(name: str, directory: Path, *, seed: int = 0):
    """Create, perturb and save a tiny HF model; returns the torch model (eval mode, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(name), attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    return model


@functools.cache
def _cached(name: str, root: str):
    directory = Path(root) / name
    return build(name, directory), directory


def tiny_model(name: str, root: Path):
    """``(torch model, checkpoint dir)``; built once per name and root."""
    return _cached(name, str(root))


def assert_greedy_matches_hf(hf, path, ids, mask, new: int):
    """Greedy KV-cache decoding of the port of ``path`` equals ``hf.generate(do_sample=False)`` token for token
    (``new`` tokens, ``min_new_tokens`` too so neither stops early). Returns our generation output."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.models.generate import generate

    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
        ).numpy()[:, ids.shape[1] :]
    out = generate(from_pretrained(path), jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=new, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    return out


def hf_forward(model, ids, mask, positions=None, **kwargs):
    """The PyTorch model's output on ``ids`` with ``mask`` (and ``position_ids``), gradients off."""
    import torch

    with torch.no_grad():
        kwargs["attention_mask"] = torch.tensor(mask)
        if positions is not None:
            kwargs["position_ids"] = torch.tensor(positions)
        return model(torch.tensor(ids), **kwargs)


def hf_logits(model, ids, mask, positions=None):
    """:func:`hf_forward`'s logits as float32 NumPy."""
    return hf_forward(model, ids, mask, positions).logits.float().numpy()


def max_diff(a, b, mask) -> float:
    """Largest ``|a - b|`` over the positions where ``mask`` is set (``a``, ``b``: ``[..., V]``)."""
    import numpy as np

    return float(np.abs(np.where(mask[..., None].astype(bool), a - b, 0.0)).max())


def assert_same_safetensors(expected: Path, got: Path) -> None:
    """``got`` holds exactly the tensors of ``expected`` (two safetensors files): same names, dtypes and values."""
    import numpy as np
    from safetensors.numpy import load_file

    before, after = load_file(expected), load_file(got)
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
