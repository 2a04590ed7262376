"""Part D (issue 20): Bradley–Terry-noised labels, the theory's minimisers, the statistics across seeds, and the
qualitative outcome on a small configuration: with noisy labels and a reference that prefers the wrong answer,
DPO settles inside U and CPO does not.

References: closed forms, scipy's numerical minimiser of the expected loss (float64), and scipy's t quantiles.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from scipy import optimize, stats

from cpo_jax.experiments import noisy


def _pairs(n):
    return [
        {"prompt": f"q{i}", "chosen": f"right{i}", "rejected": f"wrong{i}", "delta_ref": -1.0 - i,
         "delta_ref_norm": -0.1 * (i + 1)}
        for i in range(n)
    ]  # fmt: skip


def test_bt_labels_hold_both_orders_in_proportion_per_pair():
    margin, copies = 1.0, 8
    p = 1 / (1 + math.exp(-margin))
    records = noisy.bt_labelled(_pairs(400), reward_margin=margin, copies=copies, seed=3)
    assert len(records) == 400 * copies
    kept = np.array([sum(r["true_order"] for r in records[i * copies : (i + 1) * copies]) for i in range(400)])
    assert set(kept) <= {math.floor(copies * p), math.ceil(copies * p)}  # each pair: floor or ceil of copies * p
    assert abs(kept.mean() / copies - p) < 0.01  # unbiased rounding
    for r, pair in zip(records[:copies], [_pairs(1)[0]] * copies):
        if r["true_order"]:
            assert (r["chosen"], r["rejected"], r["delta_ref"]) == (pair["chosen"], pair["rejected"], -1.0)
        else:
            assert (r["chosen"], r["rejected"], r["delta_ref"]) == (pair["rejected"], pair["chosen"], 1.0)
            assert r["delta_ref_norm"] == pytest.approx(0.1)
        assert r["reward_margin"] == margin
    again = noisy.bt_labelled(_pairs(400), reward_margin=margin, copies=copies, seed=3)
    assert again == records  # a seed fixes the labels
    with pytest.raises(ValueError, match="reward_margin must be > 0"):
        noisy.bt_labelled(_pairs(2), reward_margin=0.0, copies=2, seed=0)
    with pytest.raises(ValueError, match="copies must be >= 1"):
        noisy.bt_labelled(_pairs(2), reward_margin=1.0, copies=0, seed=0)


def _expected_loss(method, h, d, p, beta):
    """Expected loss over BT labels of a pair with margin h = delta_theta and reference margin d (true order)."""
    sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731  log sigmoid
    if method == "dpo":
        return -p * sig(beta * (h - d)) - (1 - p) * sig(beta * (d - h))
    if method in ("cpo", "cpo_clip"):  # a flipped pair's target is computed from its own (negated) reference margin

        def target(x):
            if method == "cpo_clip":
                return max(x, 0.0)
            return x + np.logaddexp(0.0, noisy.CPO_TAU * (noisy.CPO_GAMMA - x)) / noisy.CPO_TAU

        return -p * sig(beta * (h - target(d))) - (1 - p) * sig(beta * (-h - target(-d)))
    if method == "ipo":
        c = 1 / (2 * beta)
        return p * ((h - d) - c) ** 2 + (1 - p) * ((d - h) - c) ** 2
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["dpo", "cpo", "cpo_clip", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_predicted_minimiser_matches_a_numerical_minimum(method, beta):
    """The minimiser of the expected loss over both label orders, against scipy's bounded search in float64."""
    margin, p = 1.0, 1 / (1 + math.exp(-1.0))
    d = np.array([-4.0, -1.5, -0.3])
    predicted = noisy.predicted_margin(method, d, reward_margin=margin, beta=beta)
    for di, hi in zip(d, predicted):
        found = optimize.minimize_scalar(lambda h: _expected_loss(method, h, di, p, beta), bounds=(-80, 80),
                                         method="bounded", options={"xatol": 1e-10}).x  # fmt: skip
        assert found == pytest.approx(hi, abs=1e-4)


