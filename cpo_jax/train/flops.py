"""FLOP counts for MFU.

Matmul FLOPs only (elementwise work is ignored), per token of a row of length ``S``:

* forward: ``2 * N`` for the ``N`` non-embedding-lookup parameters (every matmul weight, the output
  projection included; in an MoE model only the ``k`` routed experts a token uses, not all ``E``; a quantised
  kernel counts its ``in * out`` weights, not its packed codes) plus attention
  ``4 * layers * S * heads * head_dim`` (q.k and p.v, counted over the full row, not halved for causality);
* training: 3x the forward (backward = 2x: gradients of the activations and of the weights); with a frozen
  base (LoRA / QLoRA) the base's weight gradients are not computed, so ``2 * N`` less; a reference forward
  (``separate``, or ``base`` with adapters) adds one more forward.

MFU = achieved FLOP/s / (peak FLOP/s per device x devices). Peak figures are dense bf16 from vendor
sheets; set ``peak_tflops_per_device`` for other devices (the CPU has none, so MFU is not reported).
"""

from __future__ import annotations

import math

import jax

from cpo_jax.models.moe import inactive_expert_params

PEAK_TFLOPS = {
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak for a ``jax.Device.device_kind`` (prefix match), or None."""
    for name, value in PEAK_TFLOPS.items():
        if device_kind.startswith(name):
            return value
    return None


def matmul_params(model_config, total_params: int) -> int:
    """Parameters a token multiplies: all, minus the embedding table when it is not tied, minus the experts an MoE
    layer does not route the token to (:func:`cpo_jax.models.moe.inactive_expert_params`)."""
    embed = model_config.vocab_size * model_config.hidden_size
    learned = (
        model_config.max_position_embeddings * model_config.hidden_size if model_config.position == "learned" else 0
    )
    inactive = inactive_expert_params(model_config) if getattr(model_config, "num_experts", 0) else 0
    return total_params - learned - (0 if model_config.tie_embeddings else embed) - inactive


def forward_flops_per_token(model_config, total_params: int, row_length: int) -> float:
    """Forward matmul FLOPs per token."""
    attention = 4 * model_config.num_layers * row_length * model_config.num_heads * model_config.head_dim
    return 2 * matmul_params(model_config, total_params) + attention


def count_params(model) -> int:
    """Weights of an NNX model (``nnx.Param`` and ``nnx.LoRAParam``), a quantised kernel counting as its unpacked
    ``in * out`` (its ``QuantizedWeight`` codes and scales are storage, not parameters)."""
    from flax import nnx

    from cpo_jax.models.layers import Linear

    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    total += sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and module.quant is not None:
            total += math.prod(module.kernel_shape)
    return total


def step_flops(
    model_config,
    total_params: int,
    tokens: int,
    row_length: int,
    *,
    reference_forward: bool,
    frozen_base: bool = False,
) -> float:
    """FLOPs of one train step over ``tokens`` tokens: policy forward and backward (no weight gradients for a
    ``frozen_base``, LoRA), plus the reference forward."""
    per_token = forward_flops_per_token(model_config, total_params, row_length)
    skipped = 2 * matmul_params(model_config, total_params) if frozen_base else 0
    return tokens * (per_token * (3 + (1 if reference_forward else 0)) - skipped)
