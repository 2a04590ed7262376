"""Logical axes -> mesh axes.

Parameters name their axes logically (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``,
``head_dim``, ``norm``, ``positions``, ``layers``). A rules table maps each logical name to zero or more
mesh axes, and :func:`logical_spec` turns a parameter's names into a ``PartitionSpec``. The default
rules give FSDP over ``fsdp`` (the ``embed`` axis of every matrix) and tensor parallelism over
``tensor`` (heads, MLP width, vocabulary), and expert parallelism over ``expert`` (the stacked experts of an MoE
layer, logical axis ``expert``; without an ``expert`` mesh axis that dimension is replicated while the experts'
``embed`` and ``mlp`` dimensions are still split over ``fsdp`` and ``tensor``); a mesh axis of size 1 switches any
of them off. A run's config may
override single rules (``mesh_rules:``, merged over :data:`DEFAULT_RULES` by :func:`merge_rules` and checked
against the mesh by :func:`check_mesh_rules`). The trainers pass the merged rules explicitly to model loading and
to the batch helpers of :mod:`cpo_jax.parallel.multihost`; a helper given no rules uses the defaults.

A dimension that a mesh axis does not divide is replicated over that axis, with one warning per
(logical axis, dimension, mesh axes).

Meshes are built with ``AxisType.Auto`` on purpose: jax >= 0.10 defaults ``jax.make_mesh`` to Explicit
axes (sharding in types), and our jitted steps rely on GSPMD propagation from the parameter and
batch shardings instead.

Activations are pinned at a few layer boundaries by :func:`constrain` (``with_sharding_constraint`` by logical
axes). It acts only while a function is traced inside :func:`activation_sharding` (a mesh and its rules); outside
one it returns its input, so single-device and library callers trace exactly the code they did before.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from cpo_jax.errors import ConfigError

log = logging.getLogger(__name__)

Rules = Mapping[str, str | tuple[str, ...] | None]

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "expert": "expert",
    "head_dim": None,
    "norm": None,
    "positions": None,
    "layers": None,
    "length": None,
    "micro": None,
}


def merge_rules(overrides: Rules | None = None) -> dict[str, str | tuple[str, ...] | None]:
    """:data:`DEFAULT_RULES` with ``overrides`` (e.g. a config's ``mesh_rules``) replacing single entries."""
    rules = dict(DEFAULT_RULES)
    for name, rule in (overrides or {}).items():
        rules[name] = tuple(rule) if isinstance(rule, list) else rule
    return rules


def rule_axes(rules: Rules) -> list[str]:
    """Every mesh axis that some rule of ``rules`` maps a logical axis to, sorted."""
    return sorted({axis for rule in rules.values() for axis in _mesh_axes(rule)})


def check_mesh_rules(shape: Mapping[str, int], overrides: Rules | None = None) -> dict:
    """The merged rules for mesh ``shape`` (axis -> size) and rule ``overrides``; raises :class:`ConfigError` when
    an override names an unknown logical axis or a mesh axis the mesh lacks, or when a mesh axis is one no rule
    uses (a typo such as ``dta`` would otherwise leave the batch replicated on every device). A default axis
    (``data``, ``fsdp``, ``tensor``) of size 1 that the overrides leave unused is accepted: it is switched off."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_RULES))
    if unknown:
        raise ConfigError(
            f"{unknown} are not logical axes",
            where="config key mesh_rules",
            hint=f"the logical axes are {list(DEFAULT_RULES)}",
        )
    for name, rule in overrides.items():
        if not (
            rule is None
            or isinstance(rule, str)
            or (isinstance(rule, (list, tuple)) and all(isinstance(a, str) for a in rule))
        ):
            raise ConfigError(
                f"{rule!r} is not a mesh axis, a list of mesh axes or null", where=f"config key mesh_rules.{name}"
            )
        missing = [axis for axis in _mesh_axes(rule) if axis not in shape]
        if missing:
            raise ConfigError(
                f"names mesh axis {missing[0]!r}, which the mesh {dict(shape)} lacks",
                where=f"config key mesh_rules.{name}",
                hint=f"the mesh axes are {list(shape)}; "
                "add the axis to mesh: or map the logical axis to an existing one",
            )
        if len(set(_mesh_axes(rule))) != len(_mesh_axes(rule)):
            raise ConfigError(f"{rule!r} repeats a mesh axis", where=f"config key mesh_rules.{name}")
    rules = merge_rules(overrides)
    known = rule_axes(rules)
    for axis, size in shape.items():
        if axis not in known and not (size == 1 and axis in rule_axes(DEFAULT_RULES)):  # size 1: switched off
            raise ConfigError(
                f"no logical axis is sharded over mesh axis {axis!r}, so it would only replicate",
                where=f"config key mesh.{axis}",
                hint=f"the known mesh axes are {known}; rename the axis, or map a logical axis to "
                f"it in mesh_rules (e.g. mesh_rules.batch=[data, {axis}])",
            )
    return rules


_WARNED: set[tuple] = set()


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
            raise ConfigError(
                f"{num_devices} devices do not divide by the fixed axes ({fixed})", where=where, hint=hint
            )
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


def logical_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    rules: Rules | None = None,
    *,
    warn: bool = True,
) -> PartitionSpec:
    """PartitionSpec for an array with logical axis ``names``.

    ``rules=None``: :data:`DEFAULT_RULES` (a config's ``mesh_rules`` reach here through the trainers). A mesh axis
    absent from the mesh, already used by an earlier dimension, or whose size does not divide the dimension is
    dropped for that dimension
    (the dimension is then replicated over it); a dropped axis of size > 1 that does not divide is logged as a
    warning (unless ``warn=False``), once per (logical axis, dimension, mesh axes). Unknown logical names raise
    ``KeyError``.
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
        axes, dropped = [], []
        divisor = 1
        for axis in _mesh_axes(rules[name]):
            if axis not in mesh.shape or axis in used:
                continue
            if size % (divisor * mesh.shape[axis]):
                if mesh.shape[axis] > 1:
                    dropped.append(axis)
                continue
            axes.append(axis)
            divisor *= mesh.shape[axis]
        used.update(axes)
        if dropped and warn:
            _warn_replicated(name, size, dropped, mesh)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def _warn_replicated(name: str, size: int, dropped: list[str], mesh: Mesh) -> None:
    key = (name, int(size), tuple(dropped))
    if key in _WARNED:
        return
    _WARNED.add(key)
    sizes = {axis: int(mesh.shape[axis]) for axis in dropped}
    log.warning(
        "logical axis %r of size %d does not divide over mesh axes %s: it is replicated over %s instead of "
        "sharded (pick mesh sizes that divide it, or change mesh_rules.%s)",
        name,
        size,
        sizes,
        list(dropped),
        name,
    )


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


# ------------------------------------------------------------------------------------------------------------------
# Activation constraints
_ACTIVATION_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("activation_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules | None = None) -> Iterator[None]:
    """Trace (call or ``.lower()``) a jitted function inside this to let :func:`constrain` pin its activations on
    ``mesh`` by ``rules`` (None: :data:`DEFAULT_RULES`): ``jax.set_mesh(mesh)`` plus the rules.

    Only tracing reads it: a function already compiled runs the same program inside or outside, and ``jax.jit``
    keys its cache on the mesh context, so tracing once inside and once outside compiles two programs."""
    token = _ACTIVATION_RULES.set(DEFAULT_RULES if rules is None else rules)
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVATION_RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` pinned to the sharding of logical axes ``names`` (one per dimension, as a parameter's ``out_sharding``;
    e.g. ``("batch", "length", "embed")``) by ``jax.lax.with_sharding_constraint``, under
    :func:`activation_sharding`; ``x`` itself, unchanged, outside one (no mesh context or no rules).

    The spec is :func:`logical_spec`'s: a dimension that its mesh axes do not divide is not split over them, and a
    later dimension may then take such an axis (3 rows of ``("batch", "length", "embed")`` on ``fsdp=8`` put D over
    ``fsdp``). Unlike for parameters this is silent: activations change shape from call to call (a decode step has
    one token). The value of ``x`` never changes, only where its pieces live."""
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh, rules, warn=False))
