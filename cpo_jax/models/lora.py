"""LoRA adapters on the decoder's projections (Hu et al. 2021, arXiv:2106.09685), with PEFT's conventions.

An adapted :class:`~cpo_jax.models.layers.Linear` computes

    ``y = x @ W (+ b) + scale * (dropout(x) @ A) @ B``,  ``A`` = ``lora_a`` ``[in, r]``, ``B`` = ``lora_b`` ``[r, out]``

and ``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732), as PEFT's
``LoraLayer``. ``A`` and ``B`` are ``nnx.LoRAParam`` variables, so ``nnx.split(model, nnx.LoRAParam, ...)`` (or the
filter ``nnx.LoRAParam`` in ``nnx.DiffState`` / ``nnx.Optimizer(wrt=...)``) separates them from the base weights.
``nnx.LoRAParam`` subclasses ``nnx.Param``: a filter ``nnx.Param`` placed before it also takes the adapters.

Layout. ``A`` carries the logical axes ``(kernel_in, None)`` and ``B`` ``(None, kernel_out)`` of the kernel it
adapts (``("embed", None)`` and ``(None, "heads")`` for ``attn.q``), with the leading ``layers`` axis under
``scan_layers``, and :func:`add_lora` places them in the kernel's own sharding. Initialisation is PEFT's default:
``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (``kaiming_uniform_(a=sqrt(5))`` of torch's ``[r, in]`` weight, fan-in ``in``) and
``B = 0``, so fresh adapters leave the logits bit-identical.

Which projections an HF module name adapts (``q_proj`` -> ``attn.q``; GPT-2's ``c_proj`` -> ``attn.o`` and
``mlp.down``) is data about HF's layout: the caller passes it as ``sites``, derived from the family's weight table
(:func:`cpo_jax.hf.peft.lora_sites`; :func:`cpo_jax.hf.peft.add_adapter` does both). A fused HF projection such as
GPT-2's ``c_attn`` (q, k and v in one ``Conv1D``) is one PEFT adapter: our ``attn.q``, ``attn.k`` and ``attn.v`` then
share one ``A`` variable (an NNX shared reference: it appears once in the state, under the first of them in
path order, and its gradient sums the three uses), and each holds its part of ``B``.

Dropout (``spec.dropout > 0``) is an ``nnx.Dropout`` per adapted projection, created in eval mode (off): turn it on
with ``model.train()`` or ``nnx.view(model, deterministic=False)``. The decoder's layer loops carry the dropout RNG
streams out of ``jax.checkpoint`` / ``jax.lax.scan``, so every call draws new masks. With ``dropout == 0`` there is
no dropout module and no RNG state. (PEFT draws one mask for a fused ``c_attn``; here q, k and v draw their own.)

Base behaviour with the adapters off, without a copy of the base: :func:`zero_adapters` sets every ``B`` of a state
to zero. The added term is then ``(x @ A) @ 0 = 0`` exactly (for finite activations), so the logits equal the base
model's bit for bit; the cost is the two thin matmuls per projection.

QLoRA: adapters work the same on a model whose frozen base is stored quantised
(:func:`cpo_jax.models.quantize.quantize_model`, before or after :func:`add_lora`): ``A`` and ``B`` take the original
kernel's dtype and the codes' placement, and :func:`merge_lora` dequantises, so the merged model is a plain float
model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cpo_jax.errors import ConfigError
from cpo_jax.models.layers import Linear
from cpo_jax.models.quantize import dequantize_model

LoraSites = Mapping[str, Sequence[Sequence[str]]]
"""HF module name (``q_proj``, ``c_attn``) -> the HF modules of one decoder layer it names, each as the paths of our
:class:`Linear` modules inside a layer that make it up (``(("attn.o",), ("mlp.down",))`` for GPT-2's ``c_proj``;
``(("attn.q", "attn.k", "attn.v"),)`` for the fused ``c_attn``, whose parts share ``A``)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A LoRA configuration, in PEFT's terms (``LoraConfig``).

    Attributes:
      rank: ``r``, the adapter rank.
      alpha: ``lora_alpha``; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
      dropout: ``lora_dropout``, applied to the adapter's input in train mode.
      targets: HF module names (``q_proj``, ``v_proj``, GPT-2's ``c_attn``...); None = every linear projection of
        the decoder layers (not the embedding or ``lm_head``).
      use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    use_rslora: bool = False

    def __post_init__(self):
        where = "lora"
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}", where=f"{where}.rank")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be a finite number, got {self.alpha!r}", where=f"{where}.alpha")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}", where=f"{where}.dropout")
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(
                    f"targets must be a non-empty list of module names or null, got {self.targets!r}",
                    where=f"{where}.targets",
                )
            object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))

    @property
    def scale(self) -> float:
        """The factor on ``(x @ A) @ B``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT's ``scaling``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def layer_linears(model, path: str) -> list[Linear]:
    """The :class:`Linear` at ``path`` (e.g. ``"attn.q"``) of every decoder layer of ``model``: one per layer, or a
    single stacked module (leading ``layers`` axis on its variables) under ``scan_layers``."""
    blocks = [model.layers] if model.config.scan_layers else list(model.layers)
    out = []
    for block in blocks:
        module = block
        for part in path.split("."):
            module = getattr(module, part, None)
        if not isinstance(module, Linear):
            raise ValueError(f"decoder layers have no projection {path!r}")
        out.append(module)
    return out


def lora_modules(model) -> list[tuple[tuple, Linear]]:
    """``(path, Linear)`` of every projection of ``model`` that has an adapter, in path order."""
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora_a is not None]


def has_lora(model) -> bool:
    """True when some projection of ``model`` has a LoRA adapter."""
    return bool(lora_modules(model))


def resolve_targets(spec: LoraSpec, sites: LoraSites, family: str = "this model") -> tuple[str, ...]:
    """The HF module names ``spec`` adapts (all of ``sites`` when ``spec.targets`` is None).

    Raises :class:`~cpo_jax.errors.ConfigError` naming the valid names when a target is not one of ``sites``."""
    if spec.targets is None:
        return tuple(sites)
    unknown = [t for t in spec.targets if t not in sites]
    if unknown:
        raise ConfigError(
            f"unknown LoRA target(s) {unknown} for {family}",
            where="lora.targets",
            hint=f"the projections of {family} are {list(sites)} (null: all of them)",
        )
    return spec.targets


def _sharding_like(kernel: jax.Array, dims: tuple[int | None, ...]):
    """``kernel``'s sharding for an array whose dimensions are the kernel's ``dims`` (None: a new, unsharded one)."""
    sharding = kernel.sharding
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(None if d is None else spec[d] for d in dims)))


def place_like(value, kernel: jax.Array, dims: tuple[int | None, ...]) -> jax.Array:
    """``value`` (the same on every host) as an array on ``kernel``'s devices, sharded like the kernel's dimensions
    ``dims`` (None: a new, unsharded dimension). Each device's block is cut from the host value, so this works on a
    multi-host mesh. Under a trace (``nnx.eval_shape``, ``jax.jit``) ``value`` is returned as it is: the caller's
    out_shardings (from the ``out_sharding`` metadata) place it."""
    if isinstance(kernel, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return value
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, _sharding_like(kernel, dims), lambda index: host[index])


def _base_weight(module: Linear) -> tuple[nnx.Variable, jax.Array, tuple[int, ...], np.dtype]:
    """``(variable with the logical axes, array with the placement, (*layers, in, out), dtype)`` of the weight an
    adapter of ``module`` adapts: its kernel, or its codes when quantised (placed like the kernel, same rank)."""
    if module.quant is None:
        k = module.kernel[...]
        return module.kernel, k, tuple(k.shape), k.dtype
    return module.kernel_codes, module.kernel_codes[...], module.kernel_shape, module.quant.dtype


def _adapter_axes(kernel_var, lead: int) -> tuple[tuple, tuple]:
    """Logical axes of ``A`` and ``B`` from the kernel's ``out_sharding`` (``(*lead, in, out)``)."""
    axes = kernel_var.get_metadata().get("out_sharding") or (None,) * (lead + 2)
    *stack, k_in, k_out = axes
    return (*stack, k_in, None), (*stack, None, k_out)


