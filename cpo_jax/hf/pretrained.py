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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cpo_jax.errors import ConfigError, ModelError, UnsupportedConfig, first_line
from cpo_jax.fileio import assemble_directory
from cpo_jax.hf.config import located
from cpo_jax.hf.families import FAMILIES, family_of
from cpo_jax.hf.resolve import read_json_object, require_model_dir, resolve_model_path
from cpo_jax.hf.weights import (
    MXFP4_GROUP,
    Binding,
    bind,
    check_names,
    group_parts,
    join_parts,
    mark_packed,
    mxfp4_shape,
    our_shape,
    read_block,
    to_hf,
)
from cpo_jax.models.config import TransformerConfig
from cpo_jax.models.lora import has_lora
from cpo_jax.models.quantize import is_quantized
from cpo_jax.models.transformer import Transformer
from cpo_jax.parallel.multihost import global_to_host

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}
INDEX_FILE = "model.safetensors.index.json"
ORBAX_PARAMS = "params"  # an Orbax parameter checkpoint next to config.json (cpo-jax convert hf-to-orbax)
REDOWNLOAD = "re-download or re-export the checkpoint (model.save_pretrained(dir) in transformers)"


def read_hf_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint directory as a dict.

    Raises :class:`UserFileNotFoundError` when ``path`` is not a directory with a config.json, and
    :class:`ModelError` naming ``config.json:line:column`` when it is not a valid JSON object.
    """
    return read_json_object(
        require_model_dir(path) / "config.json", hint="restore config.json from the original model (it is plain JSON)"
    )


def config_from_hf(hf: Mapping[str, Any], *, source: str | os.PathLike | None = None, **overrides) -> TransformerConfig:
    """Translate an HF config dict (any supported family) and apply field ``overrides``.

    Every problem with the dict raises :class:`UnsupportedConfig` naming the key and value; ``source`` (the
    config.json path) is then given as the error's location.
    """
    hf = dict(hf)
    with located(None if source is None else str(source)):
        if "model_type" not in hf:
            raise UnsupportedConfig(
                "config.json has no model_type", hint=f"add the model_type of the model, one of {sorted(FAMILIES)}"
            )
        quant = hf.get("quantization_config")
        method = quant.get("quant_method") if isinstance(quant, Mapping) else None
        if quant and method not in getattr(FAMILIES.get(hf["model_type"]), "QUANT_METHODS", ()):
            raise UnsupportedConfig(
                f"{hf['model_type']}: quantized checkpoints (quantization_config, quant_method={method!r}) are "
                "not supported",
                hint="dequantize it first (tools/import_gguf.py for a GGUF file)",
            )
        cfg = family_of(hf["model_type"]).config_from_hf(hf)
    if not overrides:
        return cfg
    try:
        return cfg.replace(**overrides)
    except ValueError as err:  # e.g. scan_layers on a model whose layers differ
        raise ConfigError(
            f"{cfg.model_type}: {err}", where=None if source is None else str(source), hint="change the model: section"
        ) from None


def _bad_safetensors(file: Path, err: Exception, tensor: str | None = None) -> ModelError:
    """The :class:`ModelError` for a safetensors file (and tensor) that safetensors refused to read."""
    where = f"{file}: tensor {tensor}" if tensor else str(file)
    if isinstance(err, OSError):
        return ModelError(
            f"cannot be read: {err.strerror or err}",
            where=where,
            hint="check that the file exists, is a regular file and is readable",
        )
    return ModelError(
        f"not a readable safetensors file (truncated, empty or corrupt?): {first_line(err)}",
        where=where,
        hint=REDOWNLOAD,
    )


def open_safetensors(file: str | os.PathLike):
    """``safe_open(file)`` (a context manager), or a :class:`ModelError` naming the file when it cannot be read."""
    file = Path(file)
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as err:
        raise _bad_safetensors(file, err) from None


def tensor_slice(handle, file: str | os.PathLike, name: str):
    """``handle.get_slice(name)``, or a :class:`ModelError` naming the file and the tensor."""
    try:
        return handle.get_slice(name)
    except SafetensorError as err:
        if name not in handle.keys():
            raise ModelError(
                "the file does not hold this tensor",
                where=f"{file}: tensor {name}",
                hint=f"{INDEX_FILE} maps it to this file: {REDOWNLOAD}",
            ) from None
        raise _bad_safetensors(Path(file), err, name) from None


def _index_files(path: Path, index: Path) -> dict[str, Path]:
    """The ``weight_map`` of ``model.safetensors.index.json``, checked: names map to shard files that exist."""
    hint = f"{INDEX_FILE} is written with the shards; {REDOWNLOAD}"
    weight_map = read_json_object(index, hint=hint).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ModelError("has no weight_map object (tensor name -> shard file)", where=str(index), hint=hint)
    files = {name: path / file for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise ModelError(
                f"names the shard file {file.name}, which is not in the directory",
                where=str(index),
                hint=f"the download is incomplete: {REDOWNLOAD}",
            )
    return files


def _no_weights_hint(path: Path) -> str:
    """What to do about a model directory without safetensors weights, from what it does hold."""
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        return (
            "PyTorch .bin/.pt weights are not read: convert them with transformers, "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    if any(path.glob("*.gguf")):
        return "a GGUF file must be converted first: python tools/import_gguf.py FILE.gguf OUT_DIR"
    return f"copy the model's *.safetensors files (and {INDEX_FILE} when sharded) next to config.json"


def tensor_files(path: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name to its safetensors file (sharded with an index, or single-file).

    Raises :class:`ModelError` naming the file for a missing, empty, truncated or corrupt file or index.
    """
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        return _index_files(path, index)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"no model weights: no *.safetensors files (and no {INDEX_FILE})",
            where=str(path),
            hint=_no_weights_hint(path),
        )
    names: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as f:
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
      path: the directory (sharded with ``model.safetensors.index.json`` or not), a directory written by
        ``cpo-jax convert hf-to-orbax`` (``config.json`` + an Orbax ``params/`` checkpoint), a Hugging Face hub id
        already in the local HF cache, or the command line's names ``smollm2`` and ``tiny-random``
        (:func:`cpo_jax.hf.resolve.resolve_model_path`).
      dtype: compute dtype of activations.
      param_dtype: parameter dtype; None keeps each tensor's stored dtype (exact round trips).
      mesh, rules: shard parameters by their logical axes (see :mod:`cpo_jax.parallel.sharding`);
        without a mesh everything lands on the first device.
      config_overrides: :class:`TransformerConfig` fields such as ``scan_layers``, ``remat`` or
        ``attention_impl``.

    Returns:
      A :class:`~cpo_jax.models.transformer.Transformer`.
    """
    path = resolve_model_path(os.fspath(path), check_config=False)
    hf = read_hf_config(path)
    classifier = is_sequence_classifier(hf)
    if classifier:  # a reward model has no lm_head: the (unused) output layer reads the embedding
        config_overrides = {"tie_embeddings": True, **config_overrides}
    cfg = config_from_hf(hf, source=path / "config.json", dtype=dtype, **config_overrides)
    if (path / ORBAX_PARAMS).is_dir() and not any(path.glob("*.safetensors")):
        return _from_orbax(path / ORBAX_PARAMS, cfg, param_dtype, mesh, rules)
    table = family_of(cfg.model_type).weight_table(cfg)
    bindings = bind(table, cfg.num_layers, cfg.scan_layers, cfg.num_experts)
    files = tensor_files(path)
    if classifier:
        files.pop(SCORE_TENSOR, None)
    bindings = mark_packed(bindings, files)  # e.g. gpt-oss's MXFP4 experts
    check_names(table, files, [name for b in bindings for name in b.stored_names], str(path))

    by_path: dict[tuple, list[Binding]] = {}
    for b in bindings:
        by_path.setdefault(b.path, []).append(b)

    graphdef, state = nnx.split(abstract_model(cfg))
    flat = []
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(open_safetensors(f)) for f in sorted(set(files.values()))}
        for var_path, var in nnx.to_flat_state(state):
            if var_path not in by_path:
                raise KeyError(f"{path}: no weight-table rule fills parameter {'.'.join(map(str, var_path))}")
            group = sorted(by_path[var_path], key=lambda b: (-1 if b.layer is None else b.layer, b.expert or 0))
            flat.append((var_path, var.replace(_load_param(var, group, files, handles, param_dtype, mesh, rules))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


SCORE_TENSOR = "score.weight"


def is_sequence_classifier(hf: Mapping[str, Any]) -> bool:
    """True for an HF ``*ForSequenceClassification`` config (a reward model)."""
    architectures = hf.get("architectures")
    return isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures
    )


def load_reward_model(path: str | os.PathLike, **kwargs) -> tuple[Transformer, jax.Array]:
    """``(backbone, head [D])`` of an HF ``*ForSequenceClassification`` directory with ``num_labels=1``.

    ``kwargs`` go to :func:`from_pretrained`. The score is ``head · h`` at the last non-pad token.
    """
    path = Path(path)
    hf = read_hf_config(path)
    config = str(path / "config.json")
    if not is_sequence_classifier(hf):
        raise ModelError(
            f"architectures={hf.get('architectures')} is not a *ForSequenceClassification reward model",
            where=config,
            hint="give a reward model saved by AutoModelForSequenceClassification "
            "(num_labels=1) or by a cpo-jax reward run",
        )
    num_labels = hf.get("num_labels", len(hf.get("id2label") or {0: 0}))
    if num_labels != 1:
        raise ModelError(
            f"a reward model has num_labels=1; this one has {num_labels}",
            where=config,
            hint="cpo_jax scores with a single-output head (num_labels=1)",
        )
    files = tensor_files(path)
    if SCORE_TENSOR not in files:
        raise ModelError(
            f"no {SCORE_TENSOR} tensor in the checkpoint (the reward head)", where=str(path), hint=REDOWNLOAD
        )
    model = from_pretrained(path, **kwargs)
    file = files[SCORE_TENSOR]
    with open_safetensors(file) as f:
        tensor = tensor_slice(f, file, SCORE_TENSOR)
        if tensor.get_dtype() not in SAFETENSORS_DTYPES:
            raise _unsupported_dtype(file, SCORE_TENSOR, tensor.get_dtype())
        score = np.asarray(tensor[:]).astype(np.float32)
    if score.shape != (1, model.config.hidden_size):
        raise ModelError(
            f"tensor {SCORE_TENSOR} has shape {score.shape}; expected (1, {model.config.hidden_size})",
            where=str(file),
            hint="the reward head does not match config.json's hidden_size",
        )
    return model, jnp.asarray(score[0])


def _unsupported_dtype(file: Path, name: str, stored: str) -> ModelError:
    return ModelError(
        f"tensor {name} has unsupported dtype {stored}",
        where=str(file),
        hint=f"cpo_jax reads {sorted(SAFETENSORS_DTYPES)} tensors; quantized or integer weights must be "
        f"converted to floating point first",
    )


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error message (without TensorStore's spec dump), at most ``limit`` characters."""
    text = first_line(err).split(" See full TensorStore details", 1)[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _orbax_shapes(params_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter path (``layers.0.attn.q.kernel``) -> shape stored in an Orbax ``params/`` checkpoint.

    Raises :class:`ModelError` naming the directory when its metadata cannot be read (an empty, partial or
    damaged checkpoint)."""
    import orbax.checkpoint as ocp

    reason = "its metadata is missing or unreadable"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.metadata(params_dir.absolute()).item_metadata
    except Exception as err:  # noqa: BLE001 - orbax raises many types for a damaged directory
        tree, reason = None, f"{reason} ({type(err).__name__}: {_first_line(err)})"
    if tree is None:
        raise ModelError(
            f"not a readable Orbax parameter checkpoint: {reason}",
            where=str(params_dir),
            hint="convert the model again with `cpo-jax convert hf-to-orbax SRC DST`",
        )
    shapes = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in keys]
        names = names[1:] if names[:1] == ["model"] else names
        names = names[:-1] if names[-1:] == ["value"] else names
        shapes[".".join(names)] = tuple(getattr(leaf, "shape", None) or ())
    return shapes


def orbax_mismatch(stored: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """How the parameter shapes stored in a checkpoint differ from those config.json implies, or None."""
    missing = [name for name in expected if name not in stored]
    if missing:
        return f"the checkpoint lacks {len(missing)} parameter(s) config.json implies, e.g. {missing[:5]}"
    extra = [name for name in stored if name not in expected]
    if extra:
        return f"the checkpoint holds {len(extra)} parameter(s) config.json does not have, e.g. {extra[:5]}"
    for name, shape in expected.items():
        if tuple(stored[name]) != tuple(shape):
            return (
                f"parameter {name} has shape {tuple(stored[name])} in the checkpoint; config.json implies "
                f"{tuple(shape)}"
            )
    return None


def _from_orbax(params_dir: Path, cfg: TransformerConfig, param_dtype, mesh, rules) -> Transformer:
    """Restore parameters saved by ``cpo-jax convert hf-to-orbax`` straight into their target shardings.

    Raises :class:`ModelError` naming ``params_dir`` when it is damaged or does not match config.json."""
    import orbax.checkpoint as ocp

    graphdef, state = nnx.split(abstract_model(cfg))
    flat = nnx.to_flat_state(state)
    expected = {".".join(map(str, p)): tuple(v.shape) for p, v in flat}
    stored = _orbax_shapes(params_dir)
    saved_scanned = not any(name.startswith("layers.0.") for name in stored)
    if saved_scanned != cfg.scan_layers:
        raise ModelError(
            f"was saved with scan_layers={saved_scanned}; this load asks for scan_layers={cfg.scan_layers}",
            where=str(params_dir),
            hint=f"load it with scan_layers={saved_scanned} (model.scan_layers), or load the HF "
            f"directory it was converted from",
        )
    mismatch = orbax_mismatch(stored, expected)
    if mismatch:
        raise ModelError(
            f"does not match config.json: {mismatch}",
            where=str(params_dir),
            hint=f"put back the config.json that was written next to {ORBAX_PARAMS}/, or convert again",
        )
    target = nnx.from_flat_state(
        [
            (p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_sharding_for(v, mesh, rules))))
            for p, v in flat
        ]
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(params_dir.absolute(), {"model": target})["model"]
    except Exception as err:  # noqa: BLE001 - tensorstore raises bare Exceptions for missing or truncated chunks
        raise ModelError(
            f"the Orbax parameter checkpoint is damaged: {type(err).__name__}: {_first_line(err)}",
            where=str(params_dir),
            hint="convert the model again with `cpo-jax convert hf-to-orbax SRC DST`",
        ) from None
    if param_dtype is not None:
        restored = jax.tree.map(lambda x: x.astype(param_dtype), restored)
    return nnx.merge(graphdef, restored)


def _packed_shape(b: Binding, blocks, scales, files) -> tuple[int, ...]:
    """The unpacked HF shape of a packed (MXFP4) tensor, checking its ``_blocks`` and ``_scales``."""
    blocks_name, scales_name = b.stored_names
    for name, t in ((blocks_name, blocks), (scales_name, scales)):
        if t.get_dtype() != "U8":
            raise ModelError(
                f"tensor {name} has dtype {t.get_dtype()}; MXFP4 blocks and scales are U8",
                where=str(files[name]),
                hint=REDOWNLOAD,
            )
    shape, scales_shape = tuple(blocks.get_shape()), tuple(scales.get_shape())
    if len(shape) < 3 or shape[-1] != MXFP4_GROUP // 2 or scales_shape != shape[:-1]:
        raise ModelError(
            f"MXFP4 tensors {blocks_name} {shape} and {scales_name} {scales_shape} do not fit: expected blocks "
            f"[..., out, in / {MXFP4_GROUP}, {MXFP4_GROUP // 2}] and scales [..., out, in / {MXFP4_GROUP}]",
            where=str(files[blocks_name]),
            hint=REDOWNLOAD,
        )
    return mxfp4_shape(shape)


def _load_param(var, group: list[Binding], files, handles, param_dtype, mesh, rules) -> jax.Array:
    shape = tuple(var.shape)

    def tensor(b: Binding, name: str | None = None):
        name = b.stored_names[0] if name is None else name  # a packed tensor's ``_blocks``
        return tensor_slice(handles[files[name]], files[name], name)

    first = tensor(group[0])
    # Leading axes our parameter stacks HF tensors along: ``layers`` (scanned layers), then ``expert`` (MoE).
    per_expert = group[0].expert is not None
    stacked = group[0].layer is not None and not any(isinstance(p, int) for p in group[0].path)
    lead = int(stacked) + int(per_expert)
    expected = tuple(shape[lead:])
    for b in group:
        hf = tensor(b)
        hf_shape = tuple(hf.get_shape())
        if b.packed:
            hf_shape = _packed_shape(b, hf, tensor(b, b.stored_names[1]), files)
        try:
            ours = our_shape(b.rule, hf_shape)
        except ValueError:  # a split axis that does not divide
            ours = None
        if ours != expected:
            raise ModelError(
                f"tensor {b.hf_name} has shape {hf_shape}, the config implies {expected} (after "
                f"{'transpose' if b.rule.transpose else 'no transpose'}{', split' if b.rule.split else ''})",
                where=str(files[b.hf_name]),
                hint="config.json does not describe these weights: use the config.json saved with them",
            )
        if not b.packed and hf.get_dtype() not in SAFETENSORS_DTYPES:
            raise _unsupported_dtype(files[b.hf_name], b.hf_name, hf.get_dtype())
    if param_dtype is not None:
        dtype = jnp.dtype(param_dtype)
    elif group[0].packed:  # every MXFP4 value is exact in bfloat16, the dtype transformers dequantises the Hub's to
        dtype = jnp.dtype(jnp.bfloat16)
    else:
        dtype = jnp.dtype(SAFETENSORS_DTYPES[first.get_dtype()])

    def read(b: Binding, index) -> np.ndarray:
        name = b.stored_names[0]
        try:
            if b.packed:
                return read_block(handles[files[name]], b, index, scales_handle=handles[files[b.stored_names[1]]])
            return read_block(handles[files[name]], b, index)
        except SafetensorError as err:
            raise _bad_safetensors(files[name], err, name) from None

    by_key = {((b.layer,) if stacked else ()) + ((b.expert,) if per_expert else ()): b for b in group}

    def block(index):
        ranges = [range(*s.indices(n)) for s, n in zip(index[:lead], shape[:lead])]

        def gather(key: tuple) -> np.ndarray:
            if len(key) == lead:
                return np.asarray(read(by_key[key], index[lead:]))
            return np.stack([gather((*key, j)) for j in ranges[len(key)]])

        return gather(()).astype(dtype)

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
    """Yield ``(hf_name, numpy array)`` in table order, rebuilding HF layouts (transposes, fused qkv).

    Raises ``ValueError`` for a model with LoRA adapters, which the HF layout has no place for: export
    ``cpo_jax.models.lora.merge_lora(model)``, or the adapters alone with ``cpo_jax.hf.peft.save_adapter``; and for
    a model whose decoder weights are stored quantised (QLoRA), which has no float kernels to write: export
    ``merge_lora(model)`` or ``cpo_jax.models.quantize.dequantize_model(model)``, both plain float models."""
    if has_lora(model):
        raise ValueError(
            "the model has LoRA adapters: export merge_lora(model) (the merged weights) or save the "
            "adapters with cpo_jax.hf.peft.save_adapter"
        )
    if is_quantized(model):
        raise ValueError(
            "the model's decoder weights are stored quantised (QLoRA): export merge_lora(model) or "
            "dequantize_model(model) (plain float models with the dequantised weights)"
        )
    cfg = model.config
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    bindings = bind(family_of(cfg.model_type).weight_table(cfg), cfg.num_layers, cfg.scan_layers, cfg.num_experts)
    for name, parts in group_parts(bindings):
        arrays = []
        for b in parts:
            value = params[b.path][...]
            if cfg.scan_layers and b.layer is not None:
                value = value[b.layer]
            if b.expert is not None:
                value = value[b.expert]
            arrays.append(to_hf(b.rule, global_to_host(value)))
        tensor = join_parts(parts[0].rule, arrays)
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
        raise ValueError(
            "a reward model export needs pad_token_id (HF scores the last non-pad token): set it "
            "in the config or pass a tokenizer that has one"
        )
    architectures = []
    for arch in hf.get("architectures") or []:
        base = next((arch[: -len(s)] for s in _LM_SUFFIXES if arch.endswith(s)), arch)
        architectures.append(base + "ForSequenceClassification")
    hf = {
        **hf,
        "architectures": architectures,
        "pad_token_id": int(pad),
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
    }
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

    def write(tmp: Path) -> None:
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
            str(np.dtype(stored_dtype)), str(np.dtype(stored_dtype))
        )
        hf.pop("torch_dtype", None)
        with open(tmp / "config.json", "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    assemble_directory(path, write)
    return path
