"""Pairwise losses against float64 NumPy references, limits, symmetries and finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from cpo_jax import losses
from tests import reference_np as ref

DPO_FAMILY = [
    "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "nca_pair",
    "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
]  # fmt: skip
F_DIVERGENCE_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"]
CPO_FAMILY = ["cpo", "cpo_clip", "cpo_easy"]
REFERENCE_FREE = ["sft", "simpo", "orpo", "contrastive"]
ALL = DPO_FAMILY + CPO_FAMILY + REFERENCE_FREE


def batch(seed: int, size: int = 16, spread: float = 2.0):
    """Summed log-probs and lengths for ``size`` pairs, float64: the reference's log-probs, and the
    policy's within about ``spread`` nats of them (both sides strictly negative)."""
    rng = np.random.default_rng(seed)
    nc = rng.integers(1, 40, size).astype(np.float64)
    nr = rng.integers(1, 40, size).astype(np.float64)
    rc, rr = -rng.uniform(0.05, 3.0, size) * nc, -rng.uniform(0.05, 3.0, size) * nr
    pc = np.minimum(rc + rng.normal(0.0, spread, size), -1e-2)
    pr = np.minimum(rr + rng.normal(0.0, spread, size), -1e-2)
    return pc, pr, rc, rr, nc, nr


def call(name, pc, pr, rc, rr, nc, nr, **kw):
    fn = losses.get(name)
    args = [jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)]
    out = fn(losses.PairLogps(*args, chosen_lengths=jnp.asarray(nc), rejected_lengths=jnp.asarray(nr)), **kw)
    assert out.shape == pc.shape and out.dtype == jnp.float32
    return np.asarray(out, np.float64)


def test_registry_lists_every_loss_of_the_brief():
    assert sorted(ALL) == losses.names()


def test_unknown_loss_names_the_available_ones():
    with pytest.raises(KeyError, match="available: aot"):
        losses.get("dpo_v2")  # dpo is an alias of sigmoid
    with pytest.raises(KeyError, match="unpaired"):
        losses.get("kto")


@pytest.mark.parametrize("name", DPO_FAMILY)
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_family_matches_float64_reference(name, seed):
    pc, pr, rc, rr, nc, nr = batch(seed)
    kw = {"beta": 0.3}
    if name in ("exo_pair", "robust", "aot", "aot_unpaired"):
        kw["label_smoothing"] = 0.1
    got = call(name, pc, pr, rc, rr, nc, nr, **kw)
    want = ref.dpo_family(name, pc, pr, rc, rr, nc, nr, beta=0.3, eps=kw.get("label_smoothing", 0.0))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_variants_match_reference(name, fdiv):
    pc, pr, rc, rr, nc, nr = batch(3, spread=1.0)
    kw = {"beta": 0.5, "f_divergence": fdiv, "f_alpha_divergence_coef": 0.3}
    if name in ("exo_pair", "robust"):
        kw["label_smoothing"] = 0.05
    got = call(name, pc, pr, rc, rr, nc, nr, **kw)
    want = ref.dpo_family(
        name, pc, pr, rc, rr, nc, nr, beta=0.5, eps=kw.get("label_smoothing", 0.0), fdiv=fdiv, falpha=0.3
    )
    np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-5)


def test_alpha_divergence_at_alpha_one_is_reverse_kl():
    pc, pr, rc, rr, nc, nr = batch(4)
    alpha_one = call("sigmoid", pc, pr, rc, rr, nc, nr, f_divergence="alpha_divergence", f_alpha_divergence_coef=1.0)
    np.testing.assert_allclose(alpha_one, call("sigmoid", pc, pr, rc, rr, nc, nr), rtol=1e-6)


def test_unknown_f_divergence_is_rejected():
    pc, pr, rc, rr, nc, nr = batch(0)
    with pytest.raises(ValueError, match="unknown f_divergence 'kl'"):
        call("sigmoid", pc, pr, rc, rr, nc, nr, f_divergence="kl")


