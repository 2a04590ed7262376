"""LoRA adapters in Hugging Face PEFT's directory format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The names come from each family's weight table (:mod:`cpo_jax.hf.families`): every per-layer rule ``<module>.weight``
-> ``layers.{i}.<ours>.kernel`` is one linear projection that LoRA may target, named by the last component of its
HF module path (``q_proj``, ``c_attn``). A rule with ``split`` is a fused HF projection (GPT-2's ``c_attn`` = our q,
k and v): it is one PEFT adapter, whose ``lora_A`` our parts share and whose ``lora_B`` is split along its output
axis, in the table's order. A rule without ``transpose`` is a ``Conv1D`` (``[in, out]``), for which PEFT writes
``fan_in_fan_out: true``.

PEFT's tensors, whatever the base layer: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]`` (torch ``nn.Linear`` weights of the adapter), i.e. our ``A.T`` and ``B.T``.

* :func:`add_adapter`: :func:`cpo_jax.models.lora.add_lora` with this family's target names.
* :func:`save_adapter` / :func:`load_adapter`: write and read the directory; ``peft.PeftModel.from_pretrained(base,
  dir)`` reads what ``save_adapter`` writes, and ``load_adapter`` reads what ``PeftModel.save_pretrained`` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from cpo_jax.errors import ConfigError, ModelError, UnsupportedConfig, UserFileNotFoundError
from cpo_jax.fileio import apply_umask
from cpo_jax.hf.families import family_of
from cpo_jax.hf.pretrained import SAFETENSORS_DTYPES, open_safetensors, tensor_slice
from cpo_jax.hf.resolve import read_json_object
from cpo_jax.models.config import TransformerConfig
from cpo_jax.models.lora import (
    LoraSpec,
    add_lora,
    layer_linears,
    lora_modules,
    remove_lora,
    resolve_targets,
)
from cpo_jax.parallel.multihost import global_to_host

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json keys whose non-default values change what the adapter computes, and which cpo_jax does not
# implement: such an adapter is refused rather than loaded wrongly. None, {} and [] all count as the default.
_MUST_BE_DEFAULT = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": None,
    "alpha_pattern": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "exclude_modules": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "megatron_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "velora_config": None,
}
# init_lora_weights values that rewrite the base weights (the adapter is then only valid with that modified base)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One linear HF module of a decoder layer that LoRA can adapt.

    Attributes:
      name: the target name, the last component of ``hf`` (``q_proj``, ``c_attn``).
      hf: the module path with ``{i}`` for the layer (``model.layers.{i}.self_attn.q_proj``).
      ours: our projections inside a layer that make it up, in output order (``("attn.q", "attn.k", "attn.v")``).
      conv1d: HF stores the weight ``[in, out]`` (GPT-2 ``Conv1D``; PEFT's ``fan_in_fan_out``).
    """

    name: str
    hf: str
    ours: tuple[str, ...]
    conv1d: bool


def lora_table(cfg: TransformerConfig) -> list[LoraModule]:
    """The LoRA-targetable modules of ``cfg``'s family, in weight-table order, derived from its weight table."""
    groups: dict[str, list] = {}
    for rule in family_of(cfg.model_type).weight_table(cfg):
        if not (rule.per_layer and rule.hf.endswith(".weight") and rule.ours.endswith(".kernel")):
            continue
        if not rule.ours.startswith("layers.{i}."):
            continue
        groups.setdefault(rule.hf[: -len(".weight")], []).append(rule)
    table = []
    for hf, rules in groups.items():
        rules.sort(key=lambda r: r.split[1] if r.split else 0)
        ours = tuple(r.ours[len("layers.{i}.") : -len(".kernel")] for r in rules)
        table.append(LoraModule(hf.rsplit(".", 1)[-1], hf, ours, conv1d=not rules[0].transpose))
    return table


def lora_sites(cfg: TransformerConfig) -> dict[str, tuple[tuple[str, ...], ...]]:
    """HF target name -> our projections (:data:`cpo_jax.models.lora.LoraSites`), e.g. GPT-2's
    ``{"c_attn": (("attn.q", "attn.k", "attn.v"),), "c_proj": (("attn.o",), ("mlp.down",)), "c_fc": ...}``."""
    sites: dict[str, list] = {}
    for module in lora_table(cfg):
        sites.setdefault(module.name, []).append(module.ours)
    return {name: tuple(groups) for name, groups in sites.items()}


