"""Tokenizer loading with clear errors.

:func:`load_tokenizer` wraps ``transformers.AutoTokenizer.from_pretrained`` for a local model directory (never the
Hub). transformers reports a directory without tokenizer files as "install sentencepiece or tiktoken", and a
truncated ``tokenizer.json`` as a bare JSON error without the file name; here each problem is a
:class:`~cpo_jax.errors.ModelError` naming the directory or the file (with line and column), and saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cpo_jax.errors import ModelError, UserFileNotFoundError, first_line
from cpo_jax.hf.resolve import read_json_object

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Files that hold a vocabulary: a tokenizers serialization, a SentencePiece model, BPE (GPT-2) or WordPiece files.
VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "vocab.model",
    "tokenizer.tiktoken",
)
# The JSON files of a tokenizer, checked one by one when transformers fails to load it.
JSON_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_FILES = (*VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_SAVE_HINT = (
    "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) from the original model, or save "
    "them with `tokenizer.save_pretrained(dir)`"
)


def tokenizer_files(directory: Path) -> list[str]:
    """The names of the tokenizer files in ``directory`` (``*.tiktoken`` included), sorted."""
    names = {name for name in TOKENIZER_FILES if (directory / name).is_file()}
    names.update(file.name for file in directory.glob("*.tiktoken"))
    return sorted(names)


def _has_vocab(files: list[str]) -> bool:
    return any(name in VOCAB_FILES or name.endswith(".tiktoken") for name in files)


def _diagnose(directory: Path, files: list[str], err: Exception) -> ModelError:
    """The most specific :class:`ModelError` for a failed load: a corrupt JSON file, no vocabulary, or the
    first line of transformers' message."""
    for name in JSON_FILES:
        if name in files:
            try:
                read_json_object(directory / name, hint=f"the file is damaged (a truncated download?): {_SAVE_HINT}")
            except ModelError as bad:
                return bad
    if not _has_vocab(files):
        return ModelError(
            f"the tokenizer has no vocabulary file (has {files}; expected one of {list(VOCAB_FILES[:5])}, ...)",
            where=str(directory),
            hint=_SAVE_HINT,
        )
    return ModelError(
        f"transformers cannot load the tokenizer: {first_line(err, with_type=True)}"[:400],
        where=str(directory),
        hint=f"check that the tokenizer files belong together; {_SAVE_HINT}",
    )


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)`` for a local model directory, with errors that name the problem.

    Raises:
      UserFileNotFoundError: ``path`` does not exist or is not a directory.
      ModelError: the directory has no tokenizer files or no vocabulary file; a tokenizer JSON file is not valid
        JSON (named with line and column); or transformers fails otherwise (its first message line).
    """
    directory = Path(path)
    if not directory.is_dir():
        problem = "does not exist" if not directory.exists() else "is a file, not a directory"
        raise UserFileNotFoundError(
            problem,
            where=str(directory),
            hint="give the model directory; it holds the tokenizer files (tokenizer.json, ...)",
        )
    files = tokenizer_files(directory)
    if not files:
        raise ModelError(
            f"the model directory has no tokenizer files (none of {list(TOKENIZER_FILES[:5])}, ...)",
            where=str(directory),
            hint=_SAVE_HINT,
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for bad files; each becomes a ModelError
        raise _diagnose(directory, files, err) from None