@pytest.mark.parametrize("name", CPO_FAMILY)
@pytest.mark.parametrize("normalize", [True, False])
def test_cpo_family_matches_float64_reference(name, normalize):
    pc, pr, rc, rr, nc, nr = batch(5)
    kw = {"beta": 0.7, "length_normalize": normalize}
    if name != "cpo_clip":
        kw["gamma"] = 0.3
    if name == "cpo":
        kw.update(tau=3.0, alpha=1.5)
    got = call(name, pc, pr, rc, rr, nc, nr, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "length_normalize"}
    want = ref.cpo_family(name, pc, pr, rc, rr, nc, nr, normalize=normalize, **ref_kw)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "name,kw",
    [("sft", {}), ("simpo", {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.1}), ("orpo", {"beta": 0.2}),
     ("contrastive", {"beta": 0.1, "label_smoothing": 0.05, "nll_coef": 0.5})],
)  # fmt: skip
def test_reference_free_losses_match_reference_and_ignore_the_reference(name, kw):
    pc, pr, rc, rr, nc, nr = batch(6)
    got = call(name, pc, pr, rc, rr, nc, nr, **kw)
    ref_kw = {"beta": kw.get("beta", 0.0), "gamma": kw.get("gamma"), "eps": kw.get("label_smoothing", 0.0)}
    if "nll_coef" in kw:
        ref_kw["nll_coef"] = kw["nll_coef"]
    np.testing.assert_allclose(got, ref.reference_free(name, pc, pr, nc, nr, **ref_kw), rtol=2e-5, atol=2e-6)
    fn = losses.get(name)
    no_ref = fn(
        losses.PairLogps(
            jnp.asarray(pc), jnp.asarray(pr), chosen_lengths=jnp.asarray(nc), rejected_lengths=jnp.asarray(nr)
        ),
        **kw,
    )
    np.testing.assert_allclose(np.asarray(no_ref), got, rtol=1e-6)


def test_sft_batch_token_mean_equals_trl_and_sequence_mode_is_per_pair():
    pc, pr, rc, rr, nc, nr = batch(7)
    got = call("sft", pc, pr, rc, rr, nc, nr)
    np.testing.assert_allclose(got.mean(), -pc.sum() / nc.sum(), rtol=1e-5)
    per_seq = call("sft", pc, pr, rc, rr, nc, nr, nll_normalization="sequence")
    np.testing.assert_allclose(per_seq, -pc / nc, rtol=1e-5)


