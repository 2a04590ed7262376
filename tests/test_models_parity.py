"""Flax ports vs Hugging Face PyTorch: logits, export/reload, exact round trips, scan/remat, packing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.hf.pretrained import from_pretrained, save_pretrained
from cpo_jax.ops.logprobs import sequence_logps_from_hidden, token_logps
from tests.hf_tiny import TINY, assert_same_safetensors, hf_logits, max_diff, tiny_model

torch = pytest.importorskip("torch")
NAMES = sorted(TINY)
ATOL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_tiny")


def _batch(seed=0, b=3, t=12):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 256, (b, t))
    lengths = np.array([t, t - 3, t - 7])[:b]
    right = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    left = right[:, ::-1].copy()
    return ids, right, left


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_with_padding(name, root):
    hf, path = tiny_model(name, root)
    ours = from_pretrained(path)
    ids, right, left = _batch()
    ref = hf_logits(hf, ids, right)
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(right)))
    assert max_diff(got, ref, right) < ATOL
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits

    positions = np.maximum(np.cumsum(left, -1) - 1, 0)
    ref_left = hf_logits(hf, ids, left, positions)
    got_left = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(left)))
    assert max_diff(got_left, ref_left, left) < ATOL
    assert np.all(np.isfinite(got_left))


@pytest.mark.parametrize("name", NAMES)
def test_export_reloads_in_transformers(name, root, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, path = tiny_model(name, root)
    save_pretrained(from_pretrained(path), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, right, _ = _batch(1)
    np.testing.assert_allclose(hf_logits(reloaded, ids, right), hf_logits(hf, ids, right), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_reproduces_every_tensor(name, root, tmp_path):
    _, path = tiny_model(name, root)
    # Scanned (stacked) layers must export the same tensors as the per-layer list.
    save_pretrained(from_pretrained(path, scan_layers=name in ("gpt2", "gemma3", "qwen3")), tmp_path / "out")
    assert_same_safetensors(path / "model.safetensors", tmp_path / "out" / "model.safetensors")


def test_sharded_export_writes_index_and_reloads(root, tmp_path):
    _, path = tiny_model("llama", root)
    model = from_pretrained(path)
    save_pretrained(model, tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    again = from_pretrained(tmp_path / "sharded")
    ids, right, _ = _batch(2)
    np.testing.assert_array_equal(
        np.asarray(again(jnp.asarray(ids), jnp.asarray(right))), np.asarray(model(jnp.asarray(ids), jnp.asarray(right)))
    )


def test_bfloat16_params_round_trip(root, tmp_path):
    from transformers import AutoModelForCausalLM

    _, path = tiny_model("qwen3", root)
    model = from_pretrained(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert model.embed[...].dtype == jnp.bfloat16
    save_pretrained(model, tmp_path / "bf16")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.dtype == torch.bfloat16
    again = from_pretrained(tmp_path / "bf16")
    assert again.embed[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(again.embed[...], np.float32), np.asarray(model.embed[...], np.float32))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "qwen2_sliding", "gpt2"])
@pytest.mark.parametrize(
    "options",
    [
        dict(scan_layers=True),
        dict(remat="full"),
        dict(scan_layers=True, remat="dots"),
        dict(remat=("full", "none", "dots_no_batch")[:2]),
        dict(attention_impl="auto"),
    ],
)
def test_scan_remat_and_attention_impl_match_loop(name, options, root):
    _, path = tiny_model(name, root)
    base = from_pretrained(path)
    if isinstance(options.get("remat"), tuple) and len(options["remat"]) != base.config.num_layers:
        options = dict(remat=("full",) + ("none",) * (base.config.num_layers - 1))
    variant = from_pretrained(path, **options)
    ids, right, left = _batch(3)
    for mask in (right, left):
        want = np.asarray(base(jnp.asarray(ids), jnp.asarray(mask)))
        got = np.asarray(variant(jnp.asarray(ids), jnp.asarray(mask)))
        assert max_diff(got, want, mask) < 1e-5

    def loss(model):
        return jnp.sum(model(jnp.asarray(ids), jnp.asarray(right)) ** 2 * right[..., None]) * 1e-3

    from flax import nnx

    g_base = nnx.grad(loss)(base)
    g_var = nnx.grad(loss)(variant)
    np.testing.assert_allclose(np.asarray(g_var.embed[...]), np.asarray(g_base.embed[...]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gemma2", "llama_tied"])
def test_hidden_states_feed_chunked_logprobs(name, root):
    _, path = tiny_model(name, root)
    model = from_pretrained(path)
    ids, right, _ = _batch(4)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(right)
    hidden = model.hidden_states(ids_j, mask_j)
    got = sequence_logps_from_hidden(
        hidden[:, :-1],
        model.unembedding(),
        ids_j[:, 1:],
        mask_j[:, 1:],
        chunk_size=5,
        logit_softcap=model.logit_softcap,
    )
    logits = model(ids_j, mask_j)
    want = (token_logps(logits[:, :-1], ids_j[:, 1:]) * mask_j[:, 1:]).sum(-1)
    np.testing.assert_allclose(np.asarray(got.sum), np.asarray(want), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_segment_ids_isolate_packed_sequences(name, root):
    _, path = tiny_model(name, root)
    model = from_pretrained(path)
    rng = np.random.RandomState(5)
    a, b = rng.randint(3, 256, (1, 7)), rng.randint(3, 256, (1, 5))
    packed = jnp.asarray(np.concatenate([a, b], axis=1))
    segments = jnp.asarray([[1] * 7 + [2] * 5])
    got = np.asarray(model(packed, segment_ids=segments))
    np.testing.assert_allclose(got[:, :7], np.asarray(model(jnp.asarray(a))), atol=1e-5)
    np.testing.assert_allclose(got[:, 7:], np.asarray(model(jnp.asarray(b))), atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(root):
    _, path = tiny_model("gemma2", root)
    ids, right, _ = _batch(6)
    f32 = np.asarray(from_pretrained(path)(jnp.asarray(ids), jnp.asarray(right)))
    bf16 = np.asarray(
        from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(jnp.asarray(ids), jnp.asarray(right))
    )
    assert bf16.dtype == np.float32 and np.all(np.isfinite(bf16))
    assert max_diff(bf16, f32, right) < 0.05 * np.abs(f32).max()
    assert (np.argmax(bf16, -1) == np.argmax(f32, -1))[right.astype(bool)].mean() > 0.8
