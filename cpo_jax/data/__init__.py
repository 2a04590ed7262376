"""Preference data: records -> tokens -> fixed-shape batches (grain), plus bundled datasets.

Knows nothing about models. See ``docs/data.md``.
"""

from cpo_jax.data.batching import BatchConfig, BatchIterDataset, default_buckets
from cpo_jax.data.bundled import (
    arithmetic_candidates,
    arithmetic_preferences,
    arithmetic_prompts,
    score_arithmetic,
    tiny_chat,
)
from cpo_jax.data.pipeline import DataReport, PipelineConfig, audit, build_dataset, tokenized_dataset
from cpo_jax.data.records import DataError, RecordSet, extract_prompt, load_records, validate, write_jsonl
from cpo_jax.data.tfds_builder import build_tfds_from_files, build_tfds_splits, tfds_records
from cpo_jax.data.tokenize import Dropped, RecordTokenizer, TokenizeConfig
from cpo_jax.data.tokenizers import byte_chat_tokenizer

__all__ = [
    "BatchConfig",
    "BatchIterDataset",
    "DataError",
    "DataReport",
    "Dropped",
    "PipelineConfig",
    "RecordSet",
    "RecordTokenizer",
    "TokenizeConfig",
    "arithmetic_candidates",
    "arithmetic_preferences",
    "arithmetic_prompts",
    "audit",
    "build_dataset",
    "build_tfds_from_files",
    "build_tfds_splits",
    "byte_chat_tokenizer",
    "default_buckets",
    "extract_prompt",
    "load_records",
    "score_arithmetic",
    "tfds_records",
    "tiny_chat",
    "tokenized_dataset",
    "validate",
    "write_jsonl",
]