def _family(cfg: TransformerConfig) -> str:
    return f"{cfg.model_type} ({cfg.family} family)"


def add_adapter(model, spec: LoraSpec, *, rngs: nnx.Rngs):
    """Attach fresh LoRA adapters to ``model`` (in place, returned), ``spec.targets`` being HF names of its family.

    Raises :class:`~cpo_jax.errors.ConfigError` listing the family's projections for an unknown target."""
    return add_lora(model, spec, rngs=rngs, sites=lora_sites(model.config))


def _targeted(cfg: TransformerConfig, spec: LoraSpec) -> list[LoraModule]:
    names = set(resolve_targets(spec, lora_sites(cfg), _family(cfg)))
    return [m for m in lora_table(cfg) if m.name in names]


def _layer_value(var, layer: int, stacked: bool) -> np.ndarray:
    value = var[...]
    return global_to_host(value[layer] if stacked else value)


def save_adapter(model, spec: LoraSpec, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``).

    ``spec`` is the one the adapters were added with; it is checked against them (rank, scale, which projections
    have adapters). Tensors keep the adapters' dtype. Returns ``path``.
    """
    cfg = model.config
    modules = _targeted(cfg, spec)
    adapted = {id(m) for _, m in lora_modules(model)}
    expected: set[int] = set()
    stacked = cfg.scan_layers
    tensors: dict[str, np.ndarray] = {}
    for module in modules:
        parts = [layer_linears(model, p) for p in module.ours]
        for layer in range(cfg.num_layers):
            linears = [p[0 if stacked else layer] for p in parts]
            for lin, name in zip(linears, module.ours):
                if lin.lora_a is None:
                    raise ValueError(
                        f"layer {layer} {name} has no adapter, but spec targets {module.name}: "
                        f"save with the spec the adapters were added with"
                    )
                if lin.lora_a[...].shape[-1] != spec.rank or not np.isclose(lin.lora_scale, spec.scale):
                    raise ValueError(
                        f"layer {layer} {name}: adapter of rank {lin.lora_a[...].shape[-1]} and scale "
                        f"{lin.lora_scale}, spec says rank {spec.rank} and scale {spec.scale}"
                    )
                if lin.lora_a is not linears[0].lora_a:
                    raise ValueError(f"the parts {module.ours} of {module.hf} must share lora_a (PEFT has one)")
                expected.add(id(lin))
            a = _layer_value(linears[0].lora_a, layer, stacked)  # [in, r]
            b = np.concatenate([_layer_value(lin.lora_b, layer, stacked) for lin in linears], axis=-1)  # [r, out]
            key = PREFIX + module.hf.format(i=layer)
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.T)
    extra = adapted - expected
    if extra:
        raise ValueError(
            f"{len(extra)} adapted projection(s) are not among spec's targets "
            f"{[m.name for m in modules]}: save with the spec the adapters were added with"
        )
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else float(spec.alpha)
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": any(m.conv1d for m in modules),
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": float(spec.dropout),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted({m.name for m in modules}),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": bool(spec.use_rslora),
    }
    path = Path(path)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        apply_umask(path / WEIGHTS_FILE)  # safetensors writes 0600
        with open(path / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return path


# --------------------------------------------------------------------------------------------------
def _is_default(value, default) -> bool:
    if default is None or default == {}:
        return value in (None, {}, [], "")
    return value == default


def _spec_from_config(hf: Mapping, file: Path) -> LoraSpec:
    where = str(file)
    peft_type = hf.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedConfig(
            f"peft_type {peft_type!r} is not supported; cpo_jax loads LORA adapters", where=f"{where}: key peft_type"
        )
    for key, default in _MUST_BE_DEFAULT.items():
        if key in hf and not _is_default(hf[key], default):
            raise UnsupportedConfig(
                f"{key}={hf[key]!r} is not supported (cpo_jax implements plain LoRA: {key}={default!r})",
                where=f"{where}: key {key}",
            )
    init = hf.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise UnsupportedConfig(
            f"init_lora_weights={init!r} changes the base weights, which this adapter needs",
            where=f"{where}: key init_lora_weights",
            hint="convert it to a plain LoRA adapter with PEFT (path_initial_model_for_weight_"
            "conversion), or merge it into the base model and export that",
        )
    missing = [k for k in ("r", "lora_alpha") if k not in hf]
    if missing:
        raise ModelError(f"has no {missing[0]}", where=where, hint="PEFT writes r and lora_alpha for a LoRA adapter")
    try:
        return LoraSpec(
            rank=hf["r"],
            alpha=hf["lora_alpha"],
            dropout=hf.get("lora_dropout", 0.0) or 0.0,
            use_rslora=bool(hf.get("use_rslora", False)),
        )
    except ConfigError as err:
        key = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}.get((err.where or "").rsplit(".")[-1])
        raise ModelError(err.problem, where=f"{where}: key {key}") from None


def _matched_targets(cfg: TransformerConfig, targets, file: Path) -> tuple[str, ...]:
    """The target names of ``cfg``'s family that PEFT's ``target_modules`` selects, in table order.

    PEFT matches a list entry to a module whose path equals it or ends with ``"." + entry``, a string as a regex
    over the whole path, and ``"all-linear"`` to every linear layer but the output layer."""
    table = lora_table(cfg)
    names = list(dict.fromkeys(m.name for m in table))
    valid = f"the projections of {_family(cfg)} are {names}"
    where = f"{file}: key target_modules"
    if isinstance(targets, str) and targets == "all-linear":
        return tuple(names)
    paths = [(m, m.hf.format(i=i)) for m in table for i in range(cfg.num_layers)]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ModelError(
                f"target_modules {targets!r} is not a valid regular expression: {err}", where=where
            ) from None
        hits = {(m.hf, p) for m, p in paths if pattern.fullmatch(p)}
        if not hits:
            raise ModelError(f"target_modules {targets!r} matches no projection of the model", where=where, hint=valid)
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        hits = set()
        for target in targets:
            found = {(m.hf, p) for m, p in paths if p == target or p.endswith("." + target)}
            if not found:
                raise ModelError(f"targets {target!r}, which {_family(cfg)} lacks", where=where, hint=valid)
            hits |= found
    else:
        raise ModelError(
            f"target_modules must be a list of module names or a regex string, got {targets!r}", where=where
        )
    chosen = []
    for name in names:
        of_name = {(m.hf, p) for m, p in paths if m.name == name}
        if of_name <= hits:
            chosen.append(name)
        elif of_name & hits:
            raise UnsupportedConfig(
                f"target_modules adapts only some of the {name!r} projections (some layers or "
                f"modules); cpo_jax adapts a target name in every layer",
                where=where,
            )
    return tuple(chosen)


def _read_tensors(file: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Every tensor of ``expected`` (name -> shape), checked: nothing missing, nothing more, shapes and dtypes."""
    hint = "the adapter does not match this model (another base model, or a damaged file)"
    with open_safetensors(file) as f:
        names = list(f.keys())
        missing = [n for n in expected if n not in names]
        if missing:
            raise ModelError(
                f"lacks {len(missing)} tensor(s) that adapter_config.json implies, e.g. {missing[:3]}",
                where=str(file),
                hint=hint,
            )
        extra = [n for n in names if n not in expected]
        if extra:
            raise ModelError(
                f"holds {len(extra)} tensor(s) that no targeted projection of the model has, e.g. {extra[:3]}",
                where=str(file),
                hint=hint,
            )
        out = {}
        for name, shape in expected.items():
            tensor = tensor_slice(f, file, name)
            if tuple(tensor.get_shape()) != shape:
                raise ModelError(
                    f"has shape {tuple(tensor.get_shape())}, expected {shape} (r and the model's projection sizes)",
                    where=f"{file}: tensor {name}",
                    hint=hint,
                )
            if tensor.get_dtype() not in SAFETENSORS_DTYPES:
                raise ModelError(
                    f"has unsupported dtype {tensor.get_dtype()}",
                    where=f"{file}: tensor {name}",
                    hint=f"cpo_jax reads {sorted(SAFETENSORS_DTYPES)} tensors",
                )
            out[name] = np.asarray(tensor[:])
    return out


