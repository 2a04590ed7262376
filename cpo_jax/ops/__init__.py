"""Numerics shared by losses and models: log-probs of target tokens, masking."""

from cpo_jax.ops.logprobs import (
    DEFAULT_CHUNK_SIZE,
    SequenceLogps,
    chunked_token_entropy,
    chunked_token_logps,
    next_token_targets,
    reduce_sequence,
    sequence_logps,
    sequence_logps_from_hidden,
    token_logps,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SequenceLogps",
    "chunked_token_entropy",
    "chunked_token_logps",
    "next_token_targets",
    "reduce_sequence",
    "sequence_logps",
    "sequence_logps_from_hidden",
    "token_logps",
]
