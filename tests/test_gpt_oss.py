"""gpt-oss (``model_type`` ``gpt_oss``) against transformers, plus its pieces: attention sinks, the biased grouped
experts with the clamped SwiGLU, the interleaved ``gate_up_proj`` split and MXFP4 experts.

The tiny random HF model (D=32, 8 experts, top-2, 2 layers sliding/full with a window of 4 against 12-17 tokens,
YaRN RoPE as gpt-oss's default, every bias, norm and sink perturbed, ``swiglu_limit`` 1.0 so that the clamps bite) is
checked for logits (right and left padding), export and reload, exact tensor round trips, greedy decoding, the
load-balancing loss (HF's ``load_balancing_loss_func`` and a float64 NumPy reference), scan == loop with gradients,
sharded loading of the interleaved tensors, and refused options; the grouped experts (both paths) against a dense
reference; an MXFP4 checkpoint against transformers' own dequantisation.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from cpo_jax.errors import UnsupportedConfig
from cpo_jax.hf.pretrained import config_from_hf, from_pretrained, save_pretrained
from cpo_jax.hf.weights import WeightRule, dequantize_mxfp4, hf_block_index, join_parts, our_shape
from cpo_jax.models.moe import sparse_moe
from cpo_jax.ops.attention import attention_mask, dot_product_attention
from tests.hf_tiny import assert_greedy_matches_hf, assert_same_safetensors, hf_forward, max_diff
from tests.test_moe import _numpy_aux_loss

torch = pytest.importorskip("torch")

VOCAB = 128
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=4,
    max_position_embeddings=64,
    initializer_range=0.15,
    swiglu_limit=1.0,
    swiglu_alpha=1.5,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=150000.0,
        factor=32.0,
        beta_fast=32.0,
        beta_slow=1.0,
        truncate=False,
        original_max_position_embeddings=4096,
    ),
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _hf_config(**extra):
    from transformers import GptOssConfig

    return GptOssConfig(**{**TINY, **extra})


@functools.cache
def _build(root: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_bias"):  # norms, sinks, attention/router biases, expert biases [E, .]
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    directory = Path(root) / "gpt_oss"
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _build(str(tmp_path_factory.mktemp("hf_tiny_gpt_oss")))


def _batch(seed=0, b=3, t=12):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (b, t))
    right = (np.arange(t)[None] < np.array([t, t - 3, t - 7])[:b, None]).astype(np.int64)
    return ids, right, right[:, ::-1].copy()


def test_config_translation(tiny):
    _, path = tiny
    cfg = from_pretrained(path).config
    assert cfg.layer_types == ("sliding_attention", "full_attention")
    assert (cfg.sliding_window, cfg.num_experts, cfg.experts_per_token) == (4, 8, 2)
    assert cfg.attention_sinks and cfg.qkv_bias and cfg.o_bias and cfg.router_bias and cfg.expert_bias
    assert (cfg.router_softmax, cfg.swiglu_limit, cfg.swiglu_alpha) == ("topk", 1.0, 1.5)
    assert cfg.router_aux_loss_coef == 0.0 and cfg.norm_eps == 1e-5  # output_router_logits is false
    hf = dict(cfg.hf_config, output_router_logits=True, router_aux_loss_coef=0.02)
    assert config_from_hf(hf).router_aux_loss_coef == 0.02
    ((_, rope),) = cfg.rope
    assert (rope.rope_type, rope.factor, rope.truncate, rope.original_max_position_embeddings) == (
        "yarn",
        32,
        False,
        4096,
    )


def _logits(model, ids, mask) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask)))


def test_logits_match_hf_with_padding(tiny):
    hf, path = tiny
    ours = from_pretrained(path)
    ids, right, left = _batch()
    ref = hf_forward(hf, ids, right).logits.numpy()
    assert max_diff(_logits(ours, ids, right), ref, right) < 1e-4
    assert np.abs(ref).max() > 0.5

    positions = np.maximum(np.cumsum(left, -1) - 1, 0)
    ref_left = hf_forward(hf, ids, left, positions).logits.numpy()
    assert max_diff(_logits(ours, ids, left), ref_left, left) < 1e-4

    # The clamps bite in this model: transformers' logits move when its limit is lifted.
    experts = [layer.mlp.experts for layer in hf.model.layers]
    try:
        for e in experts:
            e.limit = 1e6
        assert max_diff(hf_forward(hf, ids, right).logits.numpy(), ref, right) > 1e-2
    finally:
        for e in experts:
            e.limit = TINY["swiglu_limit"]


def test_export_reloads_and_round_trips_every_tensor(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, path = tiny
    save_pretrained(from_pretrained(path, scan_layers=True), tmp_path / "out")
    assert_same_safetensors(path / "model.safetensors", tmp_path / "out" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, right, _ = _batch(1)
    np.testing.assert_allclose(
        hf_forward(reloaded, ids, right).logits.numpy(), hf_forward(hf, ids, right).logits.numpy(), atol=1e-5, rtol=0
    )


def test_greedy_matches_transformers_generate(tiny):
    hf, path = tiny
    rng = np.random.RandomState(11)
    ids = rng.randint(3, VOCAB, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    assert_greedy_matches_hf(hf, path, ids, mask, 8)  # 17 tokens: past the window of 4


def test_aux_loss_matches_hf_and_float64_reference(tiny):
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    hf, path = tiny
    ours = from_pretrained(path)
    cfg = ours.config
    ids, right, left = _batch(2)
    for mask in (right, left):
        out = hf_forward(hf, ids, mask, output_router_logits=True)
        router_logits = tuple(r.float() for r in out.router_logits)  # raw logits, router bias included
        hf_loss = float(
            load_balancing_loss_func(router_logits, cfg.num_experts, cfg.experts_per_token, torch.tensor(mask))
        )
        assert abs(hf_loss - float(out.aux_loss)) < 1e-7
        reference = _numpy_aux_loss([r.numpy() for r in router_logits], mask, cfg.experts_per_token)
        _, aux = nnx.jit(lambda m, i, a: m(i, a, return_aux=True))(ours, jnp.asarray(ids), jnp.asarray(mask))
        got = float(aux["router_aux_loss"])
        assert abs(hf_loss - reference) < 1e-5
        assert abs(got - reference) < 1e-5, (got, reference)
        np.testing.assert_allclose(float(aux["expert_load"].sum()), cfg.experts_per_token, rtol=1e-6)


def _numpy_sink_attention(q, k, v, mask, sinks, scale):
    """float64: softmax over [scores of the visible keys, the head's sink], the sink column dropped."""
    q, k, v, sinks = (np.asarray(a, np.float64) for a in (q, k, v, sinks))
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    out = np.zeros((b, t, n, h))
    for i in range(b):
        for head in range(n):
            kv = head // groups
            scores = q[i, :, head] @ k[i, :, kv].T * scale  # [T, S]
            scores = np.where(mask[i], scores, -np.inf)
            logits = np.concatenate([scores, np.full((t, 1), sinks[head])], axis=-1)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[i, :, head] = p[:, :-1] @ v[i, :, kv]
    return out


def test_attention_sinks_match_float64_reference():
    b, t, n, kv, h = 3, 7, 6, 2, 8
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(kk, (b, t, heads, h)) for kk, heads in zip(keys[:3], (n, kv, kv)))
    sinks = 2.0 * jax.random.normal(keys[3], (n,))
    valid = np.array([[1] * 7, [1] * 5 + [0] * 2, [0] * 3 + [1] * 4], bool)  # full, right- and left-padded rows
    mask = np.asarray(attention_mask(jnp.arange(t), jnp.arange(t), jnp.asarray(valid), sliding_window=3))
    attend = jax.jit(lambda q, k, v, m, s: dot_product_attention(q, k, v, m, scale=h**-0.5, sinks=s))
    got = np.asarray(attend(q, k, v, jnp.asarray(mask), sinks))
    want = _numpy_sink_attention(q, k, v, mask, sinks, h**-0.5)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert not mask[2, 0].any() and np.abs(got[2, 0]).max() == 0  # a row that sees no key: only the sink
    # The sinks matter: without them the rows sum their weights to 1.
    plain = np.asarray(attend(q, k, v, jnp.asarray(mask), None))
    assert np.abs(plain[0] - got[0]).max() > 1e-2


