"""Records -> token ids exactly as TRL 1.x's ``DPOTrainer`` tokenises them, with an explicit truncation policy.

The rule (TRL 1.16 ``DPOTrainer._prepare_dataset``), the same for both record forms:

1. ``prompt_ids``: the prompt alone, as generation sees it: ``apply_chat_template(prompt,
   add_generation_prompt=True)`` for messages, ``tokenizer(prompt)`` (with the tokenizer's special tokens, e.g.
   BOS) for a string.
2. Each completion is tokenised *together with the prompt*: ``apply_chat_template(prompt + completion)`` for
   messages; for strings ``tokenizer(prompt + completion + eos_token)``, the end-of-sequence token appended as text
   unless the completion already ends with it.
3. The prompt part is the longest common prefix of ``prompt_ids`` with *both* full sequences (chosen and rejected
   are cut at the same point); each completion is the rest of its full sequence.

Step 3 matters when the prompt ends in whitespace (a trailing space, a blank line, a newline before indented
code): BPE merges that whitespace with the completion's first word, so ``tokenizer(prompt)`` is not a prefix of
``tokenizer(prompt + completion)``. The merged token then belongs to the completion, as in TRL. The same holds for
chat templates that render the prompt alone differently from the prompt inside the conversation. Either way the end
of ``prompt_ids`` past the common prefix is left out of the training sequence; each such record is logged with a
running count (``RecordTokenizer.prefix_mismatches``).

Truncation (:class:`TokenizeConfig`): a sequence is ``prompt + completion``, at most ``max_length``
tokens. A prompt longer than ``max_prompt_length`` is never cut: the example is dropped and counted
(:class:`Dropped`, code ``prompt_too_long``). Completions are cut to fit, keeping their start
(``keep_start``) or end (``keep_end``). A pair whose chosen and rejected ids are identical after
truncation has no preference signal: it is dropped too (code ``identical_pair``).

Work per record is bounded before tokenising (:func:`max_token_chars`, :func:`char_bound`): no token
covers more characters of text than the longest entry of the vocabulary, so a prompt with more than
``max_prompt_length * max_token_chars * CHAR_SAFETY`` characters is dropped untokenised, and a
completion is cut to ``max_length * max_token_chars * CHAR_SAFETY`` characters (from the side that
truncation discards) before it is tokenised. The cut is far beyond the last kept token, so the kept
ids are the same as without it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Any, Literal

import numpy as np

from cpo_jax.data.records import DataError, is_conversational
from cpo_jax.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

TRUNCATIONS = ("keep_start", "keep_end")
#: Characters of text per token are bounded by the longest vocabulary entry; this factor leaves room for
#: normalisers that merge characters (Unicode composition joins up to three into one).
CHAR_SAFETY = 4
#: Completion fields of each record kind.
COMPLETIONS = {"preference": ("chosen", "rejected"), "unpaired": ("completion",), "prompt_only": ()}
#: Identical pairs seen by this process (every RecordTokenizer), for the warning's running count.
_IDENTICAL_PAIRS = collections.Counter()


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Length limits and the truncation policy.

    Attributes:
      max_length: longest prompt + completion sequence, in tokens (``data.max_length``).
      max_prompt_length: longest prompt kept; longer prompts drop the example. Default ``max_length // 2``
        (``data.max_prompt_length``).
      truncation: completion truncation, ``"keep_start"`` (cut the end) or ``"keep_end"`` (cut the start)
        (``data.truncation``).
      vocab_size: the model's vocabulary; a token id at or above it is a :class:`DataError`.

    Impossible values raise :class:`ConfigError` naming the training-config key.
    """

    max_length: int = 1024
    max_prompt_length: int | None = None
    truncation: Literal["keep_start", "keep_end"] = "keep_start"
    vocab_size: int | None = None

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(
                f"truncation must be one of {list(TRUNCATIONS)}, got {self.truncation!r}",
                where="data.truncation",
                hint="keep_start cuts the end of a long completion, keep_end its start",
            )
        if self.max_length < 2:
            raise ConfigError(
                f"max_length {self.max_length} leaves no room for a prompt and a completion",
                where="data.max_length",
                hint="use at least 2 (typically 512 to 4096)",
            )
        if not 1 <= self.prompt_limit < self.max_length:
            raise ConfigError(
                f"max_prompt_length {self.prompt_limit} leaves no room in max_length {self.max_length}"
                if self.prompt_limit >= 1
                else f"max_prompt_length {self.prompt_limit} is below 1",
                where="data.max_prompt_length",
                hint=f"use a value in [1, data.max_length={self.max_length}), or leave it unset for max_length // 2",
            )

    @property
    def prompt_limit(self) -> int:
        """The effective prompt limit."""
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2


