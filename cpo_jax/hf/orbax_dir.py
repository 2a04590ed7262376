"""Orbax model directories: ``cpo-jax convert hf-to-orbax`` and its inverse, ``cpo-jax convert orbax-to-hf``.

An Orbax model directory holds ``params/`` (an Orbax checkpoint of the parameters in cpo_jax's own layout) next to
the HF directory's ``config.json`` and tokenizer files, copied unchanged. It is for loading: as ``model.path`` (or
``from_pretrained(dir, mesh=...)``) the parameters are restored straight into their target shardings, each host
reading only its own shards, with no safetensors parsing, transposes or fused-tensor splitting. That is what makes
a large model start faster on many devices. It holds no optimiser state and no training step: it is a model, not
a run (a run's ``checkpoints/`` are converted with ``cpo-jax convert orbax-to-hf RUN_DIR DST``).

:func:`orbax_to_hf` is the exact inverse of :func:`hf_to_orbax`: every tensor comes back with its values and dtype,
and ``config.json`` and the tokenizer files are copied back byte for byte (only the safetensors sharding may
differ from the original's).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cpo_jax.errors import CheckpointError
from cpo_jax.fileio import assemble_directory

PARAMS = "params"  # = cpo_jax.hf.pretrained.ORBAX_PARAMS
_WEIGHT_FILES = ("model.safetensors.index.json",)


def is_orbax_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`hf_to_orbax`: ``config.json`` and ``params/``, and no
    safetensors files."""
    path = Path(path)
    return (path / PARAMS).is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors"))


def _side_files(directory: Path):
    """The files of a model directory besides its weights: config.json, tokenizer files, generation config."""
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.suffix != ".safetensors" and file.name not in _WEIGHT_FILES:
            yield file


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the HF model ``src`` (a directory, a cached hub id, ``smollm2`` or ``tiny-random``) as an Orbax model
    directory ``dst``: ``params/`` with every parameter in its stored dtype, plus ``src``'s other files. ``dst``
    must not exist."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.hf.resolve import resolve_model_path

    path, dst = resolve_model_path(os.fspath(src)), Path(dst)
    if dst.exists():
        raise CheckpointError("the destination exists", where=str(dst), hint="choose a new directory")
    _, state = nnx.split(from_pretrained(path))  # param_dtype=None: each tensor keeps its stored dtype

    def write(tmp: Path) -> None:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save((tmp / PARAMS).absolute(), {"model": state})
        for file in _side_files(path):
            shutil.copyfile(file, tmp / file.name)

    return assemble_directory(dst, write)


def _stored_dtype(params: Path):
    """The one dtype of every parameter in ``params`` (None when they differ)."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(params.absolute()).item_metadata
    dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "dtype")}
    return dtypes.pop() if len(dtypes) == 1 else None


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the Orbax model directory ``src`` (see :func:`hf_to_orbax`) back as an HF directory ``dst``: the same
    tensors (values and dtype) in safetensors, and ``src``'s ``config.json`` and tokenizer files unchanged. A
    non-empty ``dst`` is refused unless ``overwrite``."""
    import jax.numpy as jnp

    from cpo_jax.hf.pretrained import from_pretrained, save_pretrained

    src, dst = Path(src), Path(dst)
    if not is_orbax_model_dir(src):
        raise CheckpointError(
            f"not an Orbax model directory (config.json + {PARAMS}/, as `cpo-jax convert hf-to-orbax` writes)",
            where=str(src),
        )
    if dst.is_file() or (dst.is_dir() and any(dst.iterdir()) and not overwrite):
        raise CheckpointError(
            "the destination exists and is not an empty directory",
            where=str(dst),
            hint="choose a new directory, or pass --overwrite to replace it",
        )
    if src.resolve() == dst.resolve() or dst.resolve() in src.resolve().parents:
        raise CheckpointError("the destination contains the source", where=str(dst), hint="choose another directory")
    dtype = _stored_dtype(src / PARAMS)
    model = from_pretrained(src, param_dtype=None if dtype is None else jnp.dtype(dtype))

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp / "hf")
        for file in (tmp / "hf").iterdir():
            os.replace(file, tmp / file.name)
        (tmp / "hf").rmdir()
        for file in _side_files(src):  # config.json and the tokenizer, byte for byte
            shutil.copyfile(file, tmp / file.name)

    return assemble_directory(dst, write)
