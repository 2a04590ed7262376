"""Typed user errors: problems the user can fix (a config value, a data row, a model directory, a checkpoint,
a path), as opposed to bugs in cpo_jax.

Every user error names *what* is wrong, *where* (``file:line``, a file and tensor, or a config key) and,
where there is one, *what to do*. The command line prints the message in a few lines and exits with
status 2 without a traceback (``CPO_JAX_DEBUG=1`` or ``--debug`` shows it); any other exception is a bug
and keeps its traceback.

Each class also derives from the built-in exception that callers of the library would catch before
these types existed (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so ``except ValueError``
keeps working.
"""

from __future__ import annotations


def first_line(err: BaseException, limit: int | None = None, *, with_type: bool = False) -> str:
    """The first line of ``err``'s message (third-party messages run to many lines), at most ``limit`` characters,
    or the exception's type name when the message is empty. ``with_type``: ``"<type>: <first line>"``."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    text = lines[0] if limit is None else lines[0][:limit]
    return f"{type(err).__name__}: {text}" if with_type else text


class UserError(Exception):
    """Base of every error the user can fix.

    Args:
      problem: what is wrong, one sentence.
      where: the file, ``file:line``, file and tensor, or config key (printed first).
      hint: what to do about it (printed on its own line).
    """

    def __init__(self, problem: str, *, where: str | None = None, hint: str | None = None):
        self.problem, self.where, self.hint = problem, where, hint
        text = f"{where}: {problem}" if where else problem
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)


class ConfigError(UserError, ValueError):
    """A config value that cannot work: unknown key, wrong type, out of range, missing path, impossible mesh."""


class DataError(UserError, ValueError):
    """A bad data file or row; ``where`` is ``file:line`` (JSONL), ``file:row N`` or the file."""

    def __init__(self, source: str, problem: str, *, hint: str | None = None):
        super().__init__(problem, where=source, hint=hint)
        self.source = source


class ModelError(UserError, ValueError):
    """A model directory that cannot be loaded: config.json, tokenizer files, safetensors tensors."""


class UnsupportedConfig(ModelError):
    """A config.json value that cpo_jax cannot honour (it is never silently ignored); names the key and its value."""


class CheckpointError(UserError, RuntimeError):
    """A run directory or checkpoint that cannot be resumed or converted safely."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A path the user gave does not exist."""


class TrainingDiverged(UserError, RuntimeError):
    """Training stopped: too many non-finite steps, or an update that exploded the parameters.

    The message says what diverged, where, and the usual causes; checkpoints on disk are intact."""
