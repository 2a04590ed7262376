"""Mixture-of-Experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers, plus the MoE block itself.

Tiny random HF models (D=32, 4 or 8 experts, top-2, perturbed norms and biases) are checked for logits (right and left
padding), export and reload, exact tensor round trips, greedy decoding, the load-balancing loss (against HF's
``load_balancing_loss_func`` and a float64 NumPy reference), scan == loop, expert-sharded == single device; the grouped
expert matmuls are checked against a dense all-experts reference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cpo_jax.errors import UnsupportedConfig
from cpo_jax.hf.pretrained import config_from_hf, from_pretrained, save_pretrained
from cpo_jax.models.moe import RouterStats, load_balancing_loss, sparse_moe
from cpo_jax.parallel import make_mesh
from tests.hf_tiny import assert_greedy_matches_hf, assert_same_safetensors, hf_forward, max_diff

torch = pytest.importorskip("torch")

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_MOE = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, attention_bias=True),
    ),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
    # layers 0 and 2 dense (decoder_sparse_step=2), layer 1 sparse
    "qwen3_moe_mixed": (
        "Qwen3MoeConfig",
        dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=2, num_hidden_layers=3
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40),
    ),
}
NAMES = sorted(TINY_MOE)


def _hf_config(name: str, **extra):
    import transformers

    cls_name, overrides = TINY_MOE[name]
    return getattr(transformers, cls_name)(**{**COMMON, **overrides, **extra})


@functools.cache
def _build(name: str, root: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(name), attn_implementation="eager")
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    directory = Path(root) / name
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_tiny_moe")


def _batch(seed=0, b=3, t=12):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (b, t))
    right = (np.arange(t)[None] < np.array([t, t - 3, t - 7, t - 1])[:b, None]).astype(np.int64)
    return ids, right, right[:, ::-1].copy()


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_with_padding(name, root):
    hf, path = _build(name, str(root))
    ours = from_pretrained(path)
    ids, right, left = _batch()
    ref = hf_forward(hf, ids, right, output_router_logits=True).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(right)))
    assert max_diff(got, ref, right) < 1e-4
    assert np.abs(ref).max() > 0.5

    positions = np.maximum(np.cumsum(left, -1) - 1, 0)
    ref_left = hf_forward(hf, ids, left, positions, output_router_logits=True).logits.numpy()
    got_left = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(left)))
    assert max_diff(got_left, ref_left, left) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_export_reloads_and_round_trips_every_tensor(name, root, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, path = _build(name, str(root))
    save_pretrained(from_pretrained(path, scan_layers=name == "qwen3_moe"), tmp_path / "out")
    assert_same_safetensors(path / "model.safetensors", tmp_path / "out" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, right, _ = _batch(1)
    np.testing.assert_allclose(
        hf_forward(reloaded, ids, right, output_router_logits=True).logits.numpy(),
        hf_forward(hf, ids, right, output_router_logits=True).logits.numpy(),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers_generate(name, root):
    hf, path = _build(name, str(root))
    rng = np.random.RandomState(11)
    ids = rng.randint(3, VOCAB, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    new = 8
    assert_greedy_matches_hf(hf, path, ids, mask, new)


def _numpy_aux_loss(router_logits, mask, top_k):
    """Switch/Mixtral load balancing in float64: E * sum_e f_e P_e, pooled over layers and real tokens."""
    flat = mask.reshape(-1).astype(np.float64)
    counts, probs, tokens = 0.0, 0.0, 0.0
    for logits in router_logits:
        z = logits.astype(np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        chosen = np.argsort(-p, axis=-1)[:, :top_k]
        one_hot = np.zeros_like(p)
        np.put_along_axis(one_hot, chosen, 1.0, axis=-1)
        counts = counts + (one_hot * flat[:, None]).sum(0)
        probs = probs + (p * flat[:, None]).sum(0)
        tokens += flat.sum()
    return p.shape[-1] * np.sum((counts / tokens) * (probs / tokens))


@pytest.mark.parametrize("name", NAMES)
def test_aux_loss_matches_hf_and_float64_reference(name, root):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf, path = _build(name, str(root))
    ours = from_pretrained(path)
    cfg = ours.config
    ids, right, left = _batch(2)
    for mask in (right, left):
        out = hf_forward(hf, ids, mask, output_router_logits=True)
        router_logits = tuple(r.float() for r in out.router_logits)
        hf_loss = float(
            load_balancing_loss_func(router_logits, cfg.num_experts, cfg.experts_per_token, torch.tensor(mask))
        )
        reference = _numpy_aux_loss([r.numpy() for r in router_logits], mask, cfg.experts_per_token)
        _, aux = ours(jnp.asarray(ids), jnp.asarray(mask), return_aux=True)
        got = float(aux["router_aux_loss"])
        assert abs(hf_loss - reference) < 1e-5
        assert abs(got - reference) < 1e-5, (got, reference)
        np.testing.assert_allclose(float(aux["expert_load"].sum()), cfg.experts_per_token, rtol=1e-6)

    # Padding does not count: other ids under the padding change neither the loss nor the real tokens' logits.
    noisy = np.where(right > 0, ids, np.random.RandomState(3).randint(3, VOCAB, ids.shape))
    _, aux_a = ours(jnp.asarray(ids), jnp.asarray(right), return_aux=True)
    _, aux_b = ours(jnp.asarray(noisy), jnp.asarray(right), return_aux=True)
    np.testing.assert_allclose(float(aux_a["router_aux_loss"]), float(aux_b["router_aux_loss"]), rtol=1e-6)


def test_aux_loss_coefficient_follows_output_router_logits(root):
    _, path = _build("mixtral", str(root))
    hf = dict(from_pretrained(path).config.hf_config)
    assert config_from_hf({**hf, "output_router_logits": False}).router_aux_loss_coef == 0.0
    cfg = config_from_hf({**hf, "output_router_logits": True, "router_aux_loss_coef": 0.02})
    assert cfg.router_aux_loss_coef == 0.02


def test_dense_model_aux_is_zero_and_signatures_unchanged(root):
    from tests.hf_tiny import tiny_model

    _, path = tiny_model("llama", root)
    model = from_pretrained(path)
    ids, right, _ = _batch()
    logits, aux = model(jnp.asarray(ids), jnp.asarray(right), return_aux=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(jnp.asarray(ids), jnp.asarray(right))))
    assert float(aux["router_aux_loss"]) == 0.0 and model.router_aux_loss_coef == 0.0
    assert model.hidden_states(jnp.asarray(ids), jnp.asarray(right)).shape == (*ids.shape, 64)


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_scan_layers_equals_loop_with_gradients(name, root):
    _, path = _build(name, str(root))
    loop, scan = from_pretrained(path), from_pretrained(path, scan_layers=True, remat="full")
    ids, right, _ = _batch(3)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(right)

    def loss(model):
        logits, aux = model(ids_j, mask_j, return_aux=True)
        return jnp.sum(logits**2 * mask_j[..., None]) * 1e-3 + aux["router_aux_loss"]

    la, lb = loss(loop), loss(scan)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    ga, gb = nnx.grad(loss)(loop), nnx.grad(loss)(scan)
    np.testing.assert_allclose(np.asarray(gb.embed[...]), np.asarray(ga.embed[...]), atol=1e-5)
    router = np.stack([np.asarray(ga.layers[i].mlp.router[...]) for i in range(2)])
    assert np.abs(router).max() > 0
    np.testing.assert_allclose(np.asarray(gb.layers.mlp.router[...]), router, atol=1e-5)
    experts = np.stack([np.asarray(ga.layers[i].mlp.expert_down[...]) for i in range(2)])
    np.testing.assert_allclose(np.asarray(gb.layers.mlp.expert_down[...]), experts, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
def test_expert_sharded_forward_equals_single_device(impl, root):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    _, path = _build("qwen3_moe", str(root))
    mesh = make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    plain = from_pretrained(path, moe_impl=impl)
    sharded = from_pretrained(path, mesh=mesh, moe_impl=impl)
    w = sharded.layers[0].mlp.expert_gate[...]
    assert w.sharding.spec == P("expert", None, None)
    assert {s.data.shape for s in w.addressable_shards} == {(2, 32, 24)}  # 8 experts over 4 devices
    np.testing.assert_array_equal(np.asarray(w), np.asarray(plain.layers[0].mlp.expert_gate[...]))
    ids, right, _ = _batch(4, b=4)
    batch = NamedSharding(mesh, P("data", None))
    ids_s, mask_s = jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(right), batch)
    got, aux = nnx.jit(lambda m, i, a: m(i, a, return_aux=True))(sharded, ids_s, mask_s)
    want, aux_want = plain(jnp.asarray(ids), jnp.asarray(right), return_aux=True)
    assert max_diff(np.asarray(got), np.asarray(want), right) < 1e-5
    np.testing.assert_allclose(float(aux["router_aux_loss"]), float(aux_want["router_aux_loss"]), atol=1e-6)


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
def test_explicit_expert_parallel_equals_single_device_with_gradients(impl, root):
    """Under the trainers' mesh context (activation_sharding) the MoE layer runs its local experts in a shard_map and
    sums the devices' parts with one psum: same logits and gradients, and no all-gather of the expert weights."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    from cpo_jax.models.moe import expert_shards
    from cpo_jax.parallel import activation_sharding
    from cpo_jax.parallel.hlo import collective_bytes

    _, path = _build("qwen3_moe", str(root))
    mesh = make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])  # fsdp would gather weights, as it should
    plain = from_pretrained(path, moe_impl=impl)
    sharded = from_pretrained(path, mesh=mesh, moe_impl=impl)
    ids, right, _ = _batch(5, b=4)

    def loss(model, i, a):
        logits, aux = model(i, a, return_aux=True)
        return jnp.sum(jnp.where(a[..., None] > 0, jax.nn.log_softmax(logits), 0.0)) + aux["router_aux_loss"]

    grad = nnx.jit(nnx.value_and_grad(loss))
    want, want_grads = grad(plain, jnp.asarray(ids), jnp.asarray(right))
    batch = NamedSharding(mesh, P("data", None))
    args = (sharded, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(right), batch))
    with activation_sharding(mesh):
        assert expert_shards(8) == 4
        got, got_grads = grad(*args)
        manual = collective_bytes(grad.lower(*args).compile().as_text(), executed=True)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(got_grads)), jax.tree.leaves(nnx.state(want_grads))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    gspmd = collective_bytes(grad.lower(*args).compile().as_text(), executed=True)  # no mesh context
    assert expert_shards(8) == 1
    if impl == "blocked":  # GSPMD alone all-gathers the expert stacks inside the blocked loop: 1.3 MB against 29 KB
        assert manual["all-gather"] * 20 < gspmd["all-gather"], (manual, gspmd)


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
def test_groups_covering_only_the_first_rows_leave_the_rest_zero(impl):
    """``expert_ffn(covers_all_rows=False)`` (a device's local experts under expert parallelism): the covered rows
    equal a full computation of them, biases included; the others are exactly zero."""
    from cpo_jax.models.moe import expert_ffn

    ks = jax.random.split(jax.random.key(4), 7)
    e, d, f, m = 3, 8, 12, 20
    xs = jax.random.normal(ks[0], (m, d))
    weights = dict(
        gate=jax.random.normal(ks[1], (e, d, f)),
        up=jax.random.normal(ks[2], (e, d, f)),
        down=jax.random.normal(ks[3], (e, f, d)),
        gate_bias=jax.random.normal(ks[4], (e, f)),
        up_bias=jax.random.normal(ks[5], (e, f)),
        down_bias=jax.random.normal(ks[6], (e, d)),
    )
    sizes = jnp.array([4, 0, 7], jnp.int32)  # 11 of the 20 rows
    got = expert_ffn(xs, sizes, **weights, impl=impl, block_size=4, covers_all_rows=False)
    want = expert_ffn(xs[:11], sizes, **weights, impl=impl, block_size=4)
    np.testing.assert_allclose(np.asarray(got[:11]), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[11:]).any()


