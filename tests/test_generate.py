"""KV-cache generation: greedy parity with transformers' generate, cache consistency, sampling filters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.hf.pretrained import from_pretrained
from cpo_jax.models import init_cache
from cpo_jax.models.generate import SamplingConfig, filter_logits, generate, sample_token
from tests.hf_tiny import TINY, assert_greedy_matches_hf, tiny_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_tiny_gen")


def _prompts():
    rng = np.random.RandomState(11)
    ids = rng.randint(3, 256, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ids[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(TINY))
def test_greedy_matches_transformers_generate(name, root):
    hf, path = tiny_model(name, root)
    ids, mask = _prompts()
    new = 10
    out = assert_greedy_matches_hf(hf, path, ids, mask, new)
    assert np.asarray(out.mask).all()


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_prefill_then_decode_equals_full_forward(name, root):
    _, path = tiny_model(name, root)
    model = from_pretrained(path)
    ids, mask = _prompts()
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    cache = init_cache(model.config, 2, 12)
    hidden, cache = model.forward(jnp.asarray(ids[:, :6]), attention_mask=jnp.asarray(mask[:, :6]), cache=cache)
    steps = [np.asarray(model.logits(hidden))]
    for t in range(6, 9):
        hidden, cache = model.forward(
            jnp.asarray(ids[:, t : t + 1]), attention_mask=jnp.asarray(mask[:, t : t + 1]), cache=cache
        )
        steps.append(np.asarray(model.logits(hidden)))
    got = np.concatenate(steps, axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-4)
    assert int(cache.index) == 9 and list(np.asarray(cache.length)) == [9, 5]


def test_eos_stops_rows_and_pads(root):
    _, path = tiny_model("llama", root)
    model = from_pretrained(path)
    ids, mask = _prompts()
    free = generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6)
    eos = int(free.tokens[0, 2])
    out = generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    tokens, m = np.asarray(out.tokens), np.asarray(out.mask)
    first = int(np.argmax(np.asarray(free.tokens[0]) == eos))
    assert m[0, : first + 1].all() and not m[0, first + 1 :].any()
    assert (tokens[0, first + 1 :] == 0).all()


def test_generate_rejects_right_padding(root):
    _, path = tiny_model("llama", root)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate(from_pretrained(path), jnp.asarray(ids), jnp.asarray(mask[:, ::-1].copy()), max_new_tokens=2)


def test_top_k_and_top_p_filters_against_numpy():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    k = filter_logits(jnp.asarray(logits), SamplingConfig(temperature=0.7, top_k=5))
    kept = np.isfinite(np.asarray(k))
    assert (kept.sum(-1) == 5).all()
    assert (np.sort(np.argsort(-logits, -1)[:, :5], -1) == np.sort(np.nonzero(kept)[1].reshape(4, 5), -1)).all()

    p = 0.8
    filtered = np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(temperature=1.0, top_p=p)))
    for row, got in zip(logits, filtered):
        order = np.argsort(-row)
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        n_keep = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass >= p
        assert set(np.nonzero(np.isfinite(got))[0]) == set(order[:n_keep])


def test_sampling_frequencies_follow_softmax():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    keys = jax.random.split(jax.random.key(0), 20000)
    cfg = SamplingConfig(temperature=2.0)
    tokens = jax.vmap(lambda key: sample_token(logits, key, cfg)[0][0])(keys)
    freq = np.bincount(np.asarray(tokens), minlength=4) / len(keys)
    want = np.exp(np.asarray(logits[0]) / 2.0)
    want /= want.sum()
    np.testing.assert_allclose(freq, want, atol=0.015)
    _, logp = sample_token(logits, keys[0], cfg)
    assert np.isclose(np.exp(np.asarray(logp))[0], want[int(sample_token(logits, keys[0], cfg)[0][0])], rtol=1e-5)


def test_empty_batch_slots_do_not_change_the_real_rows(root):
    """An all-padding row (an unfilled slot of the last batch) is allowed and leaves the other rows as they were."""
    _, path = tiny_model("llama", root)
    model = from_pretrained(path)
    ids, mask = _prompts()
    alone = generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=5, pad_token_id=0)
    padded_ids = np.concatenate([ids, np.zeros_like(ids[:1])])
    padded_mask = np.concatenate([mask, np.zeros_like(mask[:1])])
    with_slot = generate(model, jnp.asarray(padded_ids), jnp.asarray(padded_mask), max_new_tokens=5, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(with_slot.tokens)[:2], np.asarray(alone.tokens))
