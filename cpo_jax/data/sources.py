"""Named built-in data sources, usable wherever a data file path is expected.

``bundled:arithmetic-train`` (256 pairs, seed 0), ``bundled:arithmetic-eval`` (64 pairs, seed 1),
``bundled:arithmetic-prompts`` (64 prompts with answers, seed 2), ``bundled:arithmetic-eval-prompts`` (64 held-out
prompts, seed 3) and ``bundled:tiny-chat`` (12 pairs).
The ``-train`` and ``-prompts`` sets draw only training questions and the two ``-eval`` sets only held-out ones
(:func:`cpo_jax.data.bundled.question_split`), so no evaluation question is ever trained on, at any size.
A size can follow: ``bundled:arithmetic-train:1024``. The records are generated deterministically, so a
config that names them needs no download and no file.
"""

from __future__ import annotations

from cpo_jax.data.bundled import arithmetic_preferences, arithmetic_prompts, tiny_chat
from cpo_jax.errors import DataError, UserFileNotFoundError

PREFIX = "bundled:"
_SOURCES = {
    "arithmetic-train": lambda n: arithmetic_preferences(n or 256, seed=0, max_operand=50, split="train"),
    "arithmetic-eval": lambda n: arithmetic_preferences(n or 64, seed=1, max_operand=50, split="eval"),
    "arithmetic-prompts": lambda n: arithmetic_prompts(n or 64, seed=2, max_operand=50, split="train"),
    "arithmetic-eval-prompts": lambda n: arithmetic_prompts(n or 64, seed=3, max_operand=50, split="eval"),
    "tiny-chat": lambda n: tiny_chat()[: n or None],
}


def is_bundled(path) -> bool:
    """True for a ``bundled:<name>[:<size>]`` path."""
    return isinstance(path, str) and path.startswith(PREFIX)


def bundled_rows(path: str) -> list[tuple[str, dict]]:
    """``(source, record)`` rows of a bundled source.

    An unknown name is a :class:`UserFileNotFoundError` listing what exists; a size that is not a positive
    integer, or more than a fixed set holds, is a :class:`DataError`.
    """
    spec = path[len(PREFIX) :]
    name, _, size = spec.partition(":")
    available = ", ".join(PREFIX + n for n in _SOURCES)
    if name not in _SOURCES:
        raise UserFileNotFoundError("no such bundled dataset", where=path, hint=f"available: {available}")
    try:
        n = int(size) if size else None
    except ValueError:
        n = 0
    if n is not None and n < 1:
        raise DataError(
            path,
            f"the size after the name, {size!r}, is not a positive integer",
            hint=f"write {PREFIX}{name}:<number of records>, or {PREFIX}{name} for the default size",
        )
    records = _SOURCES[name](n)
    if n is not None and len(records) < n:
        raise DataError(
            path,
            f"{PREFIX}{name} holds only {len(records)} records, not {n}",
            hint=f"ask for at most {len(records)}, or write {PREFIX}{name}",
        )
    return [(f"{PREFIX}{name}:{i + 1}", record) for i, record in enumerate(records)]
