"""Named built-in data sources, usable wherever a data file path is expected.

``bundled:arithmetic-train`` (256 pairs, seed 0), ``bundled:arithmetic-eval`` (64 pairs, seed 1),
``bundled:arithmetic-prompts`` (64 prompts with answers, seed 2), ``bundled:arithmetic-eval-prompts`` (64 held-out
prompts, seed 3) and ``bundled:tiny-chat`` (12 pairs).
A size can follow: ``bundled:arithmetic-train:1024``. The records are generated deterministically, so a
config that names them needs no download and no file.
"""

from __future__ import annotations

from cpo_jax.data.bundled import arithmetic_preferences, arithmetic_prompts, tiny_chat

PREFIX = "bundled:"
_SOURCES = {
    "arithmetic-train": lambda n: arithmetic_preferences(n or 256, seed=0, max_operand=50),
    "arithmetic-eval": lambda n: arithmetic_preferences(n or 64, seed=1, max_operand=50),
    "arithmetic-prompts": lambda n: arithmetic_prompts(n or 64, seed=2, max_operand=50),
    "arithmetic-eval-prompts": lambda n: arithmetic_prompts(n or 64, seed=3, max_operand=50),
    "tiny-chat": lambda n: tiny_chat()[: n or None],
}


def is_bundled(path) -> bool:
    """True for a ``bundled:<name>[:<size>]`` path."""
    return isinstance(path, str) and path.startswith(PREFIX)


def bundled_rows(path: str) -> list[tuple[str, dict]]:
    """``(source, record)`` rows of a bundled source; unknown names list what exists."""
    spec = path[len(PREFIX):]
    name, _, size = spec.partition(":")
    if name not in _SOURCES:
        raise FileNotFoundError(f"{path}: no such bundled dataset; available: {[PREFIX + n for n in _SOURCES]}")
    try:
        n = int(size) if size else None
    except ValueError:
        raise ValueError(f"{path}: the size after the name must be an integer") from None
    return [(f"{PREFIX}{name}:{i + 1}", record) for i, record in enumerate(_SOURCES[name](n))]
