"""Moving batches between each process's host memory and global arrays on the mesh.

One process (one host) sees only its addressable devices. These helpers are the three crossings a
trainer needs, and each is the identity-like single-host operation when ``jax.process_count() == 1``:

* :func:`host_to_global`: every process passes its own rows; the global array is their concatenation
  along the batch axis (process ``p``'s rows on process ``p``'s devices).
* :func:`host_value_to_global`: every process passes the *same* full value (e.g. rewards every host
  computed for the whole batch); each device takes its slice.
* :func:`global_to_host`: the full value of a (possibly multi-host) global array on every process.

:func:`gather_json` collects one small JSON value per process (each host's data-iterator state).
:func:`lockstep` keeps collective calls matched when processes hold different amounts of data (a
finite evaluation split whose host shards differ by a batch): a process that has run out repeats its last
batch with every example masked out until all have.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cpo_jax.parallel.sharding import Rules, logical_spec

_NAMES = ("batch", "length")


def host_to_global(
    local: np.ndarray,
    mesh: Mesh,
    names: Sequence[str | None] = _NAMES,
    *,
    batch_axis: int = 0,
    rules: Rules | None = None,
) -> jax.Array:
    """Process-local rows ``[..., b, ...]`` -> global ``[..., b * process_count, ...]`` sharded by logical ``names``.

    ``names`` are the logical axes of ``local`` (truncated to its rank); ``batch_axis`` is the axis that
    the processes' rows are concatenated along; ``rules``: the logical-axis rules (None: the defaults).
    """
    local = np.asarray(local)
    shape = list(local.shape)
    shape[batch_axis] *= jax.process_count()
    spec = logical_spec(tuple(names)[: local.ndim], shape, mesh, rules)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, tuple(shape))


def host_value_to_global(
    value: np.ndarray, mesh: Mesh | None, names: Sequence[str | None] = _NAMES, *, rules: Rules | None = None
) -> jax.Array:
    """The same full ``value`` on every process -> a global array of that value sharded by logical ``names``.

    ``mesh=None``: the value on the default device (a model that lives on one device)."""
    if mesh is None:
        return jnp.asarray(value)
    value = np.asarray(value)
    spec = logical_spec(tuple(names)[: value.ndim], value.shape, mesh, rules)
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index: value[index])


def global_to_host(x: jax.Array) -> np.ndarray:
    """The full value of ``x`` as numpy on every process (an all-gather when ``x`` spans several hosts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def any_process(flag: bool) -> bool:
    """True when ``flag`` is true on at least one process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def padding_like(batch: dict) -> dict:
    """A copy of ``batch`` whose examples are all masked out (``pair_mask`` 0, ``index`` -1)."""
    out = dict(batch)
    out["pair_mask"] = np.zeros_like(batch["pair_mask"])
    if "index" in out:
        out["index"] = np.full_like(batch["index"], -1)
    return out


def lockstep(batches: Iterable[dict], limit: int | None = None) -> Iterator[dict]:
    """The batches of this process, padded with :func:`padding_like` copies until every process is done.

    Every process must iterate it to the end: each round is one :func:`any_process` agreement. ``limit``
    caps the rounds. Raises if this process has no batch at all while another has one.
    """
    iterator, last, rounds = iter(batches), None, 0
    while limit is None or rounds < limit:
        batch = next(iterator, None)
        if not any_process(batch is not None):
            return
        if batch is None:
            if last is None:
                raise ValueError(
                    f"process {jax.process_index()} has no batch of a split that other processes "
                    "read; give it at least one example per process"
                )
            batch = padding_like(last)
        last = batch
        rounds += 1
        yield batch


def gather_json(value) -> list:
    """Every process's JSON-serialisable ``value``, in process order (a collective; ``[value]`` on one process)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(rows[i, : sizes[i]].tobytes()) for i in range(len(sizes))]