def _dropout_stream(rngs: nnx.Rngs, layers: int | None, kernel: jax.Array) -> nnx.RngStream:
    """A dropout RNG stream (one key per layer when stacked), on the kernel's devices (replicated)."""
    key = rngs.dropout() if "dropout" in rngs else rngs.default()
    key = key if layers is None else jax.random.split(key, layers)
    if isinstance(kernel, jax.core.Tracer):
        return nnx.RngStream(key, tag="dropout")
    data = jax.random.key_data(key)
    stream = nnx.RngStream(jax.random.wrap_key_data(place_like(data, kernel, (None,) * data.ndim)), tag="dropout")
    stream.count.set_value(place_like(stream.count[...], kernel, (None,) * stream.count[...].ndim))
    return stream


def add_lora(model, spec: LoraSpec, *, rngs: nnx.Rngs, sites: LoraSites):
    """Attach fresh LoRA adapters (``B = 0``) to the projections ``spec.targets`` names, in place; returns ``model``.

    Args:
      model: a :class:`~cpo_jax.models.transformer.Transformer` without adapters.
      spec: rank, alpha, dropout, targets, rsLoRA.
      rngs: draws ``A`` (``rngs.params``) and seeds the dropout streams (``rngs.dropout`` or the default stream).
      sites: HF module name -> our projections (:data:`LoraSites`), e.g. :func:`cpo_jax.hf.peft.lora_sites`.

    Raises :class:`~cpo_jax.errors.ConfigError` for a target not in ``sites`` (listing the valid names) and
    ``ValueError`` when the model already has adapters.
    """
    cfg = model.config
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters: remove_lora(model) or merge_lora(model) first")
    targets = resolve_targets(spec, sites, f"{cfg.model_type} ({cfg.family} family)")
    stacked = cfg.scan_layers
    layers = cfg.num_layers if stacked else None
    lead = (cfg.num_layers,) if stacked else ()
    for name in targets:
        for group in sites[name]:
            per_part = [layer_linears(model, path) for path in group]  # [part][layer or stacked]
            for modules in zip(*per_part):
                first, kernel, shape, dtype = _base_weight(modules[0])
                d_in = shape[-2]
                a_axes, _ = _adapter_axes(first, len(lead))
                bound = 1.0 / math.sqrt(d_in)
                a = jax.random.uniform(rngs.params(), (*lead, d_in, spec.rank), jnp.float32, -bound, bound)
                nd = kernel.ndim
                a_var = nnx.LoRAParam(
                    place_like(a.astype(dtype), kernel, (*range(nd - 2), nd - 2, None)),
                    out_sharding=a_axes,
                    eager_sharding=False,
                )
                for module in modules:
                    var, k, shape, dtype = _base_weight(module)
                    _, b_axes = _adapter_axes(var, len(lead))
                    b = jnp.zeros((*lead, spec.rank, shape[-1]), dtype)
                    module.lora_a = a_var  # shared by the parts of a fused projection
                    module.lora_b = nnx.LoRAParam(
                        place_like(b, k, (*range(nd - 2), None, nd - 1)), out_sharding=b_axes, eager_sharding=False
                    )
                    module.lora_scale = spec.scale
                    if spec.dropout > 0:
                        stream = _dropout_stream(rngs, layers, k)
                        dropout = nnx.Dropout(spec.dropout, deterministic=True)
                        dropout.rngs = stream  # not rngs=stream: Dropout would fork it, which a stacked key cannot
                        module.lora_dropout = dropout
    return model