@dataclasses.dataclass(frozen=True)
class Dropped:
    """An example removed by the length policy or as an identical pair (never kept half-empty).

    ``code`` is what :func:`cpo_jax.data.audit` counts: ``prompt_too_long`` or ``identical_pair``.
    """

    source: str
    reason: str
    code: str = "prompt_too_long"


# ------------------------------------------------------------------------------------------------
# bounding the text before tokenising


def max_token_chars(tokenizer) -> int | None:
    """Characters in the longest vocabulary entry, added and special tokens included; None when the tokenizer
    has no vocabulary to read.

    An upper bound on the characters of text one token covers: byte-level BPE entries have one character per
    byte, SentencePiece entries spell their text (``▁`` for a space) or one byte (``<0x41>``), and added
    tokens match their own text.
    """
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return max((len(token) for token in vocab), default=0) or None


def char_bound(tokens: int, chars_per_token: int | None) -> int | None:
    """Characters beyond which a text surely tokenises to more than ``tokens`` tokens (None: no bound known)."""
    return None if chars_per_token is None else tokens * chars_per_token * CHAR_SAFETY


def text_chars(value: str | list[dict]) -> int:
    """Characters of a string, or of the contents of a list of messages."""
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def _clip(text: str, chars: int, truncation: str) -> str:
    """The first (``keep_start``) or last (``keep_end``) ``chars`` characters of ``text``."""
    if truncation == "keep_start":
        return text[:chars]
    return text[len(text) - chars :] if chars < len(text) else text


