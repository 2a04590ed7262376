"""``reference="precomputed"``: one pass of the frozen reference over the training set, cached on disk.

The cache key hashes the validated records, the tokenisation settings, the tokenizer (vocabulary size,
chat template, special ids) and the reference checkpoint (``config.json`` and every safetensors file,
streamed), so any change to data or model computes a new cache. Files are written atomically
(``.tmp`` + rename). Training then holds no reference weights: each batch gets ``ref_chosen`` /
``ref_rejected`` looked up by example index.

A cache file is never trusted blindly: one that is not a plain ``.npy`` array (truncated, garbage, a pickle, an
archive) or not ``[rows, 2]`` float32 is recomputed with a warning and replaced; pickles are never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpo_jax.data import BatchConfig, PipelineConfig, TokenizeConfig, build_dataset
from cpo_jax.train.objectives import pair_logps, token_logps_from_batch

log = logging.getLogger(__name__)


def _hash_file(h, path: Path, chunk: int = 1 << 24) -> None:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def cache_key(records, tokenizer, tokenize: TokenizeConfig, model_path: str | os.PathLike) -> str:
    """sha256 over data, tokenisation and reference weights."""
    h = hashlib.sha256()
    h.update(json.dumps(list(records), sort_keys=True, ensure_ascii=False).encode())
    h.update(json.dumps(dataclasses.asdict(tokenize), sort_keys=True).encode())
    h.update(
        json.dumps(
            [len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None)],
            sort_keys=True,
            default=str,
        ).encode()
    )
    model_path = Path(model_path)
    weights = [*model_path.glob("*.safetensors"), *(p for p in (model_path / "params").rglob("*") if p.is_file())]
    for file in sorted([model_path / "config.json", *weights]):
        h.update(str(file.relative_to(model_path)).encode())
        _hash_file(h, file)
    return h.hexdigest()


def compute_reference_logps(
    model,
    records,
    sources,
    tokenizer,
    tokenize: TokenizeConfig,
    batch: BatchConfig,
    *,
    chunk_size: int = 1024,
    return_lengths: bool = False,
):
    """``[N, 2]`` float32 summed completion log-probs (chosen, rejected) per record; NaN where dropped.

    With ``return_lengths``, also the ``[N, 2]`` scored completion token counts (NaN where dropped).
    """
    out = np.full((len(records), 2), np.nan, np.float32)
    lengths = np.full((len(records), 2), np.nan, np.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, b):
        m = nnx.merge(graphdef, state)
        logps = pair_logps(token_logps_from_batch(m, b, chunk_size=chunk_size), b)
        return (
            jnp.stack([logps.chosen, logps.rejected], -1),
            jnp.stack([logps.chosen_lengths, logps.rejected_lengths], -1),
        )

    one_pass = PipelineConfig(kind="preference", shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    for b in build_dataset(records, tokenizer, tokenize, batch, one_pass, sources=sources):
        sums, counts = forward(state, {k: v for k, v in b.items() if k != "index"})
        filled = b["pair_mask"]
        out[b["index"][filled]] = np.asarray(sums)[filled]
        lengths[b["index"][filled]] = np.asarray(counts)[filled]
    return (out, lengths) if return_lengths else out


def read_cache(path: str | os.PathLike, rows: int) -> np.ndarray:
    """The ``[rows, 2]`` float32 array stored in the ``.npy`` file ``path``.

    Raises ``ValueError`` saying why the file cannot be used: not an ``.npy`` array (never unpickled), truncated,
    or another shape or dtype. The header is checked before the data is read, so a foreign file costs nothing."""
    try:
        values = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - garbage makes np.load raise almost anything
        raise ValueError(f"is not a readable .npy array ({type(err).__name__}: {err})") from err
    if not isinstance(values, np.ndarray):  # an .npz archive
        values.close()
        raise ValueError(f"is a {type(values).__name__} archive, not a single .npy array")
    if values.shape != (rows, 2) or values.dtype != np.float32:
        raise ValueError(f"holds a {values.dtype} array of shape {list(values.shape)}, expected float32 [{rows}, 2]")
    return np.array(values)


def load_or_compute(cache_dir: str | os.PathLike, key: str, compute, *, rows: int) -> np.ndarray:
    """The cached ``[rows, 2]`` float32 array for ``key``, computing and atomically writing it on a miss.

    A cache file that cannot be used (see :func:`read_cache`) is recomputed with a warning and replaced."""
    path = Path(cache_dir) / f"{key}.npy"
    if path.is_file():
        try:
            return read_cache(path, rows)
        except ValueError as err:
            log.warning("%s: the reference log-prob cache file %s; recomputing it", path, str(err)[:300])
    values = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, values)
        os.replace(tmp, path)
    return values
