"""Records -> token ids, the way TRL does it, with an explicit truncation policy.

* Conversational records use the tokenizer's chat template:
  ``prompt_ids = apply_chat_template(prompt, add_generation_prompt=True)`` and the completion is the
  rest of ``apply_chat_template(prompt + completion)``. When the template does not reproduce the
  prompt ids as a prefix (some BPE merges cross the boundary), the sequence is the full templated
  conversation and the prompt part is its longest common prefix with ``prompt_ids``; each such case is
  logged with a running count.
* Standard (string) records: ``tokenizer(prompt)`` (with the tokenizer's special tokens, e.g. BOS) and
  ``tokenizer(completion, add_special_tokens=False) + [eos]``.

Truncation (:class:`TokenizeConfig`): a sequence is ``prompt + completion``, at most ``max_length``
tokens. A prompt longer than ``max_prompt_length`` is never cut: the example is dropped and counted
(:class:`Dropped`). Completions are cut to fit, keeping their start (``keep_start``) or end
(``keep_end``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np

from cpo_jax.data.records import DataError, is_conversational

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Length limits and the truncation policy.

    Attributes:
      max_length: longest prompt + completion sequence, in tokens.
      max_prompt_length: longest prompt kept; longer prompts drop the example. Default ``max_length // 2``.
      truncation: completion truncation, ``"keep_start"`` (cut the end) or ``"keep_end"`` (cut the start).
      vocab_size: the model's vocabulary; a token id at or above it is a :class:`DataError`.
    """

    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation: Literal["keep_start", "keep_end"] = "keep_start"
    vocab_size: int | None = None

    def __post_init__(self):
        if self.truncation not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation must be 'keep_start' or 'keep_end', got {self.truncation!r}")
        if self.prompt_limit >= self.max_length:
            raise ValueError(f"max_prompt_length {self.prompt_limit} leaves no room in max_length {self.max_length}")

    @property
    def prompt_limit(self) -> int:
        """The effective prompt limit."""
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2


@dataclasses.dataclass(frozen=True)
class Dropped:
    """An example removed by the length policy (never kept half-empty)."""

    source: str
    reason: str
    code: str = "prompt_too_long"


def _ids(result: Any) -> list[int]:
    """``apply_chat_template`` / ``__call__`` output -> a flat list of ids."""
    if hasattr(result, "keys"):
        result = result["input_ids"]
    return list(result)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class RecordTokenizer:
    """Tokenises validated records (see :mod:`cpo_jax.data.records`) into int32 id arrays.

    Picklable (it holds the HF tokenizer and the config), so grain worker processes can run it.
    """

    def __init__(self, tokenizer, config: TokenizeConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.prefix_mismatches = 0
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; plain-text completions need one")

    # -- pieces ------------------------------------------------------------------------------------
    def prompt_ids(self, prompt) -> list[int]:
        """Prompt ids as generation sees them (chat template with the generation prompt, or plain)."""
        if is_conversational(prompt):
            return _ids(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        return _ids(self.tokenizer(prompt)["input_ids"])

    def sequence(self, prompt, completion, source: str, prompt_ids: list[int] | None = None) -> tuple[list[int], int]:
        """``(ids of prompt + completion, prompt length)`` before truncation (``prompt_ids`` if precomputed)."""
        prompt_ids = self.prompt_ids(prompt) if prompt_ids is None else prompt_ids
        if is_conversational(completion):
            full = _ids(self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=True,
                                                           return_dict=False))
            n = _common_prefix(prompt_ids, full)
            if n < len(prompt_ids):
                self.prefix_mismatches += 1
                log.warning("%s: chat template does not reproduce the prompt ids as a prefix (%d of %d prompt "
                            "tokens match; %d mismatch(es) so far in this process)", source, n, len(prompt_ids),
                            self.prefix_mismatches)
            return full, n
        completion_ids = _ids(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        return prompt_ids + completion_ids + [self.tokenizer.eos_token_id], len(prompt_ids)

    def _fit(self, ids: list[int], prompt_len: int, source: str, what: str) -> np.ndarray | Dropped:
        cfg = self.config
        if prompt_len > cfg.prompt_limit:
            return Dropped(source, f"prompt of {prompt_len} tokens exceeds max_prompt_length {cfg.prompt_limit}")
        if len(ids) == prompt_len:
            raise DataError(source, f"the {what} completion tokenises to nothing")
        if len(ids) > cfg.max_length:
            room = cfg.max_length - prompt_len
            completion = ids[prompt_len:]
            completion = completion[:room] if cfg.truncation == "keep_start" else completion[-room:]
            ids = ids[:prompt_len] + completion
        array = np.asarray(ids, np.int32)
        if cfg.vocab_size is not None and array.size and array.max() >= cfg.vocab_size:
            bad = int(array[array >= cfg.vocab_size][0])
            raise DataError(source, f"token id {bad} is not below the model's vocab_size {cfg.vocab_size}")
        return array

    # -- records -----------------------------------------------------------------------------------
    def __call__(self, item: tuple[int, str, dict], kind: str = "preference") -> dict | Dropped:
        """Tokenise ``(index, source, record)``.

        Returns (int32 arrays; ``*_prompt_len`` counts the leading prompt tokens of each sequence):

        * preference: ``chosen``, ``rejected``, ``chosen_prompt_len``, ``rejected_prompt_len``, ``index``;
        * unpaired: ``completion``, ``prompt_len``, ``label``, ``index``;
        * prompt_only: ``prompt``, ``index``;

        or a :class:`Dropped` marker.
        """
        index, source, record = item
        if kind == "prompt_only":
            ids = np.asarray(self.prompt_ids(record["prompt"]), np.int32)
            if len(ids) > self.config.prompt_limit:
                return Dropped(source, f"prompt of {len(ids)} tokens exceeds max_prompt_length "
                                       f"{self.config.prompt_limit}")
            if self.config.vocab_size is not None and ids.size and ids.max() >= self.config.vocab_size:
                raise DataError(source, f"token id {int(ids.max())} is not below the model's vocab_size "
                                        f"{self.config.vocab_size}")
            return {"prompt": ids, "index": np.int64(index)}
        out: dict[str, Any] = {"index": np.int64(index)}
        names = ("chosen", "rejected") if kind == "preference" else ("completion",)
        prompt_ids = self.prompt_ids(record["prompt"])
        for name in names:
            ids, prompt_len = self.sequence(record["prompt"], record[name], source, prompt_ids)
            fitted = self._fit(ids, prompt_len, source, name)
            if isinstance(fitted, Dropped):
                return fitted
            out[name] = fitted
            out[f"{name}_prompt_len" if kind == "preference" else "prompt_len"] = np.int32(prompt_len)
        if kind == "unpaired":
            out["label"] = np.bool_(record["label"])
        return out
