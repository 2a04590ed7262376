"""Sparse Mixture-of-Experts feed-forward block (Mixtral, Qwen2/3-MoE, gpt-oss) with grouped expert matmuls.

A token ``x`` ``[D]`` is routed as in transformers 5 (``*TopKRouter``):

* ``logits = x @ router (+ router_bias)`` ``[E]`` (compute dtype), ``p = softmax(logits)`` in float32;
* ``router_softmax="all"`` (Mixtral, Qwen): the ``k`` largest ``p`` pick the experts; their weights are those
  ``p``, renormalised to sum to 1 when ``norm_topk_prob`` (Mixtral always: ``softmax`` over the top-k logits is the
  same thing). ``"topk"`` (gpt-oss): the ``k`` largest logits pick the experts and their weights are the softmax
  over those ``k`` logits;
* ``y = sum_j w_j * down_e(glu(gate_e x, up_e x))`` over the chosen experts ``e = e_j``, with
  ``glu(g, u) = act(g) * u``, or gpt-oss's clamped SwiGLU (``swiglu_limit``, :func:`expert_glu`), and with the
  experts' biases (gpt-oss) added after each projection; plus, for Qwen2-MoE,
  ``sigmoid(x @ shared_gate) * shared_mlp(x)``.

Experts are stored stacked, ``gate`` / ``up`` ``[E, D, F]`` with logical axes ``("expert", "embed", "mlp")`` and
``down`` ``[E, F, D]`` (``("expert", "mlp", "embed")``); their optional biases are ``[E, F]`` and ``[E, D]``.
The ``B*T*k`` (token, expert) assignments are sorted by expert and multiplied group by group, never densely
against every expert, and no token is dropped (no capacity factor), so the output equals HF's per-expert loop.
Two grouped paths compute the same function (:func:`expert_ffn`):

* ``"ragged"``: :func:`jax.lax.ragged_dot` on the sorted rows (``group_sizes`` = tokens per expert). On TPU it
  lowers to the native grouped matmul. XLA's CPU (and default GPU) lowering of ``ragged_dot`` masks the rows
  into a dense ``[E, B*T*k, D]`` product, so there it costs ``E`` times the useful FLOPs.
* ``"blocked"``: each expert's rows are padded to a multiple of ``block_size`` and a ``lax.scan`` runs the expert
  MLP one block (one expert) at a time, skipping empty blocks: at most ``B*T*k + E*(block_size-1)`` rows are
  computed. The default on CPU and GPU (``"auto"``); ``tools/bench_moe.py`` compares the paths.

Load balancing (Switch Transformer eqs. 4-6, HF's ``load_balancing_loss_func``): each layer returns
:class:`RouterStats` (top-k assignment counts and summed router probabilities per expert over the real
tokens); the decoder sums them over layers and :func:`load_balancing_loss` turns the sum into
``E * sum_e f_e * P_e``, ``f_e`` and ``P_e`` being the fractions pooled over every MoE layer and token, as HF does.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from cpo_jax.models.config import TransformerConfig
from cpo_jax.models.layers import _ACTIVATIONS, MLP, param

MoeImpl = Literal["auto", "ragged", "blocked"]
EXPERT_AXIS = "expert"  # the mesh axis the experts are split over (the default rule of the "expert" logical axis)
DEFAULT_BLOCK_SIZE = 128


@struct.dataclass
class RouterStats:
    """Sums over the real tokens of one or more MoE layers, for the load-balancing loss.

    Attributes:
      counts: ``[E]`` float32, top-k assignments per expert (no gradient: they come from the argmax).
      prob_sum: ``[E]`` float32, summed softmax router probabilities per expert.
      tokens: float32 scalar, real tokens counted (once per layer).
    """

    counts: jax.Array
    prob_sum: jax.Array
    tokens: jax.Array

    def __add__(self, other: RouterStats) -> RouterStats:
        return jax.tree.map(jnp.add, self, other)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """``E * sum_e (counts_e / tokens) * (prob_sum_e / tokens)`` (HF's ``load_balancing_loss_func``); 0 for no tokens.

    ``counts`` sum to ``k * tokens``, so a perfectly uniform router gives ``k``; HF's ``router_aux_loss_coef``
    multiplies this value."""
    tokens = jnp.maximum(stats.tokens, 1.0)
    num_experts = stats.counts.shape[-1]
    return num_experts * jnp.sum((stats.counts / tokens) * (stats.prob_sum / tokens))


def inactive_expert_params(cfg: TransformerConfig) -> int:
    """Expert weights a token does not multiply: ``(E - k) * 3 * D * F`` per MoE layer (plus ``(E - k) * (2F + D)``
    expert biases, gpt-oss), summed over the MoE layers.

    A FLOP count built from the parameter count (MFU) subtracts this: only ``k`` of the ``E`` experts run per token."""
    if not cfg.num_experts:
        return 0
    f, d = cfg.moe_intermediate_size or cfg.intermediate_size, cfg.hidden_size
    sparse_layers = sum(cfg.is_sparse(i) for i in range(cfg.num_layers))
    per_expert = 3 * d * f + (2 * f + d if cfg.expert_bias else 0)
    return (cfg.num_experts - cfg.experts_per_token) * per_expert * sparse_layers


def route(
    logits: jax.Array, top_k: int, normalize: bool, softmax: Literal["all", "topk"] = "all"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing of ``logits`` ``[N, E]``: ``(weights [N, k] float32, experts [N, k] int32, probs [N, E])``.

    ``probs`` is the float32 softmax over all ``E`` logits (what HF's ``load_balancing_loss_func`` computes from the
    router logits, for either ``softmax``). ``softmax="all"``: the experts are the ``k`` largest ``probs`` and the
    weights are those, renormalised when ``normalize``. ``"topk"`` (gpt-oss's ``GptOssTopKRouter``): the experts are
    the ``k`` largest logits and the weights the softmax over those ``k`` logits (``normalize`` is moot)."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if softmax == "topk":
        top, experts = jax.lax.top_k(logits, top_k)
        return jax.nn.softmax(top, axis=-1), experts.astype(jnp.int32), probs
    if softmax != "all":
        raise ValueError(f"unknown router softmax {softmax!r}; expected 'all' or 'topk'")
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def router_stats(probs: jax.Array, experts: jax.Array, token_mask: jax.Array | None) -> RouterStats:
    """:class:`RouterStats` of one layer: ``probs`` ``[N, E]``, ``experts`` ``[N, k]``, ``token_mask`` ``[N]``."""
    n, num_experts = probs.shape
    mask = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    k = experts.shape[-1]
    counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(jnp.repeat(mask, k))
    return RouterStats(
        counts=jax.lax.stop_gradient(counts),
        prob_sum=jnp.sum(probs * mask[:, None], axis=0),
        tokens=jnp.sum(mask),
    )


def _resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "ragged" if jax.default_backend() == "tpu" else "blocked"
    if impl not in ("ragged", "blocked"):
        raise ValueError(f"unknown moe_impl {impl!r}; expected 'auto', 'ragged' or 'blocked'")
    return impl


def expert_glu(activation: str = "silu", swiglu_limit: float | None = None, swiglu_alpha: float = 1.702):
    """The experts' gated unit ``glu(g, u)`` of the gate and up projections (biases included), in their dtype.

    ``act(g) * u``; with ``swiglu_limit`` gpt-oss's clamped SwiGLU (HF ``GptOssExperts._apply_gate``):
    ``g = min(g, limit)``, ``u = clip(u, -limit, limit)``, ``(u + 1) * (g * sigmoid(g * alpha))``. The clamps pass
    the gradient at the limit itself, as ``torch.clamp`` does."""
    if swiglu_limit is None:
        act = _ACTIVATIONS[activation]
        return lambda g, u: act(g) * u
    limit, alpha = float(swiglu_limit), float(swiglu_alpha)

    def clamped(g, u):
        g = jnp.where(g > limit, limit, g)
        u = jnp.where(u > limit, limit, jnp.where(u < -limit, -limit, u))
        return (u + 1) * (g * jax.nn.sigmoid(g * alpha))

    return clamped


def _plus(y: jax.Array, bias: jax.Array | None, index) -> jax.Array:
    """``y + bias[index]`` (a bias row per expert), or ``y`` without a bias."""
    return y if bias is None else y + bias[index]


def _ragged_ffn(xs, group_sizes, weights, biases, glu):
    (wg, wu, wd), (bg, bu, bd) = weights, biases
    dot = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
    expert_of_row = jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes, total_repeat_length=xs.shape[0])
    h = glu(_plus(dot(xs, wg), bg, expert_of_row), _plus(dot(xs, wu), bu, expert_of_row))
    return _plus(dot(h, wd), bd, expert_of_row)


def _blocked_ffn(xs, group_sizes, weights, biases, glu, block_size, live_groups=None):
    """``live_groups`` ``[G]`` bool: groups whose blocks are computed (others give zeros); group ``g`` uses expert
    ``min(g, E - 1)`` of the weights, so a trailing dead group needs no weights (expert parallelism)."""
    (wg, wu, wd), (bg, bu, bd) = weights, biases
    m, d = xs.shape
    num_experts = group_sizes.shape[0]
    block = max(1, min(block_size, m))
    num_blocks = -(-(m + num_experts * (block - 1)) // block)  # static bound on sum_e ceil(g_e / block)
    padded = -(-group_sizes // block) * block
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    expert_of_row = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=m)
    dest = (padded_end - padded)[expert_of_row] + jnp.arange(m) - start[expert_of_row]
    rows = jnp.zeros((num_blocks * block, d), xs.dtype).at[dest].set(xs).reshape(num_blocks, block, d)
    block_start = jnp.arange(num_blocks) * block
    # searchsorted(padded_end, block_start, side="right"), written out: jnp.searchsorted fails inside shard_map
    block_expert = jnp.minimum(jnp.sum(padded_end[None, :] <= block_start[:, None], axis=1), num_experts - 1)
    used = block_start < padded_end[-1]
    if live_groups is not None:
        used = used & live_groups[block_expert]
    block_expert = jnp.minimum(block_expert, wg.shape[0] - 1)

    def step(_, inputs):
        x, e, live = inputs

        def compute(x):
            h = glu(_plus(x @ wg[e], bg, e), _plus(x @ wu[e], bu, e))
            return _plus(h @ wd[e], bd, e)

        # zeros_like keeps x's varying-over-devices type, as the branches of a cond inside shard_map must agree
        y = jax.lax.cond(live, compute, lambda x: jnp.zeros_like(x, shape=(block, wd.shape[-1])), x)
        return None, y

    _, out = jax.lax.scan(step, None, (rows, block_expert, used))
    return out.reshape(num_blocks * block, -1)[dest]


def expert_ffn(
    xs: jax.Array,
    group_sizes: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    gate_bias: jax.Array | None = None,
    up_bias: jax.Array | None = None,
    down_bias: jax.Array | None = None,
    activation: str = "silu",
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
    impl: MoeImpl = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    covers_all_rows: bool = True,
) -> jax.Array:
    """``down_e(glu(gate_e x + bg_e, up_e x + bu_e)) + bd_e`` for rows ``xs`` ``[M, D]`` sorted by expert,
    ``group_sizes[e]`` rows each.

    ``gate``/``up`` are ``[E, D, F]``, ``down`` ``[E, F, D]``; the optional biases ``[E, F]``, ``[E, F]`` and
    ``[E, D]`` (absent ones are zero). ``glu`` is :func:`expert_glu` of ``activation`` / ``swiglu_limit`` /
    ``swiglu_alpha``. Returns ``[M, D]`` in ``xs.dtype``, every product and sum in that dtype (as HF's grouped
    experts). The groups cover all ``M`` rows (``sum(group_sizes) == M``), or with ``covers_all_rows=False`` only the
    first ``sum(group_sizes)``, the rest giving zeros and costing no matmul (a device's local experts under expert
    parallelism)."""
    glu = expert_glu(activation, swiglu_limit, swiglu_alpha)
    weights = tuple(w.astype(xs.dtype) for w in (gate, up, down))
    biases = tuple(None if b is None else b.astype(xs.dtype) for b in (gate_bias, up_bias, down_bias))
    ragged = _resolve_impl(impl) == "ragged"
    if covers_all_rows:
        if ragged:
            return _ragged_ffn(xs, group_sizes, weights, biases, glu)
        return _blocked_ffn(xs, group_sizes, weights, biases, glu, block_size)
    m, held = xs.shape[0], jnp.sum(group_sizes)
    if ragged:  # ragged_dot leaves the rows past sum(group_sizes) zero
        ys = _ragged_ffn(xs, group_sizes, weights, biases, glu)
    else:  # the uncovered rows form one more group, never computed
        live = jnp.arange(group_sizes.shape[0] + 1) < group_sizes.shape[0]
        ys = _blocked_ffn(xs, jnp.append(group_sizes, m - held), weights, biases, glu, block_size, live_groups=live)
    return jnp.where((jnp.arange(m) < held)[:, None], ys, 0)  # no bias on the uncovered rows


def sparse_moe(
    x: jax.Array,
    router: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    top_k: int,
    normalize: bool,
    router_bias: jax.Array | None = None,
    router_softmax: Literal["all", "topk"] = "all",
    gate_bias: jax.Array | None = None,
    up_bias: jax.Array | None = None,
    down_bias: jax.Array | None = None,
    activation: str = "silu",
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
    impl: MoeImpl = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    token_mask: jax.Array | None = None,
) -> tuple[jax.Array, RouterStats]:
    """The routed experts of one layer on tokens ``x`` ``[N, D]``: ``(y [N, D], RouterStats)``.

    ``router`` is ``[D, E]`` (``router_bias`` ``[E]``), routed by :func:`route` with ``router_softmax``; see
    :func:`expert_ffn` for the expert weights, biases and activation. ``token_mask`` ``[N]`` (1 for real tokens) only
    affects the statistics: padding tokens are routed and computed like any other."""
    n, _ = x.shape
    num_experts = router.shape[-1]
    logits = jnp.dot(x, router.astype(x.dtype))
    if router_bias is not None:
        logits = logits + router_bias.astype(x.dtype)
    weights, experts, probs = route(logits, top_k, normalize, router_softmax)
    flat = experts.reshape(-1)  # [N*k], row r belongs to token r // k
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * top_k, dtype=order.dtype))
    experts_of = dict(gate=gate, up=up, down=down, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias)
    ffn = dict(activation=activation, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, impl=impl)
    ffn["block_size"] = block_size
    if expert_shards(num_experts) > 1:
        y = _expert_parallel(x[order // top_k], group_sizes, inverse, weights, experts_of, ffn, top_k)
    else:
        ys = expert_ffn(x[order // top_k], group_sizes, **experts_of, **ffn)
        y = _combine(ys, inverse, weights, top_k)
    return y, router_stats(probs, experts, token_mask)


def _combine(ys: jax.Array, inverse: jax.Array, weights: jax.Array, top_k: int) -> jax.Array:
    """``[N, D]``: each token's ``k`` expert outputs (rows ``inverse`` of ``ys`` ``[N*k, D]``) weighted and summed."""
    per_choice = ys[inverse].reshape(-1, top_k, ys.shape[-1])
    return jnp.sum(per_choice * weights.astype(ys.dtype)[..., None], axis=1)


def expert_shards(num_experts: int) -> int:
    """Devices the experts are split over: the size of the ``expert`` axis of the mesh the call is traced under
    (``jax.set_mesh``, as :func:`cpo_jax.parallel.activation_sharding` sets it for the trainers' steps) when it
    divides ``num_experts``; 1 without such a mesh (library calls, generation), where GSPMD partitions the layer."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        return 1
    n = int(dict(mesh.shape)[EXPERT_AXIS])
    return n if n > 1 and num_experts % n == 0 else 1


def _expert_parallel(xs, group_sizes, inverse, weights, experts_of: dict, ffn: dict, top_k: int) -> jax.Array:
    """The routed experts with expert parallelism over the mesh's ``expert`` axis (``shard_map``, manual on that
    axis only): ``[N, D]``, equal to the single-device computation.

    The tokens are replicated over the ``expert`` axis (the ``batch`` rule shards them over ``data`` and ``fsdp``),
    so no all-to-all is needed: each device runs the grouped matmuls of its ``E / n`` experts on the rows routed to
    them (a contiguous run of the expert-sorted rows, moved to the front), combines them with the routing weights,
    and one all-reduce (``psum``) of ``[N, D]`` sums the devices' parts. That moves ``N * D`` per layer where an
    all-to-all dispatch and return would move about ``2 * N * k * D``; the expert weights never move."""
    present = {name: w for name, w in experts_of.items() if w is not None}
    num_experts = present["gate"].shape[0]

    def local(xs, group_sizes, inverse, weights, params):
        e_local = params["gate"].shape[0]
        first = jax.lax.axis_index(EXPERT_AXIS) * e_local
        sizes = jax.lax.dynamic_slice(group_sizes, (first,), (e_local,))
        offset = jnp.sum(jnp.where(jnp.arange(num_experts) < first, group_sizes, 0))
        rows = jnp.roll(xs, -offset, axis=0)  # this device's rows first
        local_experts = {name: params.get(name) for name in experts_of}
        ys = expert_ffn(rows, sizes, **local_experts, **ffn, covers_all_rows=False)
        return jax.lax.psum(_combine(jnp.roll(ys, offset, axis=0), inverse, weights, top_k), EXPERT_AXIS)

    return jax.shard_map(
        local,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(), P(), P(), P(), {name: P(EXPERT_AXIS) for name in present}),
        out_specs=P(),
        axis_names={EXPERT_AXIS},
    )(xs, group_sizes, inverse, weights, present)


class MoE(nnx.Module):
    """Top-k routed experts (plus an optional sigmoid-gated shared expert) in place of a decoder layer's MLP."""

    def __init__(self, cfg: TransformerConfig, *, param_dtype, rngs: nnx.Rngs):
        d, e = cfg.hidden_size, cfg.num_experts
        f = cfg.moe_intermediate_size or cfg.intermediate_size
        self.router = param(rngs, (d, e), ("embed", None), "normal", param_dtype)
        self.expert_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), "normal", param_dtype)
        self.expert_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), "normal", param_dtype)
        self.expert_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), "normal", param_dtype)
        # gpt-oss: a router bias [E] and expert biases gate / up [E, F], down [E, D]
        self.router_bias = param(rngs, (e,), (None,), "zeros", param_dtype) if cfg.router_bias else nnx.data(None)
        if cfg.expert_bias:
            self.expert_gate_bias = param(rngs, (e, f), ("expert", "mlp"), "zeros", param_dtype)
            self.expert_up_bias = param(rngs, (e, f), ("expert", "mlp"), "zeros", param_dtype)
            self.expert_down_bias = param(rngs, (e, d), ("expert", "embed"), "zeros", param_dtype)
        else:
            self.expert_gate_bias = self.expert_up_bias = self.expert_down_bias = nnx.data(None)
        if cfg.shared_expert_size:
            self.shared = MLP(cfg.replace(intermediate_size=cfg.shared_expert_size), param_dtype=param_dtype, rngs=rngs)
            self.shared_gate = param(rngs, (d, 1), ("embed", None), "normal", param_dtype)
        else:
            self.shared = nnx.data(None)
            self.shared_gate = nnx.data(None)
        self.top_k, self.normalize = cfg.experts_per_token, cfg.norm_topk_prob
        self.activation, self.impl, self.dtype = cfg.activation, cfg.moe_impl, cfg.dtype
        self.router_softmax, self.swiglu_limit, self.swiglu_alpha = (
            cfg.router_softmax,
            cfg.swiglu_limit,
            cfg.swiglu_alpha,
        )

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, RouterStats]:
        """``[B, T, D] -> ([B, T, D], RouterStats)``; ``token_mask`` ``[B, T]`` marks real tokens for the stats."""
        b, t, d = x.shape
        h = x.reshape(b * t, d).astype(self.dtype)
        y, stats = sparse_moe(
            h,
            self.router[...],
            self.expert_gate[...],
            self.expert_up[...],
            self.expert_down[...],
            top_k=self.top_k,
            normalize=self.normalize,
            router_bias=_value(self.router_bias),
            router_softmax=self.router_softmax,
            gate_bias=_value(self.expert_gate_bias),
            up_bias=_value(self.expert_up_bias),
            down_bias=_value(self.expert_down_bias),
            activation=self.activation,
            swiglu_limit=self.swiglu_limit,
            swiglu_alpha=self.swiglu_alpha,
            impl=self.impl,
            token_mask=None if token_mask is None else token_mask.reshape(b * t),
        )
        if self.shared is not None:
            gate = jax.nn.sigmoid(jnp.dot(h, self.shared_gate[...].astype(self.dtype)))
            y = y + gate * self.shared(h)
        return y.reshape(b, t, d), stats


def _value(var) -> jax.Array | None:
    """The array of an optional parameter (None when the module has none)."""
    return None if var is None else var[...]
