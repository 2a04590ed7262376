"""Orbax checkpoints of the train state, the data-iterator state and the resolved config.

``CheckpointManager`` saves asynchronously, keeps the last ``keep`` steps, and writes each step into a
temporary directory that is renamed only once complete, so a kill during a save leaves the previous
checkpoint as the latest restorable one. Restoring takes an abstract state carrying the *current*
shardings, so a run can resume on a different mesh shape from the one that saved.

The data state is per host: each process reads its own shard, so ``save`` gathers every process's state
(``{"hosts": [state_0, state_1, ...]}``) and ``restore`` hands each process its own entry back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cpo_jax.parallel.multihost import gather_json

log = logging.getLogger(__name__)


def abstract_with_shardings(tree, shardings):
    """``ShapeDtypeStruct``s of ``tree`` placed as ``shardings`` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"hosts": gather_json(data_state)}),
            config=ocp.args.JsonSave(config),
        ), force=force)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """``(state, data_state, config)`` of ``step``, the state placed as ``abstract_state`` says."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ))
        return out.state, self._own_data_state(out.data, step), out.config

    @staticmethod
    def _own_data_state(saved: dict, step: int) -> dict:
        if not (isinstance(saved, dict) and set(saved) == {"hosts"}):
            return saved  # written before data states were stored per host
        hosts, index = saved["hosts"], jax.process_index()
        if len(hosts) != jax.process_count():
            log.warning("checkpoint %d was written by %d processes and is restored on %d: the hosts' data shards "
                        "differ, so every host resumes from host 0's data position", step, len(hosts),
                        jax.process_count())
            index = 0
        return hosts[index]

    def restore_latest(self, state, shardings) -> tuple[int, Any, dict | None]:
        """``(step, state, data_state)`` of the newest checkpoint placed as ``shardings``, or ``(0, state, None)``."""
        step = self.latest_step()
        if not step:
            return 0, state, None
        restored, data_state, _ = self.restore(step, abstract_with_shardings(state, shardings))
        return step, restored, data_state

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.close()
