"""Attention masks and the scaled dot-product attention core shared by all model families.

Layout: queries ``[B, T, N, H]``, keys and values ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query
attention). A mask is either a boolean ``[B, T, S]`` array (True where query ``t`` may attend to key ``s``) or a
:class:`MaskSpec`, the structured description that ``Transformer.forward`` builds once per layer type: query and
key slots, key validity (padding), segment ids (packing), the sliding window, and whether the call is a causal
self-attention without a KV cache. The dense mask is derived from the spec by :func:`attention_mask`; the fused
kernels read the structure instead.

Four implementations compute the same function (``TransformerConfig.attention_impl`` / ``model.attention_impl``):

* ``"xla"``: plain einsums with a float32 softmax. It supports everything (soft-capping, sinks, KV caches, any
  mask) and runs everywhere. It is the reference path and the default.
* ``"auto"``: :func:`jax.nn.dot_product_attention` with the dense mask and ``implementation=None``, i.e. JAX's
  own choice. In jax 0.10 that choice is always its XLA implementation (the source's TODO: "defaults to XLA for
  now"), so ``"auto"`` does not reach cuDNN; use ``"cudnn"`` for that.
* ``"cudnn"``: :func:`jax.nn.dot_product_attention` with ``implementation="cudnn"`` (cuDNN flash attention) and the
  structured arguments: ``is_causal=True`` and ``local_window_size=(W - 1, 0)`` always; a call with padding or
  packing also passes the dense mask, which JAX turns into an additive ``[B, 1, T, S]`` bias (the installed JAX's
  public API has no segment ids, and ``query_seq_lengths`` / ``key_value_seq_lengths`` describe only right padding,
  which is a property of the data, unknown when the step is traced). The fused kernel then never materialises the
  ``[B, N, T, S]`` scores. cuDNN's packed (ragged) layout exists only in a private API, needs a static bound on the
  segments per row, and keeps ``[B * M, N, T]`` softmax statistics; it is not used. Run on an H200 (2026-11-29,
  ``docs/benchmarks.md``): the padded 1B train step (the bias form) ended 7 AdamW steps at a loss within 3.6e-5
  (relative) of the XLA path's, at 2.3x its speed. ``tests/test_attention_paths.py::
  test_cudnn_fused_run_matches_xla_on_a_gpu``, the per-element check of values and gradients, has not run on a GPU.
* ``"best"``: the fused kernel this machine has, call by call: ``"cudnn"`` on a GPU, ``"splash"`` on a TPU, and
  ``"xla"`` where the fused kernel cannot take the call (no GPU or TPU, float32, a KV cache, soft-capping, sinks,
  splash under a mesh). The fallback is quiet, since no kernel was asked for. It is the trainer's default
  (``model.attention_impl``): on an H200, the 1B train step at 2048 tokens runs 2.3x faster with it than with
  ``"xla"``, whose saved ``[B, N, T, T]`` scores also need 64 GiB without remat (``docs/benchmarks.md``).
* ``"splash"``: the TPU Pallas kernel ``jax.experimental.pallas.ops.tpu.splash_attention`` (``make_splash_mha``)
  with a ``CausalMask`` or ``LocalMask((W - 1, 0))`` per head, segment ids for packing (padding becomes a segment of
  its own), grouped-query heads, soft-capping and sinks, all native to the kernel. Sequences are padded to a multiple
  of 128 (the kernel's lane width) and the block size is the largest of 512, 256 or 128 dividing that length. On a
  machine without a TPU it runs only inside :func:`splash_interpret` (Pallas interpret mode: slow, for tests).

A fused path that cannot take a call falls back to the XLA path and logs the reason once per (path, reason), never
per layer or step. The choice is made at trace time by the pure function :func:`plan_attention`:

=====================  ==================================================  ===========================================
call                   ``"cudnn"``                                         ``"splash"``
=====================  ==================================================  ===========================================
causal, no padding     fused (``is_causal``)                               fused (``CausalMask``)
padding (any side)     fused, dense mask as a bias                         fused, padding as its own segment
packing (segments)     fused, dense mask as a bias                         fused (``SegmentIds``)
sliding window         fused (``local_window_size``)                       fused (``LocalMask``)
soft-capping, sinks    XLA                                                 fused (kernel-native)
KV cache (decoding)    XLA                                                 XLA
dense mask argument    XLA                                                 XLA
other limits           no GPU / cuDNN; float32 inputs; head_dim not a      no TPU (outside interpret mode); a
                       multiple of 8 or above 128 (256 from Hopper on);    multi-device mesh (the kernel is not
                       compute capability below 8.0                        wrapped in ``shard_map`` yet)
=====================  ==================================================  ===========================================

Under ``scan_layers`` with both sliding and full layers the window is a traced per-layer flag; the fused paths then
run ``lax.cond`` over the two static variants.

Padding rows: a query with no visible key (left padding) gets a uniform distribution over keys on the XLA path
instead of NaN, so padding never poisons later layers. The fused paths give such rows other finite values (splash:
attention within the padding segment; cuDNN: the diagonal is unmasked for them). Only real tokens' outputs, and so
every gradient of a loss that ignores padding, agree between paths.

Attention sinks (gpt-oss): one learned logit per query head joins every row's softmax as an extra, value-less
key, ``p = softmax([scores, sink])[:-1]``, so a row may put weight on "nothing".
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

AttentionImpl = Literal["xla", "auto", "cudnn", "splash", "best"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "auto", "cudnn", "splash", "best")

#: Segment id given to padding tokens (and to the tail added to reach a block multiple) on the splash path.
PAD_SEGMENT = int(np.iinfo(np.int32).min)
#: Splash block sizes, tried largest first; every one is a multiple of the kernel's 128 lanes.
SPLASH_BLOCKS = (512, 256, 128)


def attention_mask(
    query_slots: jax.Array,
    key_slots: jax.Array,
    key_valid: jax.Array | None = None,
    *,
    query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
    sliding_window: int | jax.Array | None = None,
) -> jax.Array:
    """Causal mask with optional padding, packing segments and a sliding window.

    Args:
      query_slots: ``[B, T]`` or ``[T]`` int, the sequence (cache) slot of each query.
      key_slots: ``[S]`` int, the slot of each key.
      key_valid: ``[B, S]`` bool, False for padding keys.
      query_segments, key_segments: ``[B, T]`` and ``[B, S]`` int segment ids of packed sequences;
        a query only sees keys of its own segment.
      sliding_window: W; a query at slot ``q`` sees keys with ``q - W < s <= q`` (Mistral, Gemma 2).
        ``None`` or a value ``<= 0`` means no window. May be a traced scalar (layer scan).

    Returns:
      ``[B, T, S]`` bool (``[1, T, S]`` when nothing depends on the batch).
    """
    q = query_slots if query_slots.ndim == 2 else query_slots[None]
    q = q[:, :, None]
    s = key_slots[None, None, :]
    mask = s <= q
    if sliding_window is not None:
        window = jnp.asarray(sliding_window)
        in_window = s > q - window
        mask = mask & jnp.where(window > 0, in_window, True)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :].astype(bool)
    if query_segments is not None:
        if key_segments is None:
            key_segments = query_segments
        mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])
    return mask


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["query_slots", "key_slots", "key_valid", "segment_ids", "window_on"],
    meta_fields=["window", "causal"],
)
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The structure of one attention call's mask; :meth:`dense` is the ``[B, T, S]`` mask it stands for.

    Attributes:
      query_slots: ``[T]`` or ``[B, T]`` int, the slot of each query (``arange(T)``, offset by the cache index).
      key_slots: ``[S]`` int, the slot of each key.
      key_valid: ``[B, S]`` bool, False for padding keys; None when the call has no padding (statically).
      segment_ids: ``[B, T]`` int ids of packed sequences (self-attention: the keys' ids are the queries'); or None.
      window_on: None, or a traced bool scalar: the window applies only where it is True (``scan_layers`` over
        sliding and full layers).
      window: the static sliding window W (``q - W < s <= q``), or None.
      causal: True for self-attention without a cache: query ``t`` and key ``t`` are the same token at slot ``t``
        (``T == S``). Only such calls can take the fused kernels.
    """

    query_slots: jax.Array
    key_slots: jax.Array
    key_valid: jax.Array | None = None
    segment_ids: jax.Array | None = None
    window_on: jax.Array | None = None
    window: int | None = None
    causal: bool = False

    @property
    def sliding_window(self) -> int | jax.Array | None:
        """The window as :func:`attention_mask` takes it (a traced ``W`` or 0 under a traced ``window_on``)."""
        if self.window is None or self.window_on is None:
            return self.window
        return jnp.where(self.window_on, self.window, 0)

    def dense(self) -> jax.Array:
        """The boolean ``[B or 1, T, S]`` mask, from :func:`attention_mask`."""
        return attention_mask(
            self.query_slots,
            self.key_slots,
            self.key_valid,
            query_segments=self.segment_ids,
            sliding_window=self.sliding_window,
        )

    def with_window(self, window: int | None) -> MaskSpec:
        """This spec with a static window (``window_on`` resolved)."""
        return dataclasses.replace(self, window=window, window_on=None)

    def window_if(self, flag: jax.Array) -> MaskSpec:
        """This (sliding) spec with its window applying only where the traced ``flag`` is True."""
        return dataclasses.replace(self, window_on=jnp.asarray(flag, bool))


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """What :func:`dot_product_attention` runs for one call.

    Attributes:
      path: ``"xla"``, ``"auto"``, ``"cudnn"`` or ``"splash"``.
      form: for ``"cudnn"``, ``"causal"`` (``is_causal`` only) or ``"masked"`` (plus the dense mask as a bias).
      reason: why the requested implementation falls back to ``"xla"``; None when it runs as requested.
    """

    path: str
    form: str = ""
    reason: str | None = None