def _dense_reference(x, router, gate, up, down, top_k, normalize):
    """Every expert on every token, combined with the (mostly zero) routing weights."""
    probs = jax.nn.softmax(x @ router, axis=-1)
    top_w, top_i = jax.lax.top_k(probs, top_k)
    if normalize:
        top_w = top_w / top_w.sum(-1, keepdims=True)
    dense_w = jnp.zeros_like(probs).at[jnp.arange(x.shape[0])[:, None], top_i].set(top_w)  # [N, E]
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate)) * jnp.einsum("nd,edf->enf", x, up)
    y = jnp.einsum("enf,efd->end", h, down)
    return jnp.einsum("ne,end->nd", dense_w, y)


@pytest.mark.parametrize("impl,block_size", [("ragged", 128), ("blocked", 128), ("blocked", 4)])
@pytest.mark.parametrize("normalize", [False, True])
def test_grouped_experts_equal_dense_reference(impl, block_size, normalize):
    n, d, f, e, k = 37, 16, 24, 8, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d))
    router = jax.random.normal(keys[1], (d, e)).at[:, 7].set(-50.0 * jnp.sign(x.mean(0)))  # expert 7: (almost) idle
    gate, up = (0.3 * jax.random.normal(kk, (e, d, f)) for kk in keys[2:4])
    down = 0.3 * jax.random.normal(keys[4], (e, f, d))

    def grouped(x, router, gate, up, down):
        y, _ = sparse_moe(x, router, gate, up, down, top_k=k, normalize=normalize, impl=impl, block_size=block_size)
        return y

    dense = functools.partial(_dense_reference, top_k=k, normalize=normalize)
    args = (x, router, gate, up, down)
    np.testing.assert_allclose(np.asarray(grouped(*args)), np.asarray(dense(*args)), atol=1e-5)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    g_grouped = jax.grad(loss(grouped), argnums=(0, 1, 2, 3, 4))(*args)
    g_dense = jax.grad(loss(dense), argnums=(0, 1, 2, 3, 4))(*args)
    for got, want in zip(g_grouped, g_dense):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_load_balancing_loss_closed_forms():
    # A uniform router: every f_e = k / E and P_e = 1 / E, so the loss is k.
    e, k = 8, 2
    stats = RouterStats(counts=jnp.full((e,), 10.0 * k / e), prob_sum=jnp.full((e,), 10.0 / e), tokens=jnp.array(10.0))
    np.testing.assert_allclose(float(load_balancing_loss(stats)), k, rtol=1e-6)
    empty = RouterStats(counts=jnp.zeros((e,)), prob_sum=jnp.zeros((e,)), tokens=jnp.array(0.0))
    assert float(load_balancing_loss(empty)) == 0.0


