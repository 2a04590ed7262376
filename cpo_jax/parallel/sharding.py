"""Logical axes -> mesh axes.

Parameters name their axes logically (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``,
``head_dim``, ``norm``, ``positions``, ``layers``). A rules table maps each logical name to zero or more
mesh axes, and :func:`logical_spec` turns a parameter's names into a ``PartitionSpec``. The default
rules give FSDP over ``fsdp`` (the ``embed`` axis of every matrix) and tensor parallelism over
``tensor`` (heads, MLP width, vocabulary); a mesh axis of size 1 switches either off.

Meshes are built with ``AxisType.Auto`` on purpose: jax >= 0.10 defaults ``jax.make_mesh`` to Explicit
axes (sharding in types), and our jitted steps rely on GSPMD propagation from the parameter and
batch shardings instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cpo_jax.errors import ConfigError

Rules = Mapping[str, str | tuple[str, ...] | None]

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "positions": None,
    "layers": None,
    "length": None,
    "micro": None,
}


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replace one ``-1`` size by the devices left over; the sizes must multiply to ``num_devices``.

    Raises :class:`~cpo_jax.errors.ConfigError` naming the ``mesh`` key."""
    where = f"config key mesh={dict(shape)}"
    hint = f"this process sees {num_devices} device(s); set one axis to -1 to use whatever is there"
    try:
        sizes = {name: int(size) for name, size in shape.items()}
    except (TypeError, ValueError):
        raise ConfigError("mesh axis sizes must be integers", where=where) from None
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"only one axis may be -1, got {free}", where=where)
    bad = {n: s for n, s in sizes.items() if s < 1 and s != -1}
    if bad:
        raise ConfigError(f"axis sizes must be >= 1 or -1, got {bad}", where=where)
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if num_devices % fixed:
            raise ConfigError(f"{num_devices} devices do not divide by the fixed axes ({fixed})", where=where,
                              hint=hint)
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"the mesh needs {fixed} devices, {num_devices} available", where=where, hint=hint)
    return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with named axes, e.g. ``make_mesh({"data": -1, "fsdp": 2, "tensor": 2})`` (Auto axis types).

    One size may be ``-1``: the remaining devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    names = tuple(shape)
    sizes = tuple(int(shape[n]) for n in names)
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for an array with logical axis ``names``.

    A mesh axis absent from the mesh, already used by an earlier dimension, or whose size does not
    divide the dimension is dropped for that dimension (the dimension is then replicated over it).
    Unknown logical names raise ``KeyError``.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
        axes = []
        divisor = 1
        for axis in _mesh_axes(rules[name]):
            if axis not in mesh.shape or axis in used:
                continue
            if size % (divisor * mesh.shape[axis]):
                continue
            axes.append(axis)
            divisor *= mesh.shape[axis]
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def logical_sharding(names, shape, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """NamedSharding for logical axis ``names`` on ``mesh``."""
    return NamedSharding(mesh, logical_spec(names, shape, mesh, rules))


def param_shardings(abstract_state, mesh: Mesh, rules: Rules | None = None):
    """Map an NNX state of ``ShapeDtypeStruct`` Variables to NamedShardings from their ``out_sharding``."""
    from flax import nnx

    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return logical_sharding(names, var.shape, mesh, rules)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
