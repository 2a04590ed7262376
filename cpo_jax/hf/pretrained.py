"""Load Hugging Face checkpoint directories into cpo_jax models and export them back.

``from_pretrained`` builds the model abstractly (no weights allocated), then creates each parameter
with :func:`jax.make_array_from_callback` in its target sharding: every device's block is read from
the memory-mapped safetensors file on its own, so no host ever holds a full copy per device and, on
a pod, each host reads only the blocks of its own devices.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from cpo_jax.hf.weights import (
    Binding,
    bind,
    check_names,
    group_parts,
    our_shape,
    read_block,
    to_hf,
)
from cpo_jax.models import gemma, gpt2, llama
from cpo_jax.models.config import TransformerConfig
from cpo_jax.models.hf_config import UnsupportedConfig
from cpo_jax.models.transformer import Transformer
from cpo_jax.parallel.multihost import global_to_host

FAMILIES = {t: module for module in (llama, gemma, gpt2) for t in module.MODEL_TYPES}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}
INDEX_FILE = "model.safetensors.index.json"
ORBAX_PARAMS = "params"  # an Orbax parameter checkpoint next to config.json (cpo-jax convert hf-to-orbax)


def family_of(model_type: str):
    """The family module (``llama``, ``gemma`` or ``gpt2``) for an HF ``model_type``."""
    if model_type not in FAMILIES:
        raise UnsupportedConfig(f"unsupported model_type {model_type!r}; cpo_jax supports {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def read_hf_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint directory as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json in the checkpoint directory")
    with open(file) as f:
        return json.load(f)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> TransformerConfig:
    """Translate an HF config dict (any supported family) and apply field ``overrides``."""
    hf = dict(hf)
    if "model_type" not in hf:
        raise UnsupportedConfig("config.json has no model_type")
    if hf.get("quantization_config"):
        raise UnsupportedConfig(f"{hf['model_type']}: quantized checkpoints (quantization_config) are not supported")
    cfg = family_of(hf["model_type"]).config_from_hf(hf)
    return cfg.replace(**overrides) if overrides else cfg


def tensor_files(path: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name to its safetensors file (sharded with an index, or single-file)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():  # safe_open handles are not dicts
                names[name] = file
    return names


def abstract_model(cfg: TransformerConfig) -> Transformer:
    """The model with ShapeDtypeStruct parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _sharding_for(var, mesh, rules):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    from cpo_jax.parallel.sharding import logical_sharding

    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return logical_sharding(names, var.shape, mesh, rules)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping | None = None,
    **config_overrides,
) -> Transformer:
    """Load an HF checkpoint directory (``config.json`` + ``*.safetensors``) as a cpo_jax model.

    Args:
      path: the directory (sharded with ``model.safetensors.index.json`` or not), or a directory written by
        ``cpo-jax convert hf-to-orbax`` (``config.json`` + an Orbax ``params/`` checkpoint).
      dtype: compute dtype of activations.
      param_dtype: parameter dtype; None keeps each tensor's stored dtype (exact round trips).
      mesh, rules: shard parameters by their logical axes (see :mod:`cpo_jax.parallel.sharding`);
        without a mesh everything lands on the first device.
      config_overrides: :class:`TransformerConfig` fields such as ``scan_layers``, ``remat`` or
        ``attention_impl``.

    Returns:
      A :class:`~cpo_jax.models.transformer.Transformer`.
    """
    path = Path(path)
    hf = read_hf_config(path)
    classifier = is_sequence_classifier(hf)
    if classifier:  # a reward model has no lm_head: the (unused) output layer reads the embedding
        config_overrides = {"tie_embeddings": True, **config_overrides}
    cfg = config_from_hf(hf, dtype=dtype, **config_overrides)
    if (path / ORBAX_PARAMS).is_dir() and not any(path.glob("*.safetensors")):
        return _from_orbax(path / ORBAX_PARAMS, cfg, param_dtype, mesh, rules)
    table = family_of(cfg.model_type).weight_table(cfg)
    bindings = bind(table, cfg.num_layers, cfg.scan_layers)
    files = tensor_files(path)
    if classifier:
        files.pop(SCORE_TENSOR, None)
    check_names(table, list(files), [b.hf_name for b in bindings], str(path))

    by_path: dict[tuple, list[Binding]] = {}
    for b in bindings:
        by_path.setdefault(b.path, []).append(b)

    graphdef, state = nnx.split(abstract_model(cfg))
    flat = []
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in set(files.values())}
        for var_path, var in nnx.to_flat_state(state):
            if var_path not in by_path:
                raise KeyError(f"{path}: no weight-table rule fills parameter {'.'.join(map(str, var_path))}")
            group = sorted(by_path[var_path], key=lambda b: -1 if b.layer is None else b.layer)
            flat.append((var_path, var.replace(_load_param(var, group, files, handles, param_dtype, mesh, rules))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


SCORE_TENSOR = "score.weight"


def is_sequence_classifier(hf: Mapping[str, Any]) -> bool:
    """True for an HF ``*ForSequenceClassification`` config (a reward model)."""
    return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def load_reward_model(path: str | os.PathLike, **kwargs) -> tuple[Transformer, jax.Array]:
    """``(backbone, head [D])`` of an HF ``*ForSequenceClassification`` directory with ``num_labels=1``.

    ``kwargs`` go to :func:`from_pretrained`. The score is ``head · h`` at the last non-pad token.
    """
    path = Path(path)
    hf = read_hf_config(path)
    if not is_sequence_classifier(hf):
        raise ValueError(f"{path}: architectures={hf.get('architectures')} is not a *ForSequenceClassification "
                         f"reward model")
    if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise ValueError(f"{path}: a reward model has num_labels=1; this one has {hf.get('num_labels')}")
    files = tensor_files(path)
    if SCORE_TENSOR not in files:
        raise KeyError(f"{path}: no {SCORE_TENSOR} tensor in the checkpoint")
    model = from_pretrained(path, **kwargs)
    with safe_open(files[SCORE_TENSOR], framework="numpy") as f:
        score = np.asarray(f.get_slice(SCORE_TENSOR)[:]).astype(np.float32)
    if score.shape != (1, model.config.hidden_size):
        raise ValueError(f"{path}: {SCORE_TENSOR} has shape {score.shape}; expected (1, {model.config.hidden_size})")
    return model, jnp.asarray(score[0])


def _from_orbax(params_dir: Path, cfg: TransformerConfig, param_dtype, mesh, rules) -> Transformer:
    """Restore parameters saved by ``cpo-jax convert hf-to-orbax`` straight into their target shardings."""
    import orbax.checkpoint as ocp

    graphdef, state = nnx.split(abstract_model(cfg))
    flat = nnx.to_flat_state(state)
    target = nnx.from_flat_state([(p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_sharding_for(
        v, mesh, rules)))) for p, v in flat])
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(params_dir.absolute(), {"model": target})["model"]
    if param_dtype is not None:
        restored = jax.tree.map(lambda x: x.astype(param_dtype), restored)
    return nnx.merge(graphdef, restored)


