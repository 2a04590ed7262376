"""The paper's qualitative claims on the exact tabular experiment (a small configuration of Part A)."""

import dataclasses
import math

import numpy as np
import pytest
import scipy.special

from cpo_jax.experiments import tabular
from cpo_jax.losses import smooth_target

SMALL = {"num_prompts": 16, "comparisons_per_pair": 16}


@pytest.fixture(scope="module")
def violated():
    problem = tabular.make_problem(dataclasses.replace(tabular.SETTINGS["violated"], **SMALL))
    runs = {m: tabular.train(problem, m, steps=600) for m in ("dpo", "cpo", "cpo_clip")}
    return problem, runs


def _delta_ref(problem):
    return np.asarray(tabular.pair_deltas(scipy.special.log_softmax(problem.ref_logits, axis=-1), problem))


def test_violated_setting_has_violated_pairs_by_the_closed_form(violated):
    problem, _ = violated
    mask = tabular.violated_pairs(problem)
    gap = (
        problem.rewards[problem.pair_prompt, problem.pair_better]
        - problem.rewards[problem.pair_prompt, problem.pair_worse]
    )
    delta_ref = _delta_ref(problem)
    # delta* < 0  <=>  delta_ref < 0 and beta·|delta_ref| > r_w - r_l
    np.testing.assert_array_equal(mask, (delta_ref < 0) & (problem.beta * np.abs(delta_ref) > gap))
    assert mask.mean() > 0.5


def test_dpo_loss_falls_while_violated_pairs_keep_preferring_the_rejected_answer(violated):
    problem, runs = violated
    mask = tabular.violated_pairs(problem)
    dpo = runs["dpo"]
    assert dpo.loss[0] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo.loss[0] - dpo.loss[-1] > 0.15  # the loss falls by more than 0.15 nats
    final = dpo.delta_theta[-1]
    assert (final[mask] < 0).mean() > 0.5
    assert dpo.summary["frac_in_U_violated"][-1] > 0.5  # ... and sit in U: above delta_ref, below 0
    assert np.all(final[mask] > _delta_ref(problem)[mask])


def test_cpo_ends_with_the_policy_preferring_the_chosen_answer_on_violated_pairs(violated):
    problem, runs = violated
    mask = tabular.violated_pairs(problem)
    clear_majority = problem.pair_wins / problem.comparisons >= 0.75
    for method in ("cpo", "cpo_clip"):
        final = runs[method].delta_theta[-1]
        assert (final[mask] > 0).mean() > 0.85, method
        assert np.all(final[mask & clear_majority] > 0), method
        assert runs[method].summary["true_reward"][-1] > runs["dpo"].summary["true_reward"][-1] + 0.5


def test_dpo_and_cpo_agree_when_the_assumption_holds():
    problem = tabular.make_problem(dataclasses.replace(tabular.SETTINGS["satisfied"], **SMALL))
    holds = ~tabular.violated_pairs(problem)
    dpo, cpo = (tabular.train(problem, m, steps=600).delta_theta[-1] for m in ("dpo", "cpo"))
    assert ((dpo > 0) == (cpo > 0))[holds].mean() > 0.95
    assert (dpo[holds] > 0).mean() > 0.9 and (cpo[holds] > 0).mean() > 0.9


def test_dpo_population_optimum_is_the_rlhf_optimum():
    setting = dataclasses.replace(tabular.SETTINGS["violated"], num_prompts=8, expected_labels=True)
    problem = tabular.make_problem(setting)
    dpo = tabular.train(problem, "dpo", steps=3000, learning_rate=0.05)
    delta_star = np.asarray(tabular.pair_deltas(tabular.rlhf_optimum_logits(problem), problem))
    np.testing.assert_allclose(dpo.delta_theta[-1], delta_star, atol=0.05)
    mask = tabular.violated_pairs(problem)
    assert np.all((delta_star[mask] < 0) & (delta_star[mask] > _delta_ref(problem)[mask]))  # pi* sits in U


@pytest.mark.parametrize("beta", [1.0, 10.0, 100.0])
def test_scaled_dpo_loss_tends_to_the_hinge_on_delta_ref(beta):
    grid = np.linspace(-6, 4, 201)
    scaled = tabular.scaled_loss_curve("sigmoid", grid, -2.0, beta)
    gap = scaled - np.maximum(0.0, -2.0 - grid)
    assert np.all(gap >= -1e-5) and np.all(gap <= math.log(2) / beta + 1e-5)


@pytest.mark.parametrize("beta", [1.0, 10.0, 100.0])
def test_scaled_cpo_loss_tends_to_a_hinge_held_above_gamma(beta):
    grid = np.linspace(-6, 4, 201)
    target = float(smooth_target(np.float32(-2.0), gamma=0.5, tau=2.0))
    assert target >= 0.5
    scaled = tabular.scaled_loss_curve("cpo", grid, -2.0, beta, gamma=0.5, tau=2.0)
    gap = scaled - np.maximum(0.0, target - grid)
    assert np.all(gap >= -1e-5) and np.all(gap <= math.log(2) / beta + 1e-5)