def test_closed_forms_and_where_the_theory_puts_each_method():
    d = np.array([-4.0, -1.5, -0.3])
    dpo = noisy.predicted_margin("dpo", d, reward_margin=1.0, beta=1.0)
    np.testing.assert_allclose(dpo, d + 1.0, atol=1e-9)  # the RLHF optimum: delta_ref + m / beta
    assert noisy.in_u(dpo, d).tolist() == [True, True, False]  # in U exactly when m / beta < -delta_ref
    for method in ("cpo", "cpo_clip"):  # CPO's minimiser is positive on every violated pair: the method's point
        assert (noisy.predicted_margin(method, d, reward_margin=1.0, beta=1.0) > 0).all()
    small_beta = noisy.predicted_margin("dpo", d, reward_margin=1.0, beta=0.1)
    assert not noisy.in_u(small_beta, d).any()  # at beta 0.1 the shift m / beta = 10 leaves U
    assert noisy.predicted_margin("simpo", d, reward_margin=1.0, beta=1.0) is None


def test_loss_of_maps_methods_and_refuses_undefined_cells():
    assert noisy.loss_of("dpo", 1.0, "summed") == ("sigmoid", {"beta": 1.0})
    assert noisy.loss_of("dpo", 0.1, "normalised") == ("sigmoid_norm", {"beta": 0.1})
    assert noisy.loss_of("cpo", 1.0, "summed") == (
        "cpo", {"beta": 1.0, "length_normalize": False, "gamma": 0.5, "tau": 2.0})  # fmt: skip
    assert noisy.loss_of("cpo_clip", 1.0, "normalised") == ("cpo_clip", {"beta": 1.0, "length_normalize": True})
    assert noisy.loss_of("simpo", 2.0, "normalised") == ("simpo", {"beta": 2.0, "gamma": 1.0})
    with pytest.raises(ValueError, match="ipo is defined on per-token"):
        noisy.loss_of("ipo", 1.0, "summed")
    with pytest.raises(ValueError, match="unknown Part D method 'kto'"):
        noisy.loss_of("kto", 1.0, "summed")
    with pytest.raises(ValueError, match="units must be one of"):
        noisy.loss_of("dpo", 1.0, "tokens")
    with pytest.raises(ValueError, match="beta must be > 0"):
        noisy.loss_of("dpo", 0.0, "summed")


def test_pair_metrics_by_hand():
    reference = np.array([[-10.0, -8.0], [-6.0, -5.0], [-4.0, -9.0], [np.nan, np.nan]])
    policy = np.array([[-9.0, -8.5], [-7.0, -6.5], [-3.0, -9.0], [-1.0, -2.0]])
    lengths = np.array([[4, 2], [2, 2], [3, 3], [1, 1]], float)
    m = noisy.pair_metrics(policy, reference, lengths)
    # summed: delta_ref -2, -1, 5; delta_theta -0.5, -0.5, 6 -> pairs 0 and 1 in U
    assert m["pairs"] == 3
    assert m["frac_in_U"] == pytest.approx(2 / 3) and m["abs_accuracy"] == pytest.approx(1 / 3)
    assert m["win_rate"] == pytest.approx(np.mean(1 / (1 + np.exp(-np.array([-0.5, -0.5, 6.0])))))
    # per token: delta_ref -2.5+4, -0.5, 5/3; delta_theta -2.25+4.25, -0.25, 2 -> only pair 1 in U
    assert m["frac_in_U_norm"] == pytest.approx(1 / 3) and m["abs_accuracy_norm"] == pytest.approx(2 / 3)
    assert m["chosen_logp_change"] == pytest.approx(np.mean([1.0, -1.0, 1.0]))


def test_intervals_and_the_paired_test_against_closed_forms():
    ci = noisy.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["half"] == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert math.isnan(noisy.mean_ci([1.0])["half"])
    test = noisy.paired_seed_test([0.5, 0.6, 0.4], [0.1, 0.1, 0.2])
    assert test["diff"]["mean"] == pytest.approx(0.3666666666666667)
    assert test["p"] == pytest.approx(stats.ttest_1samp([0.4, 0.5, 0.2], 0.0).pvalue)
    assert noisy.paired_seed_test([0.3, 0.3], [0.1, 0.1])["p"] == 0.0
    with pytest.raises(ValueError, match="the same seeds"):
        noisy.paired_seed_test([0.1, 0.2], [0.1])


def test_verdict_words():
    assert noisy.verdict([0.5, 0.6, 0.55], [0.0, 0.05, 0.0], predicted_dpo_in_u=0.6) == "supported"
    assert noisy.verdict([0.01, 0.0, 0.02], [0.0, 0.01, 0.0], predicted_dpo_in_u=0.6) == "not supported"
    assert noisy.verdict([0.3, 0.0, 0.1], [0.0, 0.2, 0.0], predicted_dpo_in_u=0.6) == "inconclusive"
    assert noisy.verdict([0.3], [0.0], predicted_dpo_in_u=0.6) == "inconclusive"
    assert noisy.verdict([0.5, 0.6, 0.55], [0.0, 0.0, 0.0], predicted_dpo_in_u=0.0) == "control"


