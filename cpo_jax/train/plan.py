"""Capacity planning: the per-device memory of one train step, from an HF ``config.json`` alone.

:func:`plan` builds the run's model on abstract shapes (``jax.ShapeDtypeStruct``: nothing of model size is
allocated), places every array on the config's mesh by its logical axes, and compiles the real jitted
:func:`cpo_jax.train.step.train_step` for the local backend. It then reports per device:

* **exact, from the shapes and shardings**: trainable weights, the frozen base (adapter runs), the reference
  weights (``separate``: a second copy; ``base``/``adapter``/``precomputed``/``none``: 0 or a few MB), the
  optimiser state, the gradients (one trainable-weight copy, in the parameters' dtype) and the batch;
* **activations**, from XLA's buffer assignment of the compiled step: its temporaries at the run's length minus
  its temporaries at a length of 16. The difference is what grows with tokens (saved activations, logits chunks,
  attention), with the length-independent scratch removed. That matters on a CPU, whose compiler computes bf16
  matmuls in float32 and keeps a float32 copy of the stacked weights (as large as the model), which a GPU does not.

``total = weights + optimiser + gradients + batch + activations`` is an estimate of the GPU peak; the device check
(``tools/device_check.sh``) measures the real one. Compiled on a GPU, the same code reads the GPU compiler's figures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpo_jax.parallel.sharding import activation_sharding, logical_sharding, make_mesh, merge_rules, param_shardings
from cpo_jax.train.config import TrainConfig

GIB = 1024**3
#: Device memory to compare with, GiB: an 80 GB A100/H100, and an H200 (141 GB, 139 GiB usable as jax reports it).
DEVICES_GIB = {"80GB": 80.0, "H200": 139.0}
_SHORT = 16  # the length whose temporaries are subtracted


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one train step (see the module docstring); ``*_gib`` in GiB."""

    mode: str
    devices: int
    tokens_per_step: int
    trainable_params: int
    trainable_gib: float
    frozen_gib: float
    reference_gib: float
    optimizer_gib: float
    gradients_gib: float
    batch_gib: float
    activations_gib: float
    compiled_temp_gib: float

    @property
    def total_gib(self) -> float:
        return (
            self.trainable_gib
            + self.frozen_gib
            + self.reference_gib
            + self.optimizer_gib
            + self.gradients_gib
            + self.batch_gib
            + self.activations_gib
        )

    def fits(self, capacity_gib: float) -> bool:
        return self.total_gib <= capacity_gib


def describe_mode(cfg: TrainConfig) -> str:
    """``full + separate``, ``LoRA r16 + base``, ``QLoRA nf4 r16 + base``...: what a row of the plan is."""
    adapters = cfg.model.lora is not None or cfg.model.adapter_path is not None
    rank = f" r{cfg.model.lora.rank}" if cfg.model.lora is not None else ""
    kind = (
        (f"QLoRA {cfg.model.quantize}{rank}" if cfg.model.quantize != "none" else f"LoRA{rank}") if adapters else "full"
    )
    return f"{kind} + {cfg.loss.reference}"


def _per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs) laid out as ``shardings``."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda n: n is None)):
        shape = s.shard_shape(x.shape) if s is not None else x.shape
        key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # a dropout stream: 2 uint32 per key
        total += math.prod(shape) * (8 if key else jnp.dtype(x.dtype).itemsize)
    return total


def _abstract_model(cfg: TrainConfig, hf: dict):
    """The run's model on abstract shapes: architecture of ``hf``, parameters in ``model.param_dtype``, adapters and
    quantisation as configured."""
    from cpo_jax.hf.pretrained import config_from_hf
    from cpo_jax.models.transformer import Transformer
    from cpo_jax.train.loop import adapt_policy

    m = cfg.model
    arch = config_from_hf(
        hf, dtype=jnp.dtype(m.dtype), scan_layers=m.scan_layers, remat=m.remat, attention_impl=m.attention_impl
    )

    def build():
        model = Transformer(arch, param_dtype=jnp.dtype(m.param_dtype), rngs=nnx.Rngs(0))
        adapt_policy(model, cfg, read_weights=False)  # an imported adapter: its shapes, not its tensors
        return model

    return nnx.eval_shape(build)


def _batch(cfg: TrainConfig, length: int, mesh, rules):
    from cpo_jax.data.batching import ROW_KEYS

    d = cfg.data
    pairs = d.pairs_per_batch
    rows = d.rows_per_batch if (d.pack and d.rows_per_batch) else 2 * pairs
    names = ("micro", "batch", "length")
    batch, shardings = {}, {}
    for key, dtype in ROW_KEYS.items():
        shape = (cfg.grad_accum, rows, length)
        batch[key] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        shardings[key] = logical_sharding(names, shape, mesh, rules)
    for key, dtype in (("pair_mask", jnp.bool_), ("index", jnp.int32)):
        shape = (cfg.grad_accum, pairs)
        batch[key] = jax.ShapeDtypeStruct(shape, dtype)
        shardings[key] = logical_sharding(names[:2], shape, mesh, rules)
    if cfg.loss.reference == "precomputed":
        for key in ("ref_chosen", "ref_rejected"):
            shape = (cfg.grad_accum, pairs)
            batch[key] = jax.ShapeDtypeStruct(shape, jnp.float32)
            shardings[key] = logical_sharding(names[:2], shape, mesh, rules)
    return batch, shardings