def test_scan_layers_equals_loop_with_gradients(tiny):
    _, path = tiny
    loop = from_pretrained(path)
    scan = from_pretrained(path, scan_layers=True, remat="full")
    ids, right, _ = _batch(3)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(right)

    def loss(model):
        logits, aux = model(ids_j, mask_j, return_aux=True)
        return jnp.sum(logits**2 * mask_j[..., None]) * 1e-3 + aux["router_aux_loss"]

    (la, ga), (lb, gb) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (loop, scan))
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gb.embed[...]), np.asarray(ga.embed[...]), atol=1e-5)
    for name in ("router", "router_bias", "expert_gate", "expert_up_bias", "expert_down_bias"):
        per_layer = np.stack([np.asarray(getattr(ga.layers[i].mlp, name)[...]) for i in range(2)])
        assert np.abs(per_layer).max() > 0, name
        np.testing.assert_allclose(np.asarray(getattr(gb.layers.mlp, name)[...]), per_layer, atol=1e-5, err_msg=name)
    sinks = np.stack([np.asarray(ga.layers[i].attn.sinks[...]) for i in range(2)])
    assert np.abs(sinks).max() > 0
    np.testing.assert_allclose(np.asarray(gb.layers.attn.sinks[...]), sinks, atol=1e-5)