def plan_attention(
    implementation: str,
    *,
    platform: str,
    structured: bool = True,
    causal: bool = True,
    padded: bool = False,
    packed: bool = False,
    softcap: bool = False,
    sinks: bool = False,
    dtype=jnp.bfloat16,
    head_dim: int = 128,
    compute_capability: str | None = None,
    cudnn_available: bool = True,
    mesh_devices: int = 1,
    interpret: bool = False,
) -> AttentionPlan:
    """Which path takes a call (pure: every fact about the call and the machine is an argument).

    Args:
      implementation: the requested ``attention_impl``.
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``jax.devices()[0].platform``).
      structured: the mask came as a :class:`MaskSpec` (False: a dense array, usable by the XLA paths only).
      causal: :attr:`MaskSpec.causal` (False for KV-cache calls).
      padded, packed: the spec has key validity / segment ids.
      softcap, sinks: the call soft-caps its logits / has attention sinks.
      dtype, head_dim: of the queries.
      compute_capability: the GPU's, e.g. ``"9.0"``.
      cudnn_available: cuDNN was found (GPU only).
      mesh_devices: devices of the mesh the call is traced under (1 without one).
      interpret: Pallas interpret mode is on (:func:`splash_interpret`).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; expected one of {list(IMPLEMENTATIONS)}"
        )
    quiet = implementation == "best"  # no kernel was asked for: a fallback is the plan, not news
    if quiet:
        implementation = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
    if implementation == "xla":
        return AttentionPlan("xla")
    if implementation == "auto":
        if softcap:
            return AttentionPlan("xla", reason="logit soft-capping is not expressible in jax.nn.dot_product_attention")
        if sinks:
            return AttentionPlan("xla", reason="attention sinks are not expressible in jax.nn.dot_product_attention")
        return AttentionPlan("auto")
    fallback = lambda why: AttentionPlan("xla", reason=None if quiet else why)
    if implementation == "cudnn":
        if platform != "gpu":
            return fallback(f"cuDNN attention needs an NVIDIA GPU; this machine's platform is {platform}")
        if not cudnn_available:
            return fallback("cuDNN attention needs cuDNN, which this jaxlib does not find")
        if not structured:
            return fallback("a dense mask argument carries no structure for the fused kernel (pass a MaskSpec)")
        if not causal:
            return fallback("KV-cache attention (queries offset into a cache) is not a causal self-attention call")
        if softcap:
            return fallback("logit soft-capping (Gemma 2) is not supported by cuDNN attention")
        if sinks:
            return fallback("attention sinks (gpt-oss) are not supported by cuDNN attention")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return fallback(f"cuDNN flash attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}")
        capability = tuple(int(p) for p in (compute_capability or "0.0").split("."))
        if capability < (8, 0):
            return fallback(f"cuDNN flash attention needs compute capability 8.0 or newer, got {compute_capability}")
        limit = 256 if capability >= (9, 0) else 128
        if head_dim % 8 or head_dim > limit:
            return fallback(f"cuDNN flash attention needs head_dim a multiple of 8 up to {limit}, got {head_dim}")
        return AttentionPlan("cudnn", form="masked" if padded or packed else "causal")
    # splash
    if platform != "tpu" and not interpret:
        return fallback(f"splash attention is a TPU kernel; this machine's platform is {platform} (tests: interpret)")
    if not structured:
        return fallback("a dense mask argument carries no structure for the fused kernel (pass a MaskSpec)")
    if not causal:
        return fallback("KV-cache attention (queries offset into a cache) is not a causal self-attention call")
    if mesh_devices > 1:
        return fallback(f"splash attention under a {mesh_devices}-device mesh needs shard_map, not implemented yet")
    return AttentionPlan("splash")


_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("splash_interpret", default=False)
_LOGGED: set[tuple[str, str]] = set()


@contextlib.contextmanager
def splash_interpret(enabled: bool = True) -> Iterator[None]:
    """Calls traced inside run the splash kernel in Pallas interpret mode, on any backend (slow: for tests).

    The switch acts at trace time: a function jitted and traced before is not retraced by entering this."""
    token = _INTERPRET.set(enabled)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def _log_fallback(implementation: str, reason: str) -> None:
    if (implementation, reason) not in _LOGGED:
        _LOGGED.add((implementation, reason))
        log.warning("attention_impl=%r falls back to the XLA path: %s", implementation, reason)


def machine_facts() -> dict:
    """The facts of this machine that :func:`plan_attention` takes (not pure: reads the devices)."""
    device = jax.devices()[0]
    mesh = jax.sharding.get_abstract_mesh()
    facts = dict(
        platform=device.platform,
        compute_capability=getattr(device, "compute_capability", None),
        mesh_devices=1 if mesh.empty else int(mesh.size),
        cudnn_available=False,
    )
    if device.platform == "gpu":
        try:
            from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

            facts["cudnn_available"] = check_cudnn_version() is not None
        except Exception:  # no cuDNN, or a ROCm jaxlib
            facts["cudnn_available"] = False
    return facts


def _xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: float | None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    big_negative = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask[:, None, None, :, :], scores, big_negative)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    else:
        # head n = kv_head * groups + g, as the reshape of q above
        sink = jnp.broadcast_to(
            sinks.astype(jnp.float32).reshape(1, kv_heads, n // kv_heads, 1, 1), (*scores.shape[:-1], 1)
        )
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1].astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _per_window(spec: MaskSpec, run: Callable[[MaskSpec], jax.Array]) -> jax.Array:
    """``run(spec)`` with a static window: ``lax.cond`` over the sliding and full variants when it is traced."""
    if spec.window is None or spec.window_on is None:
        return run(spec)
    return jax.lax.cond(spec.window_on, lambda: run(spec.with_window(spec.window)), lambda: run(spec.with_window(None)))


def _cudnn_attention(q, k, v, spec: MaskSpec, *, scale: float, masked: bool) -> jax.Array:
    mask = None
    if masked:
        dense = jnp.broadcast_to(spec.dense(), (q.shape[0], q.shape[1], k.shape[1]))
        # A query with no visible key (left padding): let it see itself (finite output, discarded downstream).
        empty = ~jnp.any(dense, axis=-1, keepdims=True)
        dense = dense | (empty & jnp.eye(q.shape[1], k.shape[1], dtype=bool)[None])
        mask = dense[:, None]
    window = None if spec.window is None else (spec.window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=True, local_window_size=window, implementation="cudnn"
    )


def splash_block_size(length: int) -> tuple[int, int]:
    """``(padded length, block size)`` of the splash kernel for a sequence of ``length``: the length rounded up to a
    multiple of 128, and the largest of :data:`SPLASH_BLOCKS` that divides it."""
    padded = -(-length // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    return padded, next(b for b in SPLASH_BLOCKS if padded % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(length: int, num_heads: int, window: int | None, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, block = splash_block_size(length)
    shape = (length, length)
    head_mask = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    with jax.ensure_compile_time_eval():  # concrete mask tables, not tracers of the first trace (the kernel is cached)
        return sa.make_splash_mha(
            sa.MultiHeadMask([head_mask] * num_heads),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            attn_logits_soft_cap=softcap,
            interpret=interpret,
        )


def _splash_attention(q, k, v, spec: MaskSpec, *, scale, softcap, sinks, interpret) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, n, h = q.shape
    padded, _ = splash_block_size(t)
    segments = None
    if spec.segment_ids is not None or spec.key_valid is not None or padded != t:
        segments = jnp.zeros((b, t), jnp.int32) if spec.segment_ids is None else spec.segment_ids.astype(jnp.int32)
        if spec.key_valid is not None:
            segments = jnp.where(spec.key_valid, segments, PAD_SEGMENT)
        segments = jnp.pad(segments, ((0, 0), (0, padded - t)), constant_values=PAD_SEGMENT)
    dtype = q.dtype
    q = (q.astype(jnp.float32) * scale).astype(dtype)  # the kernel does not scale
    q, k, v = (jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (q, k, v))
    kernel = _splash_kernel(padded, n, spec.window, softcap, interpret)
    sink_logits = None if sinks is None else sinks.astype(jnp.float32)
    if segments is None:
        out = jax.vmap(lambda q, k, v: kernel(q, k, v, None, sink_logits))(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, SegmentIds(s, s), sink_logits))(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | MaskSpec,
    *,
    scale: float,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
    implementation: AttentionImpl = "xla",
    interpret: bool | None = None,
) -> jax.Array:
    """Masked multi-head attention with grouped-query support.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]`` with ``N % K == 0``.
      mask: a :class:`MaskSpec`, or a ``[B or 1, T, S]`` bool mask from :func:`attention_mask` (XLA paths only: the
        fused paths fall back for a dense mask).
      scale: multiplier of ``q @ k`` (``H ** -0.5`` for most models).
      softcap: Gemma 2's ``softcap * tanh(scores / softcap)``, applied before masking.
      sinks: ``[N]`` per-head sink logits (gpt-oss), or None.
      implementation: ``"xla"``, ``"auto"``, ``"cudnn"``, ``"splash"`` or ``"best"`` (module docstring;
        :func:`plan_attention`).
      interpret: run splash in Pallas interpret mode; None: as :func:`splash_interpret` says.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    spec = mask if isinstance(mask, MaskSpec) else None
    interpret = _INTERPRET.get() if interpret is None else interpret
    plan = AttentionPlan("xla")
    if implementation != "xla":
        plan = plan_attention(
            implementation,
            structured=spec is not None,
            causal=spec is not None and spec.causal,
            padded=spec is not None and spec.key_valid is not None,
            packed=spec is not None and spec.segment_ids is not None,
            softcap=softcap is not None,
            sinks=sinks is not None,
            dtype=q.dtype,
            head_dim=q.shape[-1],
            interpret=interpret,
            **machine_facts(),
        )
    if plan.reason is not None:
        _log_fallback(implementation, plan.reason)
    if plan.path == "cudnn":
        run = functools.partial(_cudnn_attention, q, k, v, scale=scale, masked=plan.form == "masked")
        return _per_window(spec, run)
    if plan.path == "splash":
        run = functools.partial(
            _splash_attention, q, k, v, scale=scale, softcap=softcap, sinks=sinks, interpret=interpret
        )
        return _per_window(spec, run)
    dense = spec.dense() if spec is not None else mask
    dense = jnp.broadcast_to(dense, (q.shape[0],) + dense.shape[1:])
    if plan.path == "auto":
        # Rows with no visible key: give them one (their output is discarded) to avoid NaN.
        empty = ~jnp.any(dense, axis=-1, keepdims=True)
        dense = dense | (empty & (jnp.arange(dense.shape[-1]) == 0))
        return jax.nn.dot_product_attention(q, k, v, mask=dense[:, None], scale=scale)
    return _xla_attention(q, k, v, dense, scale, softcap, sinks)
