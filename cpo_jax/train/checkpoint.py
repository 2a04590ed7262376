"""Orbax checkpoints of the train state, the data-iterator state and the resolved config.

``CheckpointManager`` saves asynchronously, keeps the last ``keep`` steps, and writes each step into a
temporary directory that is renamed only once complete, so a kill during a save leaves the previous
checkpoint as the latest restorable one. Restoring takes an abstract state carrying the *current*
shardings, so a run can resume on a different mesh shape from the one that saved.

The data state is per host: each process reads its own shard, so ``save`` gathers every process's state
(``{"hosts": [state_0, state_1, ...]}``) and ``restore`` hands each process its own entry back.

A damaged checkpoint (truncated array files, a lost or garbled metadata file, a missing item) never blocks a
resume: :meth:`Checkpointer.restore_latest` falls back to the newest intact step and moves each damaged newer one,
never deleting it, into the sibling folder ``<checkpoints>_damaged/`` (``output_dir/checkpoints_damaged/<step>``).
When no step is intact it raises :class:`~cpo_jax.errors.CheckpointError` and moves nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cpo_jax.errors import CheckpointError, first_line
from cpo_jax.parallel.multihost import any_process, gather_json

log = logging.getLogger(__name__)


def abstract_with_shardings(tree, shardings):
    """``ShapeDtypeStruct``s of ``tree`` placed as ``shardings`` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def set_aside_path(damaged_dir: Path, step: int) -> Path:
    """A free path ``damaged_dir/<step>`` for a damaged step, or ``<step>.<timestamp>[.<n>]`` when that is taken."""
    target = damaged_dir / str(step)
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    while target.exists():
        n += 1
        target = damaged_dir / (f"{step}.{stamp}" if n == 1 else f"{step}.{stamp}.{n}")
    return target


def all_finite(tree) -> bool:
    """True when every floating leaf of ``tree`` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    return bool(all(np.asarray(jax.numpy.all(jax.numpy.isfinite(x))) for x in leaves))


class Checkpointer:
    """Save/restore ``(state, data_state, config)`` under ``directory/<step>``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = True) -> None:
        """Start saving ``step`` (asynchronously); refuses a state with non-finite parameters.

        Every process must call it: ``data_state`` is this process's, and all of them are stored."""
        if not all_finite(state.params):
            raise FloatingPointError(f"refusing to checkpoint step {step}: the parameters are not all finite")
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"hosts": gather_json(data_state)}),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    @property
    def damaged_directory(self) -> Path:
        """Where damaged steps are moved: the sibling ``<checkpoints>_damaged`` of the manager's directory."""
        return self.directory.with_name(self.directory.name + "_damaged")

    def step_directory(self, step: int) -> Path:
        """The directory of saved ``step``."""
        return self.directory / str(step)

    def read_config(self, step: int) -> dict:
        """The config stored with ``step``; :class:`CheckpointError` naming the step directory when unreadable."""
        try:
            config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as err:  # noqa: BLE001 - any failure to read the item means a damaged step
            raise self._damaged(step, f"its config cannot be read ({first_line(err, 300, with_type=True)})") from err
        if not isinstance(config, dict):
            raise self._damaged(step, f"its stored config is a {type(config).__name__}, not a JSON object")
        return config

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """``(state, data_state, config)`` of ``step``, the state placed as ``abstract_state`` says.

        Raises :class:`CheckpointError` naming the step directory when the step cannot be read."""
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(),
                ),
            )
            return out.state, self._own_data_state(out.data, step), out.config
        except Exception as err:  # noqa: BLE001 - any failure to read the step means a damaged (or foreign) step
            raise self._damaged(step, f"it cannot be restored ({first_line(err, 300, with_type=True)})") from err

    def _damaged(self, step: int, reason: str) -> CheckpointError:
        """The error of an unreadable ``step``; ``reason`` (one line) is kept as its ``reason`` attribute."""
        err = CheckpointError(
            f"checkpoint step {step} is damaged: {reason}",
            where=str(self.step_directory(step)),
            hint=f"restore another kept step (kept: {sorted(self.manager.all_steps())})",
        )
        err.reason = reason
        return err

    @staticmethod
    def _own_data_state(saved: dict, step: int) -> dict:
        if not (isinstance(saved, dict) and set(saved) == {"hosts"}):
            return saved  # written before data states were stored per host
        hosts, index = saved["hosts"], jax.process_index()
        if len(hosts) != jax.process_count():
            log.warning(
                "checkpoint %d was written by %d processes and is restored on %d: the hosts' data shards "
                "differ, so every host resumes from host 0's data position",
                step,
                len(hosts),
                jax.process_count(),
            )
            index = 0
        return hosts[index]

    def restore_latest(
        self, state, shardings, *, check_config: Callable[[dict, int], None] | None = None
    ) -> tuple[int, Any, dict | None]:
        """``(step, state, data_state)`` of the newest intact checkpoint placed as ``shardings``, or
        ``(0, state, None)`` when there is none.

        Steps are tried newest first. For each, the stored config is read and passed to
        ``check_config(saved_config, step)`` when given; whatever that raises propagates unchanged (a refusal to
        resume, not damage). Then the state and data items are restored. A step whose config, state or data cannot
        be read (on any process) is damaged: it is logged, and once an intact step is found every damaged newer
        one is moved into :attr:`damaged_directory` (process 0 moves; nothing is deleted).

        Raises :class:`CheckpointError` naming every step and its reason, moving nothing, when steps exist but
        none is intact. Every process must call it.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return 0, state, None
        abstract = abstract_with_shardings(state, shardings)
        damaged: list[tuple[int, str]] = []
        for step in steps:
            saved, reason = self._attempt(self.read_config, step)
            if reason is None:
                if check_config is not None:
                    check_config(saved, step)
                restored, reason = self._attempt(self.restore, step, abstract)
            if reason is not None:
                log.warning("checkpoint %s is damaged and cannot be resumed: %s", self.step_directory(step), reason)
                damaged.append((step, reason))
                continue
            self._set_aside([s for s, _ in damaged])
            if damaged:
                log.warning("resuming from step %d, the newest intact checkpoint in %s", step, self.directory)
            state, data_state, _ = restored
            return step, state, data_state
        reasons = "\n".join(f"    step {s}: {reason}" for s, reason in damaged)
        raise CheckpointError(
            f"no checkpoint can be restored; every saved step is damaged:\n{reasons}",
            where=str(self.directory),
            hint="move the run directory away or set a new output_dir to start afresh; the damaged checkpoints are "
            "kept for inspection",
        )

    @staticmethod
    def _attempt(read: Callable, step: int, *args) -> tuple[Any, str | None]:
        """``(read(step, *args), None)``, or ``(None, reason)`` when the step is damaged on this or any process
        (a collective: every process agrees on whether the step is intact)."""
        try:
            value, reason = read(step, *args), None
        except CheckpointError as err:
            value, reason = None, getattr(err, "reason", err.problem)
        if any_process(reason is not None) and reason is None:
            value, reason = None, "it cannot be read on another process"
        return value, reason

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged ``steps`` out of the manager's directory (process 0) and refresh the manager's step list."""
        if not steps:
            return
        if jax.process_index() == 0:
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = set_aside_path(self.damaged_directory, step)
                shutil.move(self.step_directory(step), target)
                log.warning(
                    "moved the damaged checkpoint %s to %s (kept for inspection)", self.step_directory(step), target
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("cpo_jax.checkpoint.set_aside")
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.close()
