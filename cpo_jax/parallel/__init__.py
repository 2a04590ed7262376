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
    logical_sharding,
    logical_spec,
    make_mesh,
    resolve_mesh_shape,
    param_shardings,
)

__all__ = ["DEFAULT_RULES", "any_process", "gather_json", "global_to_host", "host_to_global", "host_value_to_global", "initialize", "lockstep", "logical_sharding", "logical_spec", "make_mesh", "param_shardings", "resolve_mesh_shape"]
