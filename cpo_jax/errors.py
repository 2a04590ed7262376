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

import os
import sys
import traceback
from collections.abc import Callable


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


#: Set to a true value (``1``) to print the traceback of a user error as well as its message.
DEBUG_ENV = "CPO_JAX_DEBUG"


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere on the command line (removed from it) or ``CPO_JAX_DEBUG`` set to a true value."""
    flag = "--debug" in argv
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flag or env, [a for a in argv if a != "--debug"]


def user_error_of(err: BaseException) -> UserError | None:
    """The :class:`UserError` an exception amounts to, or None for a bug (which keeps its traceback).

    Operating-system errors on a named path (permissions, a full disk, a missing file) are the user's to fix."""
    if isinstance(err, UserError):
        return err
    if isinstance(err, OSError) and err.filename is not None:
        what = err.strerror or type(err).__name__
        return UserError(
            f"{what} ({type(err).__name__})",
            where=str(err.filename),
            hint="check the path, its permissions and the free disk space",
        )
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)[:2000]:
        return UserError(
            f"out of memory: {first_line(err, 300)}",
            hint="lower data.pairs_per_batch or data.max_length, raise grad_accum, set "
            "model.remat=full, or shard over more devices (mesh.fsdp)",
        )
    return None


def report_user_error(err: BaseException, debug: bool, echo: Callable[[str], None] | None = None) -> int:
    """Prints a user error as ``error: ...`` (with its traceback when ``debug``) and returns 2; re-raises a bug.

    ``echo`` writes one message to stderr (default: ``print``); the CLI passes a coloured one."""
    user = user_error_of(err)
    if user is None:
        raise err
    if debug:
        traceback.print_exception(err)
    echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
    echo(f"error: {user}")
    if not debug:
        echo(f"  (run with --debug or {DEBUG_ENV}=1 for the traceback)")
    return 2


def run_tool(main: Callable[[], object]) -> int:
    """Runs a ``tools/`` script's ``main`` as the CLI runs a command: a user error prints a few lines and gives exit
    status 2 (``--debug`` or ``CPO_JAX_DEBUG=1``: with the traceback); a bug keeps its traceback.

    Use as ``sys.exit(run_tool(main))``; ``--debug`` is taken off ``sys.argv`` before ``main`` parses it."""
    debug, sys.argv[1:] = debug_requested(sys.argv[1:])
    try:
        main()
    except Exception as err:  # noqa: BLE001 - user errors become an exit status, bugs are re-raised
        return report_user_error(err, debug)
    return 0
