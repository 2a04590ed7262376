"""The FLOP count behind tokens/s -> TFLOP/s and MFU (``cpo_jax/train/flops.py``), against closed forms.

Each expected value is written out from the model's shapes (``D``, ``F``, ``L``, ``E``, ``k``...), not from the
parameter tree, so a count that includes inactive experts, packed quantised codes or the weight gradients of a
frozen base fails.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from cpo_jax.models.config import TransformerConfig
from cpo_jax.models.quantize import quantize_model
from cpo_jax.models.transformer import Transformer
from cpo_jax.train.flops import count_params, forward_flops_per_token, matmul_params, step_flops

D, F, L, V, N, K, H = 64, 96, 2, 101, 4, 2, 16
DENSE = dict(
    family="llama",
    model_type="llama",
    vocab_size=V,
    hidden_size=D,
    intermediate_size=F,
    num_layers=L,
    num_heads=N,
    num_kv_heads=K,
    head_dim=H,
)
ATTN = D * N * H * 2 + D * K * H * 2  # q, o and k, v
NORMS = 2 * D  # per layer


def _model(**changes) -> Transformer:
    return Transformer(TransformerConfig(**{**DENSE, **changes}), rngs=nnx.Rngs(0))


def test_dense_counts_match_closed_form():
    model = _model()
    total = V * D * 2 + L * (ATTN + 3 * D * F + NORMS) + D
    assert count_params(model) == total
    assert matmul_params(model.config, total) == total - V * D  # the untied embedding lookup is no matmul
    t = 32
    per_token = 2 * (total - V * D) + 4 * L * t * N * H
    assert forward_flops_per_token(model.config, total, t) == per_token
    assert step_flops(model.config, total, 10, t, reference_forward=False) == 10 * 3 * per_token
    assert step_flops(model.config, total, 10, t, reference_forward=True) == 10 * 4 * per_token


def test_frozen_base_skips_the_weight_gradients():
    cfg = _model().config
    total, t = 100_000, 16
    fwd = forward_flops_per_token(cfg, total, t)
    # forward + activation gradients (2x) + reference forward, without the base's 2N weight gradients
    expected = 8 * (4 * fwd - 2 * matmul_params(cfg, total))
    assert step_flops(cfg, total, 8, t, reference_forward=True, frozen_base=True) == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_kernels_count_their_weights_not_their_codes(kind):
    plain = count_params(_model())
    model = quantize_model(_model(), kind, block_size=16)
    assert count_params(model) == plain


@pytest.mark.parametrize("dense_layers", [(), (1,)])
def test_moe_counts_only_the_routed_experts(dense_layers):
    e, k, f = 8, 2, 24
    model = _model(
        family="moe",
        model_type="qwen3_moe",
        num_experts=e,
        experts_per_token=k,
        moe_intermediate_size=f,
        norm_topk_prob=True,
        dense_layers=dense_layers,
        dtype=jnp.float32,
    )
    sparse = L - len(dense_layers)
    mlp = sparse * (e * 3 * D * f + D * e) + len(dense_layers) * 3 * D * F
    total = V * D * 2 + L * (ATTN + NORMS) + mlp + D
    assert count_params(model) == total
    active = V * D + L * ATTN + sparse * (k * 3 * D * f + D * e) + len(dense_layers) * 3 * D * F + L * NORMS + D
    assert matmul_params(model.config, total) == active