@pytest.mark.parametrize(
    "name,extra,key",
    [
        ("qwen3_moe", dict(decoder_sparse_step=0), "decoder_sparse_step"),
        ("qwen2_moe", dict(mlp_only_layers=[0, 5]), "mlp_only_layers"),
        ("qwen2_moe", dict(mlp_only_layers="0"), "mlp_only_layers"),
        ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise"),
        ("mixtral", dict(num_experts_per_tok=5), "num_experts_per_tok"),
        ("qwen3_moe", dict(hidden_act="swish_glu"), "hidden_act"),
    ],
)
def test_unsupported_options_name_the_key(name, extra, key):
    hf = _hf_config(name).to_dict()
    hf.update(extra)
    with pytest.raises(UnsupportedConfig, match=key):
        config_from_hf(hf)


def test_mixed_layers_follow_hf_and_refuse_scan(root):
    hf, path = _build("qwen3_moe_mixed", str(root))
    model = from_pretrained(path)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == [
        type(layer.mlp).__name__.removeprefix("Qwen3Moe").replace("SparseMoeBlock", "MoE") for layer in hf.model.layers
    ]
    assert kinds == ["MLP", "MoE", "MLP"]
    with pytest.raises(ValueError, match="scan_layers=False"):
        from_pretrained(path, scan_layers=True)


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_moe_mixed"])
def test_inactive_expert_params_counts_unused_experts(name, root):
    from cpo_jax.models.moe import inactive_expert_params

    _, path = _build(name, str(root))
    model = from_pretrained(path)
    cfg = model.config
    experts = sum(
        int(np.prod(getattr(layer.mlp, name)[...].shape))
        for layer in model.layers
        if hasattr(layer.mlp, "expert_gate")
        for name in ("expert_gate", "expert_up", "expert_down")
    )
    assert inactive_expert_params(cfg) == experts * (cfg.num_experts - cfg.experts_per_token) // cfg.num_experts