def _load_param(var, group: list[Binding], files, handles, param_dtype, mesh, rules) -> jax.Array:
    shape = tuple(var.shape)
    first = handles[files[group[0].hf_name]].get_slice(group[0].hf_name)
    stacked = group[0].layer is not None and len(shape) == len(first.get_shape()) + 1
    for b in group:
        hf_shape = handles[files[b.hf_name]].get_slice(b.hf_name).get_shape()
        expected = shape[1:] if stacked else shape
        if our_shape(b.rule, hf_shape) != tuple(expected):
            raise ValueError(
                f"{files[b.hf_name]}: tensor {b.hf_name} has shape {tuple(hf_shape)}, the config implies "
                f"{tuple(expected)} (after {'transpose' if b.rule.transpose else 'no transpose'}"
                f"{', split' if b.rule.split else ''})"
            )
    stored = first.get_dtype()
    if stored not in SAFETENSORS_DTYPES:
        raise ValueError(f"{files[group[0].hf_name]}: tensor {group[0].hf_name} has unsupported dtype {stored}")
    dtype = jnp.dtype(param_dtype) if param_dtype is not None else jnp.dtype(SAFETENSORS_DTYPES[stored])

    def block(index):
        if stacked:
            layers = range(*index[0].indices(shape[0]))
            parts = [read_block(handles[files[group[i].hf_name]], group[i], index[1:]) for i in layers]
            return np.stack(parts).astype(dtype)
        return np.asarray(read_block(handles[files[group[0].hf_name]], group[0], index)).astype(dtype)

    return jax.make_array_from_callback(shape, _sharding_for(var, mesh, rules), block)


