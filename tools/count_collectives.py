"""Count the collectives of the compiled DPO/CPO train step of a tiny Llama-shaped model on an 8-device mesh.

The step is :func:`cpo_jax.train.step.jit_train_step`, the function the Trainer jits, with the Trainer's in/out
shardings: parameters and Adam state by their logical axes, the batch ``("micro", "batch", "length")``, a separate
reference model (DPO ``sigmoid`` and ``cpo``; none for a reference-free loss). The model is random (no checkpoint is
read): D 64, 2 layers, 4 query and 2 key-value heads of 16, MLP 128, vocabulary 256, untied, float32; the MoE variant
replaces each MLP by 8 experts of 32 (top 2). The batch is 8 pairs (16 rows) of 64 tokens, one micro-batch.

For each layout it compiles the step twice: without a mesh context (so :func:`cpo_jax.parallel.sharding.constrain`
does nothing: GSPMD propagation alone), and inside :func:`cpo_jax.parallel.sharding.activation_sharding` (the models'
activation constraints active). It prints, per collective kind, how many one step executes and their bytes per
device (:mod:`cpo_jax.parallel.hlo` with ``executed=True``: a collective inside a ``lax.scan`` counts once per
iteration), the number of collective instructions in the module, and with ``--time`` the median step time.

Usage::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/count_collectives.py \\
        [--layouts fsdp8,fsdp4_tensor2,data2_fsdp4,expert4_fsdp2] [--loss sigmoid|cpo|simpo] [--scan] [--time 5] \\
        [--dump DIR] [--json FILE]

``--dump DIR`` writes each compiled module's text (``DIR/<layout>.<plain|constrained>.hlo.txt``) for inspection.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpo_jax.parallel.hlo import KINDS, collective_bytes, count_collectives  # noqa: E402
from cpo_jax.parallel.sharding import (  # noqa: E402
    activation_sharding,
    check_mesh_rules,
    logical_sharding,
    make_mesh,
    param_shardings,
)

#: name -> mesh shape; ``expert4_fsdp2`` runs the MoE variant of the model.
LAYOUTS: dict[str, dict[str, int]] = {
    "fsdp8": {"fsdp": 8},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
    "data2_fsdp4": {"data": 2, "fsdp": 4},
    "expert4_fsdp2": {"expert": 4, "fsdp": 2},
}
MOE_LAYOUTS = frozenset({"expert4_fsdp2"})
PAIRS, LENGTH = 8, 64


def tiny_config(*, moe: bool = False, scan_layers: bool = False):
    """A Llama-shaped :class:`~cpo_jax.models.config.TransformerConfig` whose every sharded size divides by 8."""
    from cpo_jax.models.config import TransformerConfig

    extra = dict(num_experts=8, experts_per_token=2, moe_intermediate_size=32, norm_topk_prob=True) if moe else {}
    return TransformerConfig(
        family="llama",
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=LENGTH,
        norm_eps=1e-5,
        padding_idx=0,
        scan_layers=scan_layers,
        **extra,
    )


def train_config(loss: str = "sigmoid", optimizer: str = "adamw"):
    """The run config of the step: DPO (``sigmoid``) or CPO (the smooth-target ``cpo`` loss), both with a separate
    reference model; a reference-free loss (``simpo``, ``orpo``...) runs with none."""
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.objectives import reference_free_losses

    hparams = {"beta": 0.1, "gamma": 0.5} if loss == "cpo" else {"beta": 0.1}
    optim = {"name": optimizer, "learning_rate": 1e-3 if optimizer == "adamw" else 1.0, "schedule": "constant"}
    if optimizer == "sgd":
        optim["max_grad_norm"] = None  # the update is -grad exactly (the test reads gradients back from it)
    return from_dict(
        TrainConfig,
        {
            "output_dir": "/nonexistent",
            "model": {"path": "/nonexistent"},
            "loss": {
                "name": loss,
                "hparams": hparams,
                "reference": "none" if loss in reference_free_losses() else "separate",
            },
            "optim": optim,
            "steps": 10,
            "data": {"max_length": LENGTH, "pairs_per_batch": PAIRS},
        },
    )


def synthetic_batch(pairs: int = PAIRS, length: int = LENGTH, vocab: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """One micro-batch ``[1, 2P, L]`` in the layout of :mod:`cpo_jax.data.batching` (unpacked): row ``2i`` the chosen
    and ``2i + 1`` the rejected sequence of pair ``i``, a shared prompt, right padding; the last pair slot empty."""
    rng = np.random.default_rng(seed)
    rows = 2 * pairs
    batch = {
        "input_ids": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "targets": np.zeros((rows, length), np.int32),
        "loss_mask": np.zeros((rows, length), np.float32),
        "sequence_ids": np.full((rows, length), -1, np.int32),
    }
    pair_mask = np.arange(pairs) < pairs - 1
    for slot in range(pairs - 1):
        prompt = rng.integers(3, vocab, int(rng.integers(4, length // 2)))
        for offset in range(2):
            ids = np.concatenate([prompt, rng.integers(3, vocab, int(rng.integers(2, length // 2)))])
            row, n = 2 * slot + offset, len(ids)
            batch["input_ids"][row, :n] = ids
            batch["positions"][row, :n] = np.arange(n)
            batch["segment_ids"][row, :n] = 1
            batch["targets"][row, : n - 1] = ids[1:]
            batch["loss_mask"][row, len(prompt) - 1 : n - 1] = 1.0
            batch["sequence_ids"][row, :n] = row
    out = {k: v[None] for k, v in batch.items()}
    out["pair_mask"] = pair_mask[None]
    out["index"] = np.where(pair_mask, np.arange(pairs), -1).astype(np.int32)[None]
    return out


@dataclasses.dataclass
class StepSetup:
    """A jitted train step with its placed inputs; ``call(state)`` runs it, ``lower()`` traces it."""

    mesh: jax.sharding.Mesh
    rules: dict
    step: Any
    state: Any
    batch: dict
    ref: Any
    constrained: bool

    def _context(self):
        return activation_sharding(self.mesh, self.rules) if self.constrained else contextlib.nullcontext()

    def lower(self):
        with self._context():
            return self.step.lower(self.state, self.batch, self.ref, None)

    def call(self, state):
        with self._context():
            return self.step(state, self.batch, self.ref, None)


def setup_step(
    layout: Mapping[str, int],
    *,
    moe: bool = False,
    loss: str = "sigmoid",
    optimizer: str = "adamw",
    scan_layers: bool = False,
    constrained: bool = True,
    devices=None,
    seed: int = 0,
) -> StepSetup:
    """The Trainer's step for the tiny model on a mesh of ``layout``: parameters placed by their logical axes, the
    train state by :func:`~cpo_jax.train.step.state_shardings`, the batch by ``("micro", "batch", "length")``.
    ``constrained``: trace inside :func:`activation_sharding` (else as the Trainer traces today)."""
    from flax import nnx

    from cpo_jax.models.transformer import Transformer
    from cpo_jax.train.optim import learning_rate_schedule, make_optimizer
    from cpo_jax.train.step import init_state, jit_train_step, state_shardings

    devices = list(devices if devices is not None else jax.devices()[: int(np.prod(list(layout.values())))])
    mesh = make_mesh(layout, devices)
    rules = check_mesh_rules(dict(mesh.shape))
    cfg = train_config(loss, optimizer)
    arch = tiny_config(moe=moe, scan_layers=scan_layers)
    graphdef, params = nnx.split(Transformer(arch, param_dtype=jnp.float32, rngs=nnx.Rngs(seed)))
    shardings = param_shardings(params, mesh, rules)
    placed = jax.tree.map(
        lambda var, s: var.replace(jax.device_put(var[...], s)),
        params,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    model_shardings = jax.tree.map(lambda x: x.sharding, placed)

    optim = make_optimizer(cfg.optim, cfg.steps)
    init = lambda p: init_state(p, optim, cfg.seed)  # noqa: E731
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params_in = {"model": placed}
    abstract = jax.eval_shape(init, params_in)
    state_s = state_shardings({"model": model_shardings}, optim, abstract, replicated)
    state = jax.jit(init, out_shardings=state_s)(params_in)

    ref = {"model": placed} if cfg.loss.reference == "separate" else None
    ref_s = None if ref is None else {"model": model_shardings}
    batch, batch_s = {}, {}
    for key, value in synthetic_batch(vocab=arch.vocab_size, seed=seed).items():
        names = ("micro", "batch", "length")[: value.ndim]
        batch_s[key] = logical_sharding(names, value.shape, mesh, rules)
        batch[key] = jax.device_put(value, batch_s[key])
    step = jit_train_step(
        cfg, graphdef, optim, learning_rate_schedule(cfg.optim, cfg.steps), state_s, batch_s, ref_s, None
    )
    return StepSetup(mesh, rules, step, state, batch, ref, constrained)


def compiled_text(setup: StepSetup) -> str:
    """The compiled, partitioned HLO text of ``setup``'s step."""
    return setup.lower().compile().as_text()


