"""FLOP counts for MFU.

Matmul FLOPs only (elementwise work is ignored), per token of a row of length ``S``:

* forward: ``2 * N`` for the ``N`` non-embedding-lookup parameters (every matmul weight, the output
  projection included) plus attention ``4 * layers * S * heads * head_dim`` (q.k and p.v, counted over
  the full row, not halved for causality);
* training: 3x the forward (backward = 2x); a ``separate`` reference adds one more forward.

MFU = achieved FLOP/s / (peak FLOP/s per device x devices). Peak figures are dense bf16 from vendor
sheets; set ``peak_tflops_per_device`` for other devices (the CPU has none, so MFU is not reported).
"""

from __future__ import annotations

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
    """Parameters that take part in matmuls: all, minus the embedding table when it is not tied."""
    embed = model_config.vocab_size * model_config.hidden_size
    learned = (
        model_config.max_position_embeddings * model_config.hidden_size if model_config.position == "learned" else 0
    )
    return total_params - learned - (0 if model_config.tie_embeddings else embed)


def forward_flops_per_token(model_config, total_params: int, row_length: int) -> float:
    """Forward matmul FLOPs per token."""
    attention = 4 * model_config.num_layers * row_length * model_config.num_heads * model_config.head_dim
    return 2 * matmul_params(model_config, total_params) + attention


def step_flops(model_config, total_params: int, tokens: int, row_length: int, *, reference_forward: bool) -> float:
    """FLOPs of one train step over ``tokens`` tokens (policy fwd+bwd, plus the reference forward)."""
    per_token = forward_flops_per_token(model_config, total_params, row_length)
    return tokens * per_token * (3 + (1 if reference_forward else 0))