def clip_text(value: str | list[dict], chars: int, truncation: str) -> str | list[dict]:
    """``value`` cut to its first (``keep_start``) or last (``keep_end``) ``chars`` characters of content.

    Messages keep their roles, order and other keys; their contents are cut, and those wholly outside the kept
    characters become empty.
    """
    if isinstance(value, str):
        return _clip(value, chars, truncation)
    order = range(len(value)) if truncation == "keep_start" else reversed(range(len(value)))
    out, left = list(value), chars
    for i in order:
        kept = _clip(value[i]["content"], left, truncation)
        out[i], left = {**value[i], "content": kept}, left - len(kept)
    return out


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
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ModelError(
                "the tokenizer has no eos token; every plain-text completion ends with it",
                where=f"tokenizer {name}",
                hint='set "eos_token" in the model\'s tokenizer_config.json (the token the model ends '
                "a reply with), or use the tokenizer the model was trained with",
            )

    @functools.cached_property
    def chars_per_token(self) -> int | None:
        """:func:`max_token_chars` of the tokenizer, read once."""
        return max_token_chars(self.tokenizer)

    def bound(self, record: dict, kind: str, source: str) -> dict | Dropped:
        """``record`` with its completions cut to the characters ``max_length`` tokens can hold, or a
        :class:`Dropped` when its prompt surely has more than ``max_prompt_length`` tokens; tokenises nothing.

        Cuts remove only text past the last token that truncation keeps, so the kept ids do not change.
        """
        cfg, per_token = self.config, self.chars_per_token
        if per_token is None:
            return record
        prompt_chars = text_chars(record["prompt"])
        if prompt_chars > char_bound(cfg.prompt_limit, per_token):
            return Dropped(
                source,
                f"prompt of {prompt_chars} characters exceeds max_prompt_length {cfg.prompt_limit} "
                f"(no token of this tokenizer covers more than {per_token} characters)",
            )
        limit = char_bound(cfg.max_length, per_token)
        cut = {
            name: clip_text(record[name], limit, cfg.truncation)
            for name in COMPLETIONS[kind]
            if text_chars(record[name]) > limit
        }
        return {**record, **cut} if cut else record

    # -- pieces ------------------------------------------------------------------------------------
    def prompt_ids(self, prompt) -> list[int]:
        """Prompt ids as generation sees them (chat template with the generation prompt, or plain)."""
        if is_conversational(prompt):
            return _ids(
                self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            )
        return _ids(self.tokenizer(prompt)["input_ids"])

    def full_ids(self, prompt, completion) -> list[int]:
        """Ids of prompt and completion rendered and tokenised together (step 2 of the module docstring)."""
        if is_conversational(completion):
            return _ids(
                self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=True, return_dict=False)
            )
        eos = self.tokenizer.eos_token
        return _ids(self.tokenizer(prompt + completion + ("" if completion.endswith(eos) else eos))["input_ids"])

    def split(self, prompt, completions, source: str) -> tuple[list[int], list[list[int]]]:
        """``(prompt ids, [completion ids, ...])``: every completion cut from its full sequence at one point, the
        longest prefix that ``prompt_ids`` shares with all of them (step 3)."""
        prompt_ids = self.prompt_ids(prompt)
        full = [self.full_ids(prompt, completion) for completion in completions]
        n = min(_common_prefix(prompt_ids, ids) for ids in full)
        if n < len(prompt_ids):
            self.prefix_mismatches += 1
            if _tenfold(self.prefix_mismatches):  # the first, then the 10th, 100th, ...: every epoch repeats them
                log.warning(
                    "%s: the prompt's own ids are not a prefix of prompt + completion (%d of %d prompt tokens "
                    "match; the rest, %r, is left out of the training sequence as in TRL; %d such record(s) "
                    "so far in this process)",
                    source,
                    n,
                    len(prompt_ids),
                    self.tokenizer.decode(prompt_ids[n:]),
                    self.prefix_mismatches,
                )
        return prompt_ids[:n], [ids[n:] for ids in full]

    def sequence(self, prompt, completion, source: str) -> tuple[list[int], int]:
        """``(ids of prompt + completion, prompt length)`` of one completion, before truncation."""
        prompt_ids, (completion_ids,) = self.split(prompt, [completion], source)
        return prompt_ids + completion_ids, len(prompt_ids)

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
        """Tokenise ``(index, source, record)``: the prompt once, each completion once (with the prompt).

        Returns (int32 arrays; ``*_prompt_len`` counts the leading prompt tokens of each sequence):

        * preference: ``chosen``, ``rejected``, ``chosen_prompt_len``, ``rejected_prompt_len``, ``index``;
        * unpaired: ``completion``, ``prompt_len``, ``label``, ``index``;
        * prompt_only: ``prompt``, ``index``;

        or a :class:`Dropped` marker (``prompt_too_long``, or ``identical_pair``: chosen == rejected).
        """
        index, source, record = item
        record = self.bound(record, kind, source)
        if isinstance(record, Dropped):
            return record
        if kind == "prompt_only":
            ids = np.asarray(self.prompt_ids(record["prompt"]), np.int32)
            if len(ids) > self.config.prompt_limit:
                return Dropped(
                    source, f"prompt of {len(ids)} tokens exceeds max_prompt_length {self.config.prompt_limit}"
                )
            if self.config.vocab_size is not None and ids.size and ids.max() >= self.config.vocab_size:
                raise DataError(
                    source, f"token id {int(ids.max())} is not below the model's vocab_size {self.config.vocab_size}"
                )
            return {"prompt": ids, "index": np.int64(index)}
        out: dict[str, Any] = {"index": np.int64(index)}
        names = COMPLETIONS[kind]
        prompt_ids, completions = self.split(record["prompt"], [record[name] for name in names], source)
        for name, completion_ids in zip(names, completions):
            prompt_len = len(prompt_ids)
            fitted = self._fit(prompt_ids + completion_ids, prompt_len, source, name)
            if isinstance(fitted, Dropped):
                return fitted
            out[name] = fitted
            out[f"{name}_prompt_len" if kind == "preference" else "prompt_len"] = np.int32(prompt_len)
        if kind == "preference" and np.array_equal(out["chosen"], out["rejected"]):
            return identical_pair(source, len(out["chosen"]))
        if kind == "unpaired":
            out["label"] = np.bool_(record["label"])
        return out


def _tenfold(count: int) -> bool:
    """True for 1, 10, 100, ...: how often a repeated warning is logged."""
    return count == 10 ** (len(str(count)) - 1)


def identical_pair(source: str, length: int) -> Dropped:
    """The :class:`Dropped` marker of a pair whose chosen and rejected ids are the same.

    Its loss has zero gradient, so it is dropped and counted; the first in this process is logged as a warning,
    and then every tenfold count (10, 100, ...).
    """
    _IDENTICAL_PAIRS["seen"] += 1
    count = _IDENTICAL_PAIRS["seen"]
    if _tenfold(count):
        log.warning(
            "%s: chosen and rejected are the same %d tokens after truncation; the pair carries no "
            "preference and is dropped (%d such pair(s) so far in this process; audit() counts them all)",
            source,
            length,
            count,
        )
    return Dropped(source, f"chosen and rejected are the same {length} tokens after truncation", code="identical_pair")