# --------------------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * units[unit])
    return int(s)


def export_tensors(model: Transformer, dtype=None):
    """Yield ``(hf_name, numpy array)`` in table order, rebuilding HF layouts (transposes, fused qkv)."""
    cfg = model.config
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    bindings = bind(family_of(cfg.model_type).weight_table(cfg), cfg.num_layers, cfg.scan_layers)
    for name, parts in group_parts(bindings):
        arrays = []
        for b in parts:
            value = params[b.path][...]
            if cfg.scan_layers and b.layer is not None:
                value = value[b.layer]
            arrays.append(to_hf(b.rule, global_to_host(value)))
        tensor = np.concatenate(arrays, axis=parts[0].rule.split[0]) if parts[0].rule.split else arrays[0]
        yield name, (tensor.astype(dtype) if dtype is not None else tensor)


_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _as_sequence_classifier(hf: dict, tensors, head, tokenizer, dtype, hidden_size: int):
    """``(config, tensors)`` of a ``num_labels=1`` ``*ForSequenceClassification`` checkpoint."""
    head = global_to_host(jnp.asarray(head)).reshape(-1)
    if head.shape != (hidden_size,):
        raise ValueError(f"score_head has {head.shape[0]} values; the model's hidden size is {hidden_size}")
    pad = hf.get("pad_token_id")
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("a reward model export needs pad_token_id (HF scores the last non-pad token): set it "
                         "in the config or pass a tokenizer that has one")
    architectures = []
    for arch in hf.get("architectures") or []:
        base = next((arch[: -len(s)] for s in _LM_SUFFIXES if arch.endswith(s)), arch)
        architectures.append(base + "ForSequenceClassification")
    hf = {**hf, "architectures": architectures, "pad_token_id": int(pad), "num_labels": 1,
          "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    score = head[None, :].astype(dtype if dtype is not None else head.dtype)

    def generate():
        for name, tensor in tensors:
            if name != "lm_head.weight":
                yield name, tensor
        yield "score.weight", score

    return hf, generate()


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_size: int | str = "5GB",
    score_head=None,
) -> Path:
    """Write ``model`` as an HF checkpoint directory that ``AutoModelForCausalLM.from_pretrained`` reads.

    Writes ``config.json`` (the source config with ``dtype`` updated), ``model.safetensors`` or
    ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` past ``max_shard_size``, and
    the tokenizer files when ``tokenizer`` is given. The directory is assembled next to ``path`` and
    moved into place at the end, so a crash never leaves a half-written checkpoint at ``path``.

    With ``score_head`` (``[D]``, a reward model's scalar head) it writes a reward model that
    ``AutoModelForSequenceClassification.from_pretrained`` reads instead: no ``lm_head``, the head as
    ``score.weight`` ``[1, D]``, ``num_labels = 1``, and the ``*ForSequenceClassification`` architecture.
    HF scores the last non-pad token, so the config must carry a ``pad_token_id`` (taken from the
    tokenizer when the source config has none).
    """
    cfg = model.config
    if cfg.hf_config is None:
        raise ValueError("model has no source HF config (it was not loaded with from_pretrained)")
    hf = dict(cfg.hf_config)
    tensors = export_tensors(model, dtype)
    if score_head is not None:
        hf, tensors = _as_sequence_classifier(hf, tensors, score_head, tokenizer, dtype, cfg.hidden_size)
    path = Path(path)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    stored_dtype = None
    for name, tensor in tensors:
        stored_dtype = stored_dtype or tensor.dtype
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    if jax.process_index() != 0:
        return path

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        if len(shards) > 1:
            total = sum(t.nbytes for shard in shards for t in shard.values())
            with open(tmp / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        hf["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
            str(np.dtype(stored_dtype)), str(np.dtype(stored_dtype)))
        hf.pop("torch_dtype", None)
        with open(tmp / "config.json", "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
