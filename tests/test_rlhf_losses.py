"""KL estimators, advantages, PPO/value losses, KTO, Bradley-Terry and metrics vs NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import losses
from tests import reference_np as ref


def rng_arrays(seed, *shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, scale, shape) for shape in shapes]


def right_padded_mask(seed, batch, length):
    lengths = np.random.default_rng(seed).integers(1, length + 1, batch)
    return (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(estimator):
    logp, ref_logp = rng_arrays(0, (4, 9), (4, 9))
    got = losses.kl_estimate(jnp.asarray(logp), jnp.asarray(ref_logp), estimator)
    np.testing.assert_allclose(np.asarray(got), ref.kl_k(logp, ref_logp, estimator), rtol=1e-5, atol=1e-6)


def test_k1_and_k3_are_unbiased_and_k3_nonnegative():
    """Sampling y ~ p, the means of k1 and k3 converge to KL(p || q)."""
    rng = np.random.default_rng(1)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    exact = float(np.sum(p * np.log(p / q)))
    samples = rng.choice(6, size=400_000, p=p)
    logp, logq = jnp.log(jnp.asarray(p))[samples], jnp.log(jnp.asarray(q))[samples]
    for estimator in ("k1", "k3"):
        values = losses.kl_estimate(logp, logq, estimator)
        assert abs(float(jnp.mean(values)) - exact) < 0.01, estimator
    assert float(jnp.min(losses.kl_estimate(logp, logq, "k3"))) >= 0.0


def test_k3_stays_finite_for_huge_log_ratios():
    values = losses.kl_estimate(jnp.array([-1e4, 1e4]), jnp.zeros(2), "k3")
    assert np.all(np.isfinite(np.asarray(values)))


def test_unknown_kl_estimator():
    with pytest.raises(ValueError, match="k4"):
        losses.kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalized_rewards_sequence_and_token_forms_agree(estimator):
    logp, ref_logp = rng_arrays(2, (3, 7), (3, 7))
    scores = np.array([1.0, -0.5, 2.0])
    mask = right_padded_mask(2, 3, 7)
    want = scores - 0.05 * np.sum(ref.kl_k(logp, ref_logp, estimator) * mask, -1)
    args = (jnp.asarray(scores), jnp.asarray(logp), jnp.asarray(ref_logp), jnp.asarray(mask))
    sequence = losses.kl_penalized_sequence_reward(*args, kl_coef=0.05, estimator=estimator)
    tokens = losses.kl_penalized_token_rewards(*args, kl_coef=0.05, estimator=estimator)
    np.testing.assert_allclose(np.asarray(sequence), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tokens).sum(-1), want, rtol=1e-5)
    last = mask.sum(-1).astype(int) - 1
    np.testing.assert_allclose(
        np.asarray(tokens)[np.arange(3), last] + 0.05 * ref.kl_k(logp, ref_logp, estimator)[np.arange(3), last],
        scores,
        rtol=1e-5,
    )
    assert np.all(np.asarray(tokens)[mask == 0] == 0)


def test_rloo_and_grpo_advantages_match_loops():
    (rewards,) = rng_arrays(3, (5, 4))
    np.testing.assert_allclose(np.asarray(losses.rloo_advantages(jnp.asarray(rewards))), ref.rloo(rewards), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.grpo_advantages(jnp.asarray(rewards))), ref.grpo(rewards), rtol=1e-4)
    centred = losses.grpo_advantages(jnp.asarray(rewards), scale_by_std=False)
    np.testing.assert_allclose(np.asarray(centred), rewards - rewards.mean(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    # A group with identical rewards carries no signal.
    assert np.all(np.asarray(losses.grpo_advantages(jnp.ones((1, 4)))) == 0)
    with pytest.raises(ValueError, match="at least 2"):
        losses.rloo_advantages(jnp.ones((3, 1)))


def test_reinforce_advantages():
    rewards = jnp.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(np.asarray(losses.reinforce_advantages(rewards)), [1.0, 2.0, 4.0])
    np.testing.assert_allclose(
        np.asarray(losses.reinforce_advantages(rewards, jnp.mean(rewards))), [-4 / 3, -1 / 3, 5 / 3], rtol=1e-6
    )


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_reference_loop(gamma, lam):
    rewards, values = rng_arrays(4, (3, 8), (3, 8))
    mask = right_padded_mask(4, 3, 8)
    adv, ret = losses.gae_advantages(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
    want_adv, want_ret = ref.gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_ppo_policy_loss_matches_numpy(aggregation, eps_high):
    logp, old, adv = rng_arrays(5, (4, 6), (4, 6), (4, 6), scale=0.3)
    mask = right_padded_mask(5, 4, 6)
    loss, stats = losses.ppo_policy_loss(
        *(jnp.asarray(x) for x in (logp, old, adv, mask)), clip_eps=0.2, clip_eps_high=eps_high, aggregation=aggregation
    )
    want = ref.ppo(logp, old, adv, mask, 0.2, eps_high or 0.2, aggregation)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    ratio = np.exp(logp - old)
    clipped = -adv * np.clip(ratio, 0.8, 1 + (eps_high or 0.2)) > -adv * ratio
    np.testing.assert_allclose(float(stats["clipfrac"]), (clipped * mask).sum() / mask.sum(), rtol=1e-6)


def test_ppo_gradient_is_zero_where_clipped():
    """Tokens with rho > 1 + eps and A > 0 get no gradient; unclipped tokens get -A * rho / N."""
    logp = jnp.log(jnp.array([[1.5, 1.0, 0.5]]))
    advantages = jnp.array([[1.0, 1.0, -1.0]])
    mask = jnp.ones((1, 3))
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, jnp.zeros((1, 3)), advantages, mask)[0])(logp)
    np.testing.assert_allclose(np.asarray(grad), [[0.0, -1.0 / 3, 0.0]], atol=1e-6)


def test_ppo_sequence_level_advantages_broadcast():
    logp, old = rng_arrays(6, (2, 5), (2, 5), scale=0.1)
    adv = np.array([0.5, -1.0])
    mask = np.ones((2, 5))
    loss, _ = losses.ppo_policy_loss(*(jnp.asarray(x) for x in (logp, old, adv, mask)))
    np.testing.assert_allclose(
        float(loss), ref.ppo(logp, old, adv[:, None] * mask, mask, 0.2, 0.2, "token_mean"), rtol=1e-5
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_value_loss_matches_numpy(aggregation):
    v, v_old, ret = rng_arrays(7, (3, 5), (3, 5), (3, 5))
    mask = right_padded_mask(7, 3, 5)
    loss, stats = losses.value_loss(
        *(jnp.asarray(x) for x in (v, v_old, ret, mask)), clip_eps=0.2, aggregation=aggregation
    )
    np.testing.assert_allclose(float(loss), ref.value(v, v_old, ret, mask, 0.2, aggregation), rtol=1e-5)
    plain, _ = losses.value_loss(*(jnp.asarray(x) for x in (v, v_old, ret, mask)), clip_eps=None)
    np.testing.assert_allclose(float(plain), 0.5 * ref.aggregate((v - ret) ** 2, mask, "token_mean"), rtol=1e-5)
    assert 0.0 <= float(stats["vf_clipfrac"]) <= 1.0


def test_masked_whiten():
    (x,) = rng_arrays(8, (4, 6), scale=3.0)
    mask = right_padded_mask(8, 4, 6)
    out = np.asarray(losses.masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
    selected = out[mask == 1]
    assert abs(selected.mean()) < 1e-5 and abs(selected.var() - 1.0) < 1e-4


def test_kto_matches_reference_and_kl_estimate_is_clamped():
    policy, reference, policy_kl, reference_kl = rng_arrays(9, (10,), (10,), (10,), (10,), scale=5.0)
    desirable = np.arange(10) % 3 != 0
    kl = losses.kto_kl_estimate(jnp.asarray(policy_kl), jnp.asarray(reference_kl))
    np.testing.assert_allclose(float(kl), max(0.0, float(np.mean(policy_kl - reference_kl))), rtol=1e-5, atol=1e-6)
    assert float(losses.kto_kl_estimate(jnp.zeros(3), jnp.ones(3))) == 0.0
    got = losses.kto_loss(
        jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(desirable), kl=2.0, beta=0.2,
        desirable_weight=1.0, undesirable_weight=1.33,
    )  # fmt: skip
    want = ref.kto(policy, reference, desirable, 2.0, beta=0.2, wd=1.0, wu=1.33)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    apo = losses.kto_loss(
        jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(desirable), loss_type="apo_zero_unpaired"
    )
    u = policy - reference
    np.testing.assert_allclose(np.asarray(apo), np.where(desirable, 1 - ref.sig(0.1 * u), ref.sig(0.1 * u)), rtol=1e-5)


def test_kto_kl_has_no_gradient():
    grad = jax.grad(lambda p: losses.kto_kl_estimate(p, jnp.zeros(3)))(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_bradley_terry_loss():
    rc, rr, margin = rng_arrays(10, (8,), (8,), (8,))
    got = losses.bradley_terry_loss(
        jnp.asarray(rc), jnp.asarray(rr), margin=jnp.abs(jnp.asarray(margin)), center_rewards_coefficient=0.01
    )
    want = -ref.logsig(rc - rr - np.abs(margin)) + 0.01 * (rc + rr) ** 2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(losses.bradley_terry_loss(jnp.zeros(1), jnp.zeros(1))[0]), np.log(2), rtol=1e-6)


def test_preference_metrics_match_numpy():
    rng = np.random.default_rng(11)
    pc, pr, rc, rr = (rng.normal(-20, 5, 12) for _ in range(4))
    nc, nr = rng.integers(1, 30, 12).astype(float), rng.integers(1, 30, 12).astype(float)
    mask = np.ones(12)
    mask[-2:] = 0
    logps = losses.PairLogps(*(jnp.asarray(x) for x in (pc, pr, rc, rr, nc, nr)), mask=jnp.asarray(mask))
    m = losses.preference_metrics(logps, beta=0.2, gamma=0.5)
    keep = mask == 1
    pc, pr, rc, rr, nc, nr = (x[keep] for x in (pc, pr, rc, rr, nc, nr))
    cr, rj = 0.2 * (pc - rc), 0.2 * (pr - rr)
    dt, dr = pc - pr, rc - rr
    dtn, drn = pc / nc - pr / nr, rc / nc - rr / nr
    want = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(), "rewards/accuracies": (cr > rj).mean(),
        "rewards/margins": (cr - rj).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
        "diagnostics/frac_in_U": ((dr < dt) & (dt < 0)).mean(),
        "diagnostics/frac_ref_prefers_rejected": (dr < 0).mean(),
        "diagnostics/abs_accuracy": (dt > 0).mean(), "diagnostics/frac_ref_below_gamma": (dr < 0.5).mean(),
        "diagnostics/delta_theta_mean": dt.mean(), "diagnostics/delta_ref_mean": dr.mean(),
        "diagnostics/frac_in_U_norm": ((drn < dtn) & (dtn < 0)).mean(),
        "diagnostics/abs_accuracy_norm": (dtn > 0).mean(),
    }  # fmt: skip
    for key, value in want.items():
        np.testing.assert_allclose(float(m[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_metrics_without_reference_use_policy_rewards():
    m = losses.preference_metrics(losses.PairLogps(jnp.array([-1.0, -5.0]), jnp.array([-2.0, -4.0])), beta=0.5)
    assert float(m["rewards/chosen"]) == pytest.approx(0.5 * -3.0)
    assert float(m["diagnostics/abs_accuracy"]) == 0.5
    assert "diagnostics/frac_in_U" not in m


def test_a_policy_in_U_has_dpo_loss_below_log_two_yet_prefers_the_rejected_answer():
    """The paper's pathology in one pair: delta_ref = -4 < delta_theta = -1 < 0."""
    pc, pr, rc, rr = (jnp.array([x]) for x in (-6.0, -5.0, -7.0, -3.0))
    logps = losses.PairLogps(pc, pr, rc, rr)
    assert float(losses.sigmoid_loss(logps)[0]) < np.log(2.0)
    m = losses.preference_metrics(logps)
    assert float(m["diagnostics/frac_in_U"]) == 1.0 and float(m["diagnostics/abs_accuracy"]) == 0.0
    assert float(m["rewards/accuracies"]) == 1.0  # the relative accuracy calls this pair "correct"
    # CPO's target sits above gamma, so the same policy is still penalised more than at the reference.
    cpo = losses.cpo_loss(logps, length_normalize=False)
    at_reference = losses.cpo_loss(losses.PairLogps(rc, rr, rc, rr), length_normalize=False)
    assert float(cpo[0]) > np.log(2.0) and float(cpo[0]) < float(at_reference[0])