def _compiled_temp(
    step, state, state_shardings, batch, batch_shardings, ref, ref_shardings, frozen, frozen_shardings
) -> int:
    compiled = (
        jax.jit(
            step,
            in_shardings=(state_shardings, batch_shardings, ref_shardings, frozen_shardings),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )
        .lower(state, batch, ref, frozen)
        .compile()
    )
    return compiled.memory_analysis().temp_size_in_bytes


def plan(cfg: TrainConfig, hf: dict, devices=None) -> Plan:
    """Per-device memory of one train step of ``cfg`` on a model of architecture ``hf`` (a ``config.json`` dict),
    on ``devices`` (default: every local device) laid out as ``cfg.mesh``."""
    from cpo_jax.train.optim import learning_rate_schedule, make_optimizer
    from cpo_jax.train.step import init_state, state_shardings, train_step

    mesh = make_mesh(cfg.mesh, devices)
    rules = merge_rules(cfg.mesh_rules)
    model = _abstract_model(cfg, hf)
    adapters = cfg.model.lora is not None or cfg.model.adapter_path is not None
    if adapters:
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    else:
        (graphdef, trainable), frozen = nnx.split(model), None

    def place(state):
        """Each Variable of ``state`` holding its NamedSharding (the shape of a train state's sharding tree)."""
        shardings = param_shardings(state, mesh, rules)
        return jax.tree.map(
            lambda var, sharding: var.replace(sharding), state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )

    trainable_s = place(trainable)
    frozen_s = None if frozen is None else place(frozen)
    reference = cfg.loss.reference if cfg.loss.objective == "preference" else "none"
    ref = ref_s = None
    if reference in ("separate", "adapter"):  # a full second model, or a frozen copy of the adapters
        ref, ref_s = {"model": trainable}, {"model": trainable_s}

    optimizer = make_optimizer(cfg.optim, cfg.steps)
    params, params_s = {"model": trainable}, {"model": trainable_s}
    init = lambda p: init_state(p, optimizer, cfg.seed)  # noqa: E731
    state = jax.eval_shape(init, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_s = state_shardings(params_s, optimizer, state, replicated)
    step = functools.partial(
        train_step,
        cfg=cfg,
        graphdef=graphdef,
        optimizer=optimizer,
        schedule=learning_rate_schedule(cfg.optim, cfg.steps),
    )

    length = cfg.data.max_length
    temps = {}
    for n in (length, min(_SHORT, length)):
        batch, batch_s = _batch(cfg, n, mesh, rules)
        with activation_sharding(mesh, rules):  # the trainer's activation constraints (TrainLoop.activations)
            temps[n] = _compiled_temp(step, state, state_s, batch, batch_s, ref, ref_s, frozen, frozen_s)
    batch, batch_s = _batch(cfg, length, mesh, rules)
    trainable_bytes = _per_device_bytes(trainable, trainable_s)
    return Plan(
        mode=describe_mode(cfg),
        devices=mesh.size,
        tokens_per_step=cfg.grad_accum * batch["input_ids"].shape[1] * length,
        trainable_params=sum(x.size for x in jax.tree.leaves(trainable)),
        trainable_gib=trainable_bytes / GIB,
        frozen_gib=(0 if frozen is None else _per_device_bytes(frozen, frozen_s)) / GIB,
        reference_gib=(0 if ref is None else _per_device_bytes(ref, ref_s)) / GIB,
        optimizer_gib=_per_device_bytes(state.opt_state, state_s.opt_state) / GIB,
        gradients_gib=trainable_bytes / GIB,
        batch_gib=_per_device_bytes(batch, batch_s) / GIB,
        activations_gib=max(temps[length] - temps[min(_SHORT, length)], 0) / GIB,
        compiled_temp_gib=temps[length] / GIB,
    )


def markdown(rows: list[tuple[str, Plan]]) -> str:
    """A table of plans: ``(model name, plan)`` rows."""
    head = (
        "| model | mode | devices | tokens/step | trainable | weights GiB (train / frozen / ref) | optimiser GiB | "
        "grads GiB | activations GiB | total GiB/device | 80 GB | H200 |\n" + "|---" * 12 + "|"
    )
    lines = [head]
    for name, p in rows:
        lines.append(
            f"| {name} | {p.mode} | {p.devices} | {p.tokens_per_step:,} | {p.trainable_params / 1e6:,.1f}M | "
            f"{p.trainable_gib:.2f} / {p.frozen_gib:.2f} / {p.reference_gib:.2f} | {p.optimizer_gib:.2f} | "
            f"{p.gradients_gib:.2f} | {p.activations_gib:.2f} | **{p.total_gib:.1f}** | "
            f"{'fits' if p.fits(DEVICES_GIB['80GB']) else 'no'} | {'fits' if p.fits(DEVICES_GIB['H200']) else 'no'} |"
        )
    return "\n".join(lines)


def plan_dict(p: Plan) -> dict[str, Any]:
    return {**dataclasses.asdict(p), "total_gib": p.total_gib}