def read_adapter_spec(cfg: TransformerConfig, path: str | os.PathLike) -> LoraSpec:
    """The :class:`LoraSpec` of the PEFT adapter directory ``path`` for a model of architecture ``cfg`` (its targets
    matched to the family's names), from ``adapter_config.json`` alone: no tensor is read. Raises as
    :func:`load_adapter` does for the directory and its config."""
    path = Path(path)
    if not path.is_dir():
        raise UserFileNotFoundError(
            "the adapter directory does not exist" if not path.exists() else "the adapter path is not a directory",
            where=str(path),
            hint=f"give a PEFT adapter directory ({CONFIG_FILE} + {WEIGHTS_FILE})",
        )
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise UserFileNotFoundError(
            f"not a PEFT adapter directory: it has no {CONFIG_FILE}",
            where=str(path),
            hint="save the adapter with PeftModel.save_pretrained(dir) or cpo_jax.hf.peft.save_adapter",
        )
    hf = read_json_object(config_file, hint="PEFT writes it as plain JSON")
    spec = _spec_from_config(hf, config_file)
    targets = _matched_targets(cfg, hf.get("target_modules"), config_file)
    return dataclasses.replace(spec, targets=targets)


def load_adapter(model, path: str | os.PathLike, *, rngs: nnx.Rngs | None = None) -> LoraSpec:
    """Read a PEFT LoRA directory into ``model`` (in place) and return its :class:`LoraSpec`.

    Any adapters the model has are replaced; the values are cast to the kernels' dtype and placed in their
    sharding. ``rngs`` seeds the dropout streams (default ``nnx.Rngs(0)``).

    Raises :class:`~cpo_jax.errors.UserFileNotFoundError` for a missing directory or ``adapter_config.json``,
    :class:`~cpo_jax.errors.UnsupportedConfig` for a ``peft_type`` other than LORA or a LoRA variant cpo_jax does not
    implement (DoRA, biases, rank patterns...), and :class:`~cpo_jax.errors.ModelError` for a target the model lacks,
    a missing weights file, a missing or extra tensor, or a tensor of the wrong shape (each naming the file/tensor).
    The model is only changed once everything has been checked.
    """
    cfg = model.config
    path = Path(path)
    spec = read_adapter_spec(cfg, path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        hint = (
            "PyTorch adapter_model.bin is not read: re-save it with PeftModel.save_pretrained(dir, "
            "safe_serialization=True)"
            if (path / "adapter_model.bin").is_file()
            else f"copy {WEIGHTS_FILE} next to {CONFIG_FILE}"
        )
        raise ModelError(f"no adapter weights: {WEIGHTS_FILE} is missing", where=str(path), hint=hint)

    modules = _targeted(cfg, spec)
    stacked = cfg.scan_layers
    expected = {}
    for module in modules:
        parts = [layer_linears(model, p)[0] for p in module.ours]
        d_in = parts[0].kernel_shape[-2]
        d_out = sum(p.kernel_shape[-1] for p in parts)
        for layer in range(cfg.num_layers):
            key = PREFIX + module.hf.format(i=layer)
            expected[f"{key}.lora_A.weight"] = (spec.rank, d_in)
            expected[f"{key}.lora_B.weight"] = (d_out, spec.rank)
    tensors = _read_tensors(weights, expected)

    remove_lora(model)
    add_lora(model, spec, rngs=rngs or nnx.Rngs(0), sites=lora_sites(cfg))
    for module in modules:
        parts = [layer_linears(model, p) for p in module.ours]
        widths = np.cumsum([p[0].kernel_shape[-1] for p in parts])[:-1]
        a_layers, b_layers = [], []
        for layer in range(cfg.num_layers):
            key = PREFIX + module.hf.format(i=layer)
            a_layers.append(tensors[f"{key}.lora_A.weight"].T)  # [in, r]
            b_layers.append(np.split(tensors[f"{key}.lora_B.weight"].T, widths, axis=-1))  # [r, out_k] per part
        for layer_index in range(1 if stacked else cfg.num_layers):

            def pick(values, layer_index=layer_index):
                return np.stack(values) if stacked else values[layer_index]

            linears = [p[layer_index] for p in parts]
            _assign(linears[0].lora_a, pick(a_layers))
            for k, lin in enumerate(linears):
                _assign(lin.lora_b, pick([b[k] for b in b_layers]))
    return spec


def _assign(var, value: np.ndarray) -> None:
    """Set ``var`` to ``value`` in its dtype and sharding (each device's block cut from the host value)."""
    old = var[...]
    value = np.ascontiguousarray(value.astype(np.dtype(old.dtype)))
    var.set_value(jax.make_array_from_callback(value.shape, old.sharding, lambda index: value[index]))