def measure(name: str, *, constrained: bool, loss: str, scan_layers: bool, time_steps: int, dump: Path | None):
    """Counts, bytes and (``time_steps`` > 0) the median step time of layout ``name``."""
    setup = setup_step(
        LAYOUTS[name], moe=name in MOE_LAYOUTS, loss=loss, scan_layers=scan_layers, constrained=constrained
    )
    text = compiled_text(setup)
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.{'constrained' if constrained else 'plain'}.hlo.txt").write_text(text)
    row = {
        "layout": name,
        "constraints": constrained,
        "counts": count_collectives(text, executed=True),
        "bytes": collective_bytes(text, executed=True),
        "instructions": count_collectives(text),
    }
    if time_steps:
        state = setup.state
        state, metrics = setup.call(state)  # compile + warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(time_steps):
            t0 = time.perf_counter()
            state, metrics = setup.call(state)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
        row["step_ms"] = 1e3 * statistics.median(times)
        row["loss"] = float(metrics["loss"])
    return row


def _table(rows: list[dict]) -> str:
    head = (
        "| layout | constraints | "
        + " | ".join(f"{k} (n / KiB)" for k in KINDS)
        + " | total n (instructions) | total KiB |"
    )
    timed = any("step_ms" in r for r in rows)
    if timed:
        head += " step ms |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = [f"{r['counts'][k]} / {r['bytes'][k] / 1024:.1f}" for k in KINDS]
        line = (
            f"| {r['layout']} | {'on' if r['constraints'] else 'off'} | " + " | ".join(cells) + f" | "
            f"{sum(r['counts'].values())} ({sum(r['instructions'].values())}) | {sum(r['bytes'].values()) / 1024:.1f} |"
        )
        if timed:
            line += f" {r.get('step_ms', float('nan')):.1f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {list(LAYOUTS)}")
    parser.add_argument("--loss", default="sigmoid", help="a registered pairwise loss: sigmoid (DPO), cpo, simpo...")
    parser.add_argument("--scan", action="store_true", help="scan_layers (one stacked block under lax.scan)")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="also time N steps (median)")
    parser.add_argument("--only", choices=["plain", "constrained"], help="compile one variant only")
    parser.add_argument("--dump", type=Path, help="write each compiled HLO text into this directory")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if jax.device_count() < 8:
        parser.error(f"needs 8 devices, found {jax.device_count()}: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    variants = {"plain": [False], "constrained": [True], None: [False, True]}[args.only]
    rows = []
    for name in args.layouts.split(","):
        if name not in LAYOUTS:
            parser.error(f"unknown layout {name!r}; expected one of {list(LAYOUTS)}")
        for constrained in variants:
            rows.append(
                measure(
                    name,
                    constrained=constrained,
                    loss=args.loss,
                    scan_layers=args.scan,
                    time_steps=args.time,
                    dump=args.dump,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
