"""Device meshes and logical-axis sharding rules."""

from cpo_jax.parallel.distributed import initialize
from cpo_jax.parallel.multihost import (
    any_process,
    gather_json,
    global_to_host,
    host_to_global,
    host_value_to_global,
    lockstep,
)
from cpo_jax.parallel.sharding import (
    DEFAULT_RULES,
    activation_sharding,
    check_mesh_rules,
    constrain,
    logical_sharding,
    logical_spec,
    make_mesh,
    merge_rules,
    param_shardings,
    resolve_mesh_shape,
)

__all__ = [
    "DEFAULT_RULES",
    "activation_sharding",
    "any_process",
    "check_mesh_rules",
    "constrain",
    "gather_json",
    "global_to_host",
    "host_to_global",
    "host_value_to_global",
    "initialize",
    "lockstep",
    "logical_sharding",
    "logical_spec",
    "make_mesh",
    "merge_rules",
    "param_shardings",
    "resolve_mesh_shape",
]