def test_sigmoid_at_policy_equal_reference_is_log_two():
    pc, pr, _, _, nc, nr = batch(8)
    np.testing.assert_allclose(call("sigmoid", pc, pr, pc, pr, nc, nr, beta=0.37), np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("beta", [10.0, 100.0, 1000.0])
def test_dpo_tends_to_the_hinge_on_delta_ref(beta):
    """(1/beta) L_DPO -> max(0, delta_ref - delta_theta); the gap is at most log(2)/beta."""
    pc, pr, rc, rr, nc, nr = batch(9)
    scaled = call("sigmoid", pc, pr, rc, rr, nc, nr, beta=beta) / beta
    hinge = np.maximum(0.0, (rc - rr) - (pc - pr))
    gap = scaled - hinge
    assert np.all(gap >= -1e-4) and np.all(gap <= np.log(2.0) / beta + 1e-4)


@pytest.mark.parametrize("beta", [10.0, 100.0, 1000.0])
def test_cpo_tends_to_the_hinge_on_its_target(beta):
    """(1/beta) L_CPO -> max(0, t - delta_theta) with t >= max(delta_ref, gamma) > 0."""
    pc, pr, rc, rr, nc, nr = batch(10)
    scaled = call("cpo", pc, pr, rc, rr, nc, nr, beta=beta, gamma=0.5) / beta
    delta_theta, delta_ref = pc / nc - pr / nr, rc / nc - rr / nr
    t = delta_ref + np.logaddexp(0.0, 2.0 * (0.5 - delta_ref)) / 2.0
    assert np.all(t >= np.maximum(delta_ref, 0.5))
    gap = scaled - np.maximum(0.0, t - delta_theta)
    assert np.all(gap >= -1e-4) and np.all(gap <= np.log(2.0) / beta + 1e-4)


def test_cpo_tends_to_cpo_clip_as_gamma_to_zero_and_tau_to_infinity():
    pc, pr, rc, rr, nc, nr = batch(11)
    clip = call("cpo_clip", pc, pr, rc, rr, nc, nr, beta=0.5)
    errors = [
        np.max(np.abs(call("cpo", pc, pr, rc, rr, nc, nr, beta=0.5, gamma=gamma, tau=tau, alpha=1.0) - clip))
        for gamma, tau in [(0.1, 10.0), (0.01, 100.0), (1e-4, 1e4)]
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4


def test_cpo_smooth_target_worked_values():
    """PAPER.md: gamma 0.5, tau 2 gives t(-1) = 0.5243, t(0) = 0.6566, t(0.5) = 0.8466, t(2) = 2.0243."""
    t = losses.smooth_target(jnp.array([-1.0, 0.0, 0.5, 2.0]), gamma=0.5, tau=2.0, alpha=1.0)
    np.testing.assert_allclose(np.asarray(t), [0.5243, 0.6566, 0.8466, 2.0243], atol=1e-4)


def test_cpo_needs_lengths_when_length_normalised():
    pc, pr, rc, rr, _, _ = (jnp.asarray(x) for x in batch(0))
    with pytest.raises(ValueError, match="chosen_lengths"):
        losses.cpo_loss(losses.PairLogps(pc, pr, rc, rr))
    assert losses.cpo_loss(losses.PairLogps(pc, pr, rc, rr), length_normalize=False).shape == pc.shape


def test_losses_needing_a_reference_say_so():
    pc, pr = jnp.ones(3) * -2, jnp.ones(3) * -3
    for name in DPO_FAMILY + CPO_FAMILY:
        with pytest.raises(ValueError, match="needs ref_chosen"):
            losses.get(name)(losses.PairLogps(pc, pr, chosen_lengths=jnp.ones(3), rejected_lengths=jnp.ones(3)))


def test_no_gradient_flows_through_the_cpo_target():
    pc, pr, rc, rr, nc, nr = (jnp.asarray(x, jnp.float32) for x in batch(12))
    for name in CPO_FAMILY:
        grad = jax.grad(lambda r: losses.get(name)(losses.PairLogps(pc, pr, r, rr, nc, nr)).sum())(rc)
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


@given(delta=st.floats(-50, 50), beta=st.floats(0.01, 5.0))
@settings(max_examples=50, deadline=None)
def test_sigmoid_swap_identity(delta, beta):
    """log sigma(x) - log sigma(-x) = x, so L(w, l) - L(l, w) = -beta * (delta_theta - delta_ref)."""
    pc, pr = np.array([-5.0 + delta]), np.array([-5.0])
    rc, rr = np.array([-4.0]), np.array([-6.0])
    ones = np.ones(1)
    forward = call("sigmoid", pc, pr, rc, rr, ones, ones, beta=beta)
    swapped = call("sigmoid", pr, pc, rr, rc, ones, ones, beta=beta)
    np.testing.assert_allclose(forward - swapped, -beta * ((pc - pr) - (rc - rr)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "simpo", "cpo_clip"])
def test_length_normalised_losses_swap_to_the_mirror_margin(name):
    """Swapping chosen and rejected negates the (normalised) margin these losses are functions of."""
    pc, pr, rc, rr, nc, nr = batch(13)
    kw = {"beta": 0.4}
    forward, swapped = call(name, pc, pr, rc, rr, nc, nr, **kw), call(name, pr, pc, rr, rc, nr, nc, **kw)
    want_fwd = {
        "ipo": lambda d: (d - 1.25) ** 2,
        "sigmoid_norm": lambda d: -ref.logsig(0.4 * d),
        "simpo": lambda d: -ref.logsig(0.4 * d - 1.0),
        "cpo_clip": None,
    }[name]
    if want_fwd is None:  # cpo_clip: target max(d_ref, 0) is not odd; check both sides against the reference.
        np.testing.assert_allclose(swapped, ref.cpo_family("cpo_clip", pr, pc, rr, rc, nr, nc, beta=0.4), rtol=2e-5)
        return
    margin = (pc / nc - pr / nr) - (0 if name == "simpo" else (rc / nc - rr / nr))
    np.testing.assert_allclose(forward, want_fwd(margin), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(swapped, want_fwd(-margin), rtol=2e-5, atol=2e-6)


def test_apo_zero_swap_sums_to_two():
    pc, pr, rc, rr, nc, nr = batch(14)
    total = call("apo_zero", pc, pr, rc, rr, nc, nr) + call("apo_zero", pr, pc, rr, rc, nr, nc)
    np.testing.assert_allclose(total, 2.0, rtol=1e-6)


def test_aot_swap_reverses_the_sorted_margins():
    pc, pr, rc, rr, nc, nr = batch(15)
    forward = call("aot", pc, pr, rc, rr, nc, nr, beta=0.2)
    swapped = call("aot", pr, pc, rr, rc, nr, nc, beta=0.2)
    d = np.sort(pc - pr) - np.sort(rc - rr)
    np.testing.assert_allclose(np.sort(swapped), np.sort(-ref.logsig(-0.2 * d)), rtol=2e-5)
    np.testing.assert_allclose(forward.sum() - swapped.sum(), -0.2 * d.sum(), rtol=1e-4, atol=1e-4)


def _smooth_point(seed):
    """A batch away from kinks (hinge at beta*Delta = 1) and ties (aot sorting)."""
    pc, pr, rc, rr, nc, nr = batch(seed, size=6)
    return pc, pr, rc, rr, nc, nr


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_finite_differences(name):
    pc, pr, rc, rr, nc, nr = _smooth_point(16)
    kw = {"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}
    if name == "hinge":
        kw["beta"] = 0.01  # keeps every pair on the sloped side of the kink
    with jax.enable_x64(True):
        fn = losses.get(name)
        nc64, nr64, rc64, rr64 = (jnp.asarray(x, jnp.float64) for x in (nc, nr, rc, rr))

        def f(policy_chosen, policy_rejected):
            out = fn(losses.PairLogps(policy_chosen, policy_rejected, rc64, rr64, nc64, nr64), **kw)
            return jnp.sum(out * jnp.arange(1, 7))

        check_grads(f, (jnp.asarray(pc, jnp.float64), jnp.asarray(pr, jnp.float64)), order=1, modes=["rev"], eps=1e-4)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("extreme", [1e4, -1e4])
def test_finite_values_and_gradients_at_extreme_inputs(name, extreme):
    nc = nr = jnp.full((2,), 50.0)
    pc = jnp.array([-1.0 + min(extreme, 0.0), -2.0], jnp.float32)
    pr = jnp.array([-1.0 - max(extreme, 0.0), -2.0], jnp.float32)
    rc, rr = jnp.array([-1e4 - 1.0, -3.0]), jnp.array([-1.0, -1e4])  # delta_ref = -1e4 and +1e4
    kw = {"label_smoothing": 1e-3} if name == "exo_pair" else {}
    fn = losses.get(name)

    def total(policy_chosen, policy_rejected):
        return fn(losses.PairLogps(policy_chosen, policy_rejected, rc, rr, nc, nr), **kw).sum()

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(pc, pr)
    assert np.isfinite(float(value)), name
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), name


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_stay_finite_at_extreme_inputs(fdiv):
    pc, pr = jnp.array([-1e4, -1.0]), jnp.array([-1.0, -1e4])
    rc = rr = jnp.array([-1.0, -1.0])
    grads = jax.grad(
        lambda a, b: losses.sigmoid_loss(losses.PairLogps(a, b, rc, rr), f_divergence=fdiv).sum(), argnums=(0, 1)
    )(pc, pr)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_cpo_is_finite_when_the_softplus_argument_is_huge():
    """tau * (gamma - delta_ref) = 1e3 and beyond."""
    delta_ref = jnp.array([-500.0 + 0.5, -1e4])
    pc, pr = jnp.array([-1.0, -1.0]), jnp.array([-2.0, -2.0])
    rc, rr = delta_ref - 1.0, jnp.full((2,), -1.0)
    value, grad = jax.value_and_grad(
        lambda a: losses.cpo_loss(losses.PairLogps(a, pr, rc, rr), tau=2.0, gamma=0.5, length_normalize=False).sum()
    )(pc)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(losses.smooth_target(delta_ref, gamma=0.5, tau=2.0)), 0.5, atol=1e-3)


def test_combine_is_the_weighted_sum_and_routes_hyperparameters():
    pc, pr, rc, rr, nc, nr = batch(17)
    mpo = losses.combine([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])
    logps = losses.PairLogps(*(jnp.asarray(x) for x in (pc, pr, rc, rr, nc, nr)))
    got = call_fn = mpo(logps, beta=0.3)
    want = (
        0.8 * ref.dpo_family("sigmoid", pc, pr, rc, rr, nc, nr, beta=0.3)
        + 0.2 * ref.dpo_family("bco_pair", pc, pr, rc, rr, nc, nr, beta=0.3)
        + ref.batch_token_nll(pc, nc)
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)
    assert call_fn.shape == pc.shape
    with pytest.raises(TypeError, match="gamma"):
        mpo(logps, gamma=1.0)


def test_bco_reward_shift_running_mean():
    mean, count = jnp.float32(0.0), jnp.float32(0.0)
    observations = []
    for seed in range(5):
        rewards = jnp.asarray(np.random.default_rng(seed).normal(size=8), jnp.float32)
        observations.append(float(jnp.mean(rewards)))
        mean, count = losses.update_reward_shift(mean, count, rewards)
    np.testing.assert_allclose(float(mean), np.mean(observations), rtol=1e-5)
    pc, pr, rc, rr, nc, nr = batch(18)
    shifted = call("bco_pair", pc, pr, rc, rr, nc, nr, beta=0.3, reward_shift=float(mean))
    want = -ref.logsig(0.3 * (pc - rc) - float(mean)) - ref.logsig(-(0.3 * (pr - rr) - float(mean)))
    np.testing.assert_allclose(shifted, want, rtol=2e-5)


def test_hyperparameters_lists_keyword_defaults():
    assert losses.hyperparameters("cpo") == {
        "beta": 0.1,
        "gamma": 0.5,
        "tau": 2.0,
        "alpha": 1.0,
        "length_normalize": True,
    }
    assert losses.hyperparameters("discopop")["discopop_tau"] == 0.05


def test_losses_are_jittable_and_vmappable():
    pc, pr, rc, rr, nc, nr = (jnp.asarray(x, jnp.float32) for x in batch(19))
    for name in ALL:
        fn = losses.get(name)
        jitted = jax.jit(lambda logps, fn=fn: fn(logps))
        logps = losses.PairLogps(pc, pr, rc, rr, nc, nr)
        np.testing.assert_allclose(
            np.asarray(jitted(logps)),
            np.asarray(fn(logps)),
            rtol=1e-6,
            atol=1e-6,
        )
        stacked = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), logps)
        np.testing.assert_allclose(np.asarray(jax.vmap(fn)(stacked)[0]), np.asarray(fn(logps)), rtol=1e-6, atol=1e-6)