# ------------------------------------------------------------------ the qualitative outcome, small configuration


def _train(out, model_path, records, *, loss: dict, steps: int, learning_rate: float, schedule: str, batch: int):
    """A one-device Trainer run of ``records`` on the tiny model at ``model_path``; returns the trainer."""
    from cpo_jax.data import write_jsonl
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.trainer import Trainer

    out.mkdir(parents=True, exist_ok=True)
    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(out),
            "model": {"path": str(model_path)},
            "data": {"train_files": [str(write_jsonl(records, out / "train.jsonl"))], "max_length": 96,
                     "pairs_per_batch": batch},
            "loss": loss,
            "optim": {"learning_rate": learning_rate, "warmup_steps": 0, "schedule": schedule},
            "steps": steps, "save_every": 1000, "progress_bar": False, "tensorboard": False, "export_hf": False,
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        },
    )  # fmt: skip
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def wrong_reference(tmp_path_factory):
    """A tiny Llama taught the wrong answers (SFT), so that it prefers them: every pair is a violated pair."""
    from cpo_jax.data import arithmetic_preferences
    from tests.train_fixtures import tiny_policy

    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("partd")
    pairs = arithmetic_preferences(8, seed=0, max_operand=20)
    wrong = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in pairs]  # SFT reads the chosen
    sft = _train(root / "sft", tiny_policy(root / "init"), wrong, loss={"objective": "sft", "name": "sft"},
                 steps=25, learning_rate=1e-2, schedule="constant", batch=8)  # fmt: skip
    sft.export(root / "reference")
    return root, pairs


def _margins(model_path, model, pairs):
    from transformers import AutoTokenizer

    from cpo_jax.data import BatchConfig, TokenizeConfig
    from cpo_jax.train.reference_cache import compute_reference_logps

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    logps = compute_reference_logps(
        model, pairs, [f"pair:{i}" for i in range(len(pairs))], tokenizer, TokenizeConfig(max_length=96),
        BatchConfig(pairs_per_batch=8, max_length=96, pad_id=0),
    )  # fmt: skip
    return logps[:, 0].astype(np.float64) - logps[:, 1]


def _train_on_noisy_labels(root, pairs, method):
    name, hparams = noisy.loss_of(method, 1.0, "summed")
    labelled = noisy.bt_labelled(pairs, reward_margin=1.0, copies=8, seed=0)
    loss = {"name": name, "hparams": hparams, "reference": "precomputed"}
    trainer = _train(root / method, root / "reference", labelled, loss=loss, steps=80, learning_rate=3e-3,
                     schedule="cosine", batch=16)  # fmt: skip
    return trainer.policy()


def test_noisy_labels_leave_dpo_inside_u_and_cpo_outside(wrong_reference):
    """Part D's claim where training converges: on violated pairs with BT-noised labels (margin 1, beta 1, summed),
    DPO settles near the RLHF optimum delta_ref + 1, inside U, while CPO's pairs end with the right answer ahead."""
    from cpo_jax.hf.pretrained import from_pretrained

    root, pairs = wrong_reference
    reference = root / "reference"
    d_ref = _margins(reference, from_pretrained(reference), pairs)
    assert (d_ref < 0).all(), d_ref  # the SFT taught the wrong answers: every pair is violated
    predicted = noisy.in_u(noisy.predicted_margin("dpo", d_ref, reward_margin=1.0, beta=1.0), d_ref)
    assert predicted.sum() >= 4, d_ref  # where m / beta < -delta_ref the theory puts DPO's minimiser in U
    d_dpo = _margins(reference, _train_on_noisy_labels(root, pairs, "dpo"), pairs)
    d_cpo = _margins(reference, _train_on_noisy_labels(root, pairs, "cpo"), pairs)
    print("delta_ref", d_ref.round(2), "dpo", d_dpo.round(2), "cpo", d_cpo.round(2))
    assert noisy.in_u(d_dpo, d_ref)[predicted].mean() >= 0.75
    assert abs(np.mean(d_dpo - d_ref) - 1.0) < 0.4  # DPO's shift is m / beta = 1 (the RLHF optimum), not more
    assert noisy.in_u(d_cpo, d_ref).mean() <= 0.25 and (d_cpo > 0).mean() >= 0.75