def _dense_reference(x, router, router_bias, gate, up, down, biases, top_k, limit, alpha):
    """Every expert on every token with gpt-oss's routing and clamped SwiGLU, combined by the routing weights."""
    bg, bu, bd = biases
    logits = x @ router + router_bias
    top_v, top_i = jax.lax.top_k(logits, top_k)
    dense_w = jnp.zeros_like(logits).at[jnp.arange(x.shape[0])[:, None], top_i].set(jax.nn.softmax(top_v, -1))
    g = jnp.minimum(jnp.einsum("nd,edf->enf", x, gate) + bg[:, None], limit)
    u = jnp.clip(jnp.einsum("nd,edf->enf", x, up) + bu[:, None], -limit, limit)
    y = jnp.einsum("enf,efd->end", (u + 1) * g * jax.nn.sigmoid(alpha * g), down) + bd[:, None]
    return jnp.einsum("ne,end->nd", dense_w, y)


@pytest.mark.parametrize("impl,block_size", [("ragged", 128), ("blocked", 4)])  # blocked: several blocks per expert
def test_biased_clamped_experts_equal_dense_reference(impl, block_size):
    n, d, f, e, k, limit, alpha = 37, 16, 24, 8, 2, 1.5, 1.702
    keys = jax.random.split(jax.random.key(0), 9)
    x = jax.random.normal(keys[0], (n, d))
    router = jax.random.normal(keys[1], (d, e)).at[:, 7].set(-50.0 * jnp.sign(x.mean(0)))  # expert 7: (almost) idle
    router_bias = jax.random.normal(keys[2], (e,))
    gate, up = (0.4 * jax.random.normal(kk, (e, d, f)) for kk in keys[3:5])
    down = 0.3 * jax.random.normal(keys[5], (e, f, d))
    biases = tuple(jax.random.normal(kk, (e, size)) for kk, size in zip(keys[6:], (f, f, d)))

    def grouped(x, router, router_bias, gate, up, down, biases):
        y, _ = sparse_moe(
            x, router, gate, up, down, top_k=k, normalize=False, router_bias=router_bias, router_softmax="topk",
            gate_bias=biases[0], up_bias=biases[1], down_bias=biases[2], swiglu_limit=limit, swiglu_alpha=alpha,
            impl=impl, block_size=block_size,
        )  # fmt: skip
        return y

    dense = functools.partial(_dense_reference, top_k=k, limit=limit, alpha=alpha)
    args = (x, router, router_bias, gate, up, down, biases)
    np.testing.assert_allclose(np.asarray(jax.jit(grouped)(*args)), np.asarray(dense(*args)), atol=1e-5)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    g_grouped = jax.tree.leaves(jax.jit(jax.grad(loss(grouped), argnums=tuple(range(7))))(*args))
    g_dense = jax.tree.leaves(jax.jit(jax.grad(loss(dense), argnums=tuple(range(7))))(*args))
    for got, want in zip(g_grouped, g_dense):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_interleaved_split_rule_reads_and_joins():
    hf = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    gate, up = (WeightRule("w", "x", split=(-1, p, 2), interleaved=True) for p in (0, 1))
    assert our_shape(gate, hf.shape) == (2, 3, 4)
    full = (slice(0, 2), slice(0, 3), slice(0, 4))
    np.testing.assert_array_equal(hf[hf_block_index(gate, full, hf.shape)], hf[..., 0::2])
    np.testing.assert_array_equal(hf[hf_block_index(up, full, hf.shape)], hf[..., 1::2])
    block = (slice(1, 2), slice(0, 3), slice(2, 4))  # a device block: expert 1, up entries 2 and 3
    np.testing.assert_array_equal(hf[hf_block_index(up, block, hf.shape)], hf[1:2, :, 1::2][..., 2:4])
    np.testing.assert_array_equal(join_parts(gate, [hf[..., 0::2], hf[..., 1::2]]), hf)
    with pytest.raises(ValueError, match="interleaved"):
        WeightRule("w", "x", split=(0, 0, (2, 1)), interleaved=True)


