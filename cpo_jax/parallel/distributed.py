"""Multi-host start-up: ``jax.distributed.initialize`` from arguments, config or environment.

Environment variables (used when an argument is None): ``CPO_JAX_COORDINATOR`` (``host:port``),
``CPO_JAX_NUM_PROCESSES``, ``CPO_JAX_PROCESS_ID``. With none of them set, JAX's own cluster detection
runs (TPU pods, SLURM, ...), or nothing happens for a single process. On CPU the cross-process
collectives use gloo.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    cluster_detection: bool = False,
) -> bool:
    """Join (or skip) a multi-process JAX run. Returns True when running with more than one process.

    Call it before any other JAX call.
    """
    coordinator_address = coordinator_address or os.environ.get("CPO_JAX_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("CPO_JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("CPO_JAX_PROCESS_ID")
    explicit = coordinator_address is not None
    if not explicit and not cluster_detection:
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            "a coordinator address needs num_processes and process_id "
            "(arguments or CPO_JAX_NUM_PROCESSES / CPO_JAX_PROCESS_ID)"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    else:
        jax.distributed.initialize()
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1
