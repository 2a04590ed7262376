"""Empty pair slots (``PairLogps.mask == 0``) change no real pair's loss (issue 21).

Packed batches and final eval batches hold empty slots. For every registered loss, the per-pair values at
the real slots of a padded batch, whatever the empty slots hold, equal the loss of the batch without them;
and the same through :func:`cpo_jax.train.objectives.preference_objective` on packed and padded batches.
Ground truth: the unpadded batch, and the float64 NumPy formulas of ``tests/reference_np.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import losses
from cpo_jax.data.batching import PREFERENCE, BatchBuilder, BatchConfig
from cpo_jax.train.objectives import pair_logps, preference_objective, token_logps_from_batch
from tests import reference_np as ref

REAL = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 1], bool)  # 7 real pairs, 5 empty slots, interleaved
COUPLED = {"aot", "aot_unpaired", "sft", "orpo", "contrastive"}


def real_batch(seed: int = 0, size: int = int(REAL.sum())):
    """float64 ``(pc, pr, rc, rr, nc, nr)`` ``[size]``: summed log-probs (strictly negative) and lengths."""
    rng = np.random.default_rng(seed)
    nc, nr = rng.integers(1, 30, size).astype(np.float64), rng.integers(1, 30, size).astype(np.float64)
    rc, rr = -rng.uniform(0.1, 2.0, size) * nc, -rng.uniform(0.1, 2.0, size) * nr
    pc = np.minimum(rc + rng.normal(0.0, 2.0, size), -1e-2)
    pr = np.minimum(rr + rng.normal(0.0, 2.0, size), -1e-2)
    return pc, pr, rc, rr, nc, nr


def padded(arrays, garbage: str, seed: int = 1):
    """The arrays spread over the slots of ``REAL``, with garbage at the empty slots (never plain zeros)."""
    rng = np.random.default_rng(seed)
    empty = int((~REAL).sum())
    out = []
    for k, x in enumerate(arrays):
        full = np.empty(REAL.size)
        full[REAL] = x
        if garbage == "finite":  # log-probs far from the real ones, lengths up to 10x longer
            full[~REAL] = rng.integers(1, 300, empty) if k >= 4 else -rng.uniform(0.0, 500.0, empty)
        else:
            full[~REAL] = [np.nan, np.inf, -np.inf, 0.0, 1e30][:empty]
        out.append(full)
    return out


def pair_logps_of(arrays, mask=None) -> losses.PairLogps:
    pc, pr, rc, rr, nc, nr = (jnp.asarray(x, jnp.float32) for x in arrays)
    return losses.PairLogps(pc, pr, rc, rr, nc, nr, mask=None if mask is None else jnp.asarray(mask))


def float64_reference(name: str, pc, pr, rc, rr, nc, nr) -> np.ndarray:
    """Per-pair ``[B]`` loss ``name`` at its default hyperparameters, in float64 NumPy."""
    hp = losses.hyperparameters(name)
    if name in ("cpo", "cpo_clip", "cpo_easy"):
        kw = {k: hp[k] for k in ("beta", "gamma", "tau", "alpha") if k in hp}
        return ref.cpo_family(name, pc, pr, rc, rr, nc, nr, normalize=hp["length_normalize"], **kw)
    if name in ("sft", "simpo", "orpo", "contrastive"):
        return ref.reference_free(
            name,
            pc,
            pr,
            nc,
            nr,
            beta=hp.get("beta", 0.0),
            gamma=hp.get("gamma"),
            eps=hp.get("label_smoothing", 0.0),
            nll_coef=hp.get("nll_coef", 1.0),
        )
    return ref.dpo_family(
        name,
        pc,
        pr,
        rc,
        rr,
        nc,
        nr,
        beta=hp["beta"],
        eps=hp.get("label_smoothing", 0.0),
        tau=hp.get("discopop_tau", 0.05),
    )


@pytest.mark.parametrize("garbage", ["finite", "nonfinite"])
@pytest.mark.parametrize("name", losses.names())
def test_empty_slots_leave_every_loss_unchanged(name, garbage):
    arrays = real_batch()
    fn = losses.get(name)
    unpadded = np.asarray(fn(pair_logps_of(arrays)), np.float64)
    out = np.asarray(fn(pair_logps_of(padded(arrays, garbage), mask=REAL)), np.float64)
    assert out.shape == REAL.shape
    np.testing.assert_allclose(out[REAL], unpadded, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[REAL].mean(), unpadded.mean(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[REAL], float64_reference(name, *arrays), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", losses.names())
def test_empty_slots_get_no_gradient_and_real_gradients_are_unchanged(name):
    arrays = real_batch(2)
    fn = losses.get(name)

    def total(pc, pr, logps):
        out = fn(logps.replace(chosen=pc, rejected=pr))
        return jnp.sum(jnp.where(logps.real(), out, 0.0))

    want = jax.grad(total, argnums=(0, 1))(*pair_logps_of(arrays).policy(), pair_logps_of(arrays))
    big = pair_logps_of(padded(arrays, "finite", seed=3), mask=REAL)
    got = jax.grad(total, argnums=(0, 1))(*big.policy(), big)
    for g, w in zip(got, want):
        g = np.asarray(g)
        np.testing.assert_allclose(g[REAL], np.asarray(w), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(g[~REAL], 0.0)


def test_the_registry_marks_exactly_the_losses_that_couple_the_batch():
    """Marked losses change when another pair changes; unmarked ones never do."""
    assert {n for n in losses.names() if losses.couples_batch(n)} == COUPLED
    arrays = real_batch(4)
    other = [x.copy() for x in arrays]
    other[0][1:] -= 3.0  # every policy chosen log-prob but pair 0's
    other[4][1:] += 5.0  # and every chosen length but pair 0's
    for name in losses.names():
        fn = losses.get(name)
        first, moved = np.asarray(fn(pair_logps_of(arrays))), np.asarray(fn(pair_logps_of(other)))
        if name.startswith("aot"):  # entry 0 is the lowest quantile, not pair 0: compare sums instead
            first, moved = first.sum(keepdims=True), moved.sum(keepdims=True)
        changed = not np.allclose(first[0], moved[0], rtol=1e-6, atol=0.0)
        assert changed == losses.couples_batch(name), name
    with pytest.raises(KeyError, match="unknown loss"):
        losses.couples_batch("dpo_v2")  # dpo is an alias of sigmoid


def test_combined_losses_honour_the_mask_and_say_they_couple_the_batch():
    mpo = losses.combine([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])
    assert mpo.couples_batch and not losses.combine([("sigmoid", 1.0)]).couples_batch
    arrays = real_batch(5)
    out = np.asarray(mpo(pair_logps_of(padded(arrays, "finite"), mask=REAL), beta=0.3))
    np.testing.assert_allclose(out[REAL], np.asarray(mpo(pair_logps_of(arrays), beta=0.3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("garbage", ["finite", "nonfinite"])
def test_metrics_are_means_over_the_real_pairs(garbage):
    arrays = real_batch(6)
    want = losses.preference_metrics(pair_logps_of(arrays), beta=0.3, gamma=0.5)
    got = losses.preference_metrics(pair_logps_of(padded(arrays, garbage), mask=REAL), beta=0.3, gamma=0.5)
    assert set(got) == set(want) and "diagnostics/frac_in_U_norm" in got
    for key in want:
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    pc, pr, rc, rr, _, _ = arrays
    np.testing.assert_allclose(float(got["rewards/margins"]), 0.3 * np.mean((pc - rc) - (pr - rr)), rtol=1e-5)


def test_bco_reward_shift_ignores_empty_slots():
    rewards = np.random.default_rng(7).normal(size=REAL.size)
    garbage = np.where(REAL, rewards, 1e6)
    mean, count = losses.update_reward_shift(jnp.float32(0.0), jnp.float32(0.0), jnp.asarray(garbage), mask=REAL)
    np.testing.assert_allclose(float(mean), rewards[REAL].mean(), rtol=1e-5)
    assert float(count) == 1.0


def test_legacy_positional_form_is_the_same_implementation():
    arrays = real_batch(8)
    pc, pr, rc, rr, nc, nr = (jnp.asarray(x, jnp.float32) for x in arrays)
    for name in losses.names():
        fn = losses.get(name)
        legacy = fn(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr)
        np.testing.assert_array_equal(np.asarray(legacy), np.asarray(fn(pair_logps_of(arrays))))
    with pytest.raises(TypeError, match="inside the PairLogps"):
        losses.get("sigmoid")(pair_logps_of(arrays), chosen_lengths=nc)


# --- through the training objective: packed and padded batches with empty slots -------------------------


class TokenwiseModel:
    """A stand-in for a causal LM whose hidden state depends only on the token and its position, so summed
    log-probs are the same in any batch layout; enough to test how the objective treats empty slots."""

    logit_softcap = None

    def __init__(self, seed: int, vocab: int = 32, dim: int = 8):
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        self.embedding = jax.random.normal(k1, (vocab, dim))
        self.position = jax.random.normal(k2, (dim,)) * 0.1
        self.head = jax.random.normal(k3, (dim, vocab))

    def hidden_states(self, input_ids, *, attention_mask, positions, segment_ids):
        del attention_mask, segment_ids
        return jnp.tanh(self.embedding[input_ids] + positions[..., None] * self.position)

    def unembedding(self):
        return self.head


def _examples(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt = rng.integers(4, 32, rng.integers(2, 6))
        chosen, rejected = (np.concatenate([prompt, rng.integers(4, 32, rng.integers(1, 9))]) for _ in range(2))
        out.append(
            {
                "chosen": chosen.astype(np.int32),
                "rejected": rejected.astype(np.int32),
                "index": i,
                "chosen_prompt_len": len(prompt),
                "rejected_prompt_len": len(prompt),
            }
        )
    return out


def _batch(examples, cfg: BatchConfig) -> dict[str, jax.Array]:
    builder = BatchBuilder(cfg, PREFERENCE)
    for example in examples:
        assert builder.add(example)
    return {k: jnp.asarray(v) for k, v in builder.build().items() if k != "index"}


LAYOUTS = {
    "packed": BatchConfig(pairs_per_batch=8, max_length=64, pack=True, rows_per_batch=3),
    "padded": BatchConfig(pairs_per_batch=8, max_length=64, buckets=(16, 64)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", losses.names())
def test_preference_objective_with_empty_slots_equals_the_full_batch(name, layout):
    examples = _examples(5)
    full = _batch(examples, BatchConfig(pairs_per_batch=5, max_length=64, buckets=(16, 64)))
    sparse = _batch(examples, LAYOUTS[layout])
    assert bool(full["pair_mask"].all()) and int(sparse["pair_mask"].sum()) == 5 and sparse["pair_mask"].size == 8
    policy, reference_model = TokenwiseModel(0), TokenwiseModel(1)
    results = []
    for batch in (full, sparse):
        reference = pair_logps(token_logps_from_batch(reference_model, batch), batch)
        results.append(
            preference_objective(
                policy,
                batch,
                reference,
                loss_name=name,
                hparams={"beta": 0.3} if "beta" in losses.hyperparameters(name) else {},
            )
        )
    (full_sum, full_metrics), (sparse_sum, sparse_metrics) = results
    np.testing.assert_allclose(float(sparse_sum) / 5, float(full_sum) / 5, rtol=2e-5, atol=1e-6)
    for key in full_metrics:
        np.testing.assert_allclose(
            float(sparse_metrics[key]), float(full_metrics[key]), rtol=2e-5, atol=1e-6, err_msg=key
        )


def test_preference_objective_reference_is_policy_gives_zero_rewards_on_a_packed_batch():
    batch = _batch(_examples(5), LAYOUTS["packed"])
    reference = pair_logps(token_logps_from_batch(TokenwiseModel(1), batch), batch)
    total, metrics = preference_objective(
        TokenwiseModel(0), batch, reference, loss_name="sigmoid", hparams={"beta": 0.3}, reference_is_policy=True
    )
    np.testing.assert_allclose(float(total), 5 * np.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0