def test_sharded_load_reads_strided_blocks(tiny, monkeypatch):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    import cpo_jax.hf.pretrained as pretrained
    from cpo_jax.parallel import make_mesh

    reads = []
    original = pretrained.read_block

    def spy(handle, binding, index):
        block = original(handle, binding, index)
        reads.append((binding.hf_name, binding.path[-1], block.shape))
        return block

    _, path = tiny
    plain = from_pretrained(path)
    monkeypatch.setattr(pretrained, "read_block", spy)
    mesh = make_mesh({"expert": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    sharded = from_pretrained(path, mesh=mesh)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    # gate [8, 32, 24] over expert x fsdp x tensor: 8 reads of [4, 16, 12] each, for gate and for up.
    assert [s for n, p, s in reads if n == name and p == "expert_gate"] == [(4, 16, 12)] * 8
    assert [s for n, p, s in reads if n == name and p == "expert_up"] == [(4, 16, 12)] * 8
    for part in ("expert_gate", "expert_up", "expert_down", "expert_gate_bias", "expert_down_bias"):
        w = getattr(sharded.layers[0].mlp, part)[...]
        assert w.sharding.spec[0] == "expert", part
        np.testing.assert_array_equal(np.asarray(w), np.asarray(getattr(plain.layers[0].mlp, part)[...]))


def test_router_and_expert_layout_against_hf_tensors(tiny):
    hf, path = tiny
    ours = from_pretrained(path).layers[1].mlp
    experts = hf.model.layers[1].mlp.experts
    gate_up = experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(np.asarray(ours.expert_gate[...]), gate_up[..., ::2])
    np.testing.assert_array_equal(np.asarray(ours.expert_up[...]), gate_up[..., 1::2])
    np.testing.assert_array_equal(
        np.asarray(ours.expert_up_bias[...]), experts.gate_up_proj_bias.detach().numpy()[:, 1::2]
    )
    np.testing.assert_array_equal(np.asarray(ours.router[...]), hf.model.layers[1].mlp.router.weight.detach().numpy().T)


def test_defaults_of_an_older_config_follow_transformers():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    # The Hub's config style: rope_scaling + rope_theta, no swiglu_alpha, no layer_types, no head_dim key.
    hub = dict(
        model_type="gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                          original_max_position_embeddings=4096),
        rope_theta=150000,
    )  # fmt: skip
    cfg = config_from_hf(hub)
    hf = GptOssConfig(**{k: v for k, v in hub.items() if k != "model_type"})
    assert cfg.head_dim == hf.head_dim == 64
    assert cfg.layer_types == tuple(hf.layer_types)
    assert (cfg.sliding_window, cfg.swiglu_alpha, cfg.swiglu_limit) == (hf.sliding_window, hf.swiglu_alpha, 7.0)
    assert cfg.norm_eps == hf.rms_norm_eps and cfg.router_aux_loss_coef == 0.0
    ((_, rope),) = cfg.rope
    assert (rope.theta, rope.factor, rope.truncate) == (150000.0, 32.0, False)
    rotary = GptOssRotaryEmbedding(hf)  # YaRN with truncate=false: the table (to float32 pow's ulp) and the factor
    np.testing.assert_allclose(rope.inv_freq(cfg.head_dim), rotary.inv_freq.numpy(), rtol=1e-6, atol=0)
    assert rope.attention_scaling == rotary.attention_scaling
    # Neither rope_parameters nor rope_scaling: HF's YaRN default; no num_key_value_heads: 8.
    bare = {k: v for k, v in hub.items() if k not in ("rope_scaling", "rope_theta", "num_key_value_heads")}
    bare["num_attention_heads"] = 8
    cfg, hf = config_from_hf(bare), GptOssConfig(**{k: v for k, v in bare.items() if k != "model_type"})
    assert cfg.num_kv_heads == hf.num_key_value_heads == 8
    np.testing.assert_allclose(cfg.rope[0][1].inv_freq(64), GptOssRotaryEmbedding(hf).inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "extra,key",
    [
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(swiglu_limit=None), "swiglu_limit"),
        (dict(attention_bias="yes"), "attention_bias"),
        (dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
        (dict(rope_parameters=dict(rope_type="proportional", rope_theta=1.0)), "rope_parameters.rope_type"),
        (dict(rope_parameters={**TINY["rope_parameters"], "truncate": "no"}), "rope_parameters.truncate"),
        (dict(quantization_config=dict(quant_method="bitsandbytes")), "quantization_config"),
    ],
)
def test_unsupported_options_name_the_key(extra, key):
    hf = _hf_config().to_dict()
    hf.update(extra)
    with pytest.raises(UnsupportedConfig, match=key):
        config_from_hf(hf)


def test_dequantize_mxfp4_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.RandomState(0)
    blocks = rng.randint(0, 256, (3, 10, 2, 16)).astype(np.uint8)  # [E, out, in / 32, 16]
    scales = rng.randint(0, 256, (3, 10, 2)).astype(np.uint8)  # every exponent, 2**-127 .. 2**128 (inf)
    ours = np.swapaxes(dequantize_mxfp4(blocks, scales), -1, -2)  # HF's [E, in, out]
    for dtype, ours_cast in ((torch.float32, ours), (torch.bfloat16, ours.astype(jnp.bfloat16).astype(np.float32))):
        ref = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=dtype).float().numpy()
        np.testing.assert_array_equal(ours_cast, ref)  # bit for bit, inf and nan (0 * inf) included


@functools.cache
def _build_mxfp4(root: str):
    """A tiny gpt-oss checkpoint whose experts are stored in MXFP4 (random codes and exponents, as the Hub's), and
    transformers' model of it (dequantised on load, ``Mxfp4Config(dequantize=True)``)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_hf_config(intermediate_size=32), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_bias"):
                p.add_(0.3 * torch.randn_like(p))
    directory = Path(root) / "gpt_oss_mxfp4"
    model.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    rng = np.random.RandomState(0)
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        e, d_in, d_out = tensors.pop(name).shape
        tensors[f"{name}_blocks"] = rng.randint(0, 256, (e, d_out, d_in // 32, 16)).astype(np.uint8)
        tensors[f"{name}_scales"] = rng.randint(121, 126, (e, d_out, d_in // 32)).astype(np.uint8)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (directory / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=Mxfp4Config(dequantize=True), attn_implementation="eager"
    )
    return hf.eval(), directory


def test_mxfp4_checkpoint_loads_dequantised_like_transformers(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, path = _build_mxfp4(str(tmp_path_factory.mktemp("hf_tiny_gpt_oss_mxfp4")))
    ours = from_pretrained(path)
    assert "quantization_config" not in ours.config.hf_config
    for layer, ref in zip(ours.layers, hf.model.layers):
        gate_up = ref.mlp.experts.gate_up_proj.detach().numpy()
        assert layer.mlp.expert_gate[...].dtype == jnp.bfloat16  # exact: every MXFP4 value is a bfloat16
        np.testing.assert_array_equal(np.asarray(layer.mlp.expert_gate[...], np.float32), gate_up[..., ::2])
        np.testing.assert_array_equal(np.asarray(layer.mlp.expert_up[...], np.float32), gate_up[..., 1::2])
        down = ref.mlp.experts.down_proj.detach().numpy()
        np.testing.assert_array_equal(np.asarray(layer.mlp.expert_down[...], np.float32), down)
    ids, right, left = _batch(5)
    ref_logits = hf_forward(hf, ids, right).logits.numpy()
    assert max_diff(_logits(ours, ids, right), ref_logits, right) < 1e-4

    # Export writes the dequantised experts and no quantization_config; transformers reads them as plain weights.
    save_pretrained(ours, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_forward(reloaded, ids, right).logits.numpy(), ref_logits, atol=1e-5, rtol=0)

    # Sharded: each device dequantises only the rows and 32-value groups of its block.
    if len(jax.devices()) >= 8:
        from cpo_jax.parallel import make_mesh

        mesh = make_mesh({"expert": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
        sharded = from_pretrained(path, mesh=mesh)
        for part in ("expert_gate", "expert_up", "expert_down"):
            w = getattr(sharded.layers[1].mlp, part)[...]
            assert (
                len({s.data.shape for s in w.addressable_shards}) == 1
                and w.addressable_shards[0].data.size * 8 == w.size
            )
            np.testing.assert_array_equal(np.asarray(w), np.asarray(getattr(ours.layers[1].mlp, part)[...]))


def test_sharding_spec_of_expert_params(tiny):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    from cpo_jax.parallel import make_mesh

    _, path = tiny
    mesh = make_mesh({"expert": 4}, jax.devices()[:4])
    model = from_pretrained(path, mesh=mesh)
    assert model.layers[0].mlp.expert_up_bias[...].sharding.spec == P("expert", None)
    assert model.layers[0].mlp.router_bias[...].sharding.spec == P(None)