def _clear(module: Linear) -> None:
    module.lora_a = None
    module.lora_b = None
    module.lora_dropout = None
    module.lora_scale = 0.0


def remove_lora(model):
    """Drop every adapter of ``model`` in place (the base weights are untouched); returns ``model``."""
    for _, module in lora_modules(model):
        _clear(module)
    return model


def merge_lora(model):
    """A copy of ``model`` whose kernels are ``W + scale * A @ B`` (computed in float32, stored in ``W``'s dtype),
    with no adapters: a plain model, e.g. for :func:`cpo_jax.hf.pretrained.save_pretrained`. ``model`` is unchanged;
    the copy shares every array but the merged kernels, which keep their sharding.

    A quantised model (QLoRA) is dequantised first (:func:`cpo_jax.models.quantize.dequantize_model`, ``W`` the
    dequantised kernel in the original dtype), so the copy is a plain float model: ``merge_lora(model)`` equals
    ``merge_lora(dequantize_model(nnx.clone(model)))``."""
    merged = dequantize_model(nnx.clone(model))
    modules = lora_modules(merged)
    for _, module in modules:
        w = module.kernel[...]
        delta = jnp.matmul(module.lora_a[...].astype(jnp.float32), module.lora_b[...].astype(jnp.float32))
        new = (w.astype(jnp.float32) + module.lora_scale * delta).astype(w.dtype)
        module.kernel.set_value(new if isinstance(w, jax.core.Tracer) else jax.device_put(new, w.sharding))
    for _, module in modules:
        _clear(module)
    return merged


def zero_adapters(state: nnx.State) -> nnx.State:
    """``state`` (a model's state, or its ``nnx.LoRAParam`` part) with every ``lora_b`` set to zeros (same dtype and
    sharding): merged back into the model it gives the base model's logits exactly, with no copy of the base.
    ``lora_a`` is kept, so the zeroed state has the same structure and can be merged with the same graphdef."""

    def zero(path, var):
        if isinstance(var, nnx.LoRAParam) and path and path[-1] == "lora_b":
            return var.replace(jnp.zeros_like(var[...]))
        return var

    return nnx.map_state(zero, state)
