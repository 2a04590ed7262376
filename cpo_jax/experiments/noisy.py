"""Part D of the paper's experiment at LM scale: Bradley–Terry-noised labels on mined pairs, the theory's
prediction for each loss, and the statistics across seeds.

The pairs are mined where the reference prefers the wrong answer (``delta_ref < 0``, :mod:`.mining`). A known
reward margin ``reward_margin = r(correct) - r(wrong) > 0`` makes the human label Bradley–Terry: the correct answer
is chosen with probability ``p = sigmoid(reward_margin)``. Each pair is written ``copies`` times, and the number
of copies in the true order is ``copies * p`` rounded at random without bias, so both orders of every pair appear in
proportion to the true preference. That is the regime where DPO's loss has a finite minimiser.

At that minimiser ``sigmoid(beta * (delta_theta - delta_ref)) = p``: DPO's margin is
``delta_ref + reward_margin / beta`` (the RLHF optimum's), which lies in ``U = {delta_ref < delta_theta < 0}``
exactly when ``reward_margin / beta < -delta_ref``. CPO replaces the target ``delta_ref`` by ``t >= gamma > 0``, so
its minimiser ``t + reward_margin / beta`` is positive. :func:`predicted_margin` gives these minimisers for DPO,
CPO, CPO-clip and IPO, per pair, in the units the loss uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: The methods of Part D and the registered loss each uses, per units (``None``: not defined in those units).
METHODS: dict[str, dict[str, str | None]] = {
    "dpo": {"summed": "sigmoid", "normalised": "sigmoid_norm"},
    "cpo": {"summed": "cpo", "normalised": "cpo"},
    "cpo_clip": {"summed": "cpo_clip", "normalised": "cpo_clip"},
    "ipo": {"summed": None, "normalised": "ipo"},  # TRL's IPO is per token by definition
    "simpo": {"summed": None, "normalised": "simpo"},  # SimPO is per token and reference-free by definition
}
UNITS = ("summed", "normalised")
CPO_GAMMA, CPO_TAU = 0.5, 2.0
SIMPO_GAMMA_OVER_BETA = 0.5  # SimPO's margin term gamma as a share of beta (the paper's gamma/beta ~ 0.5)


def loss_of(method: str, beta: float, units: str) -> tuple[str, dict]:
    """``(loss name, hparams)`` of ``method`` at ``beta`` in ``units``; ``ValueError`` where it is not defined."""
    if method not in METHODS:
        raise ValueError(f"unknown Part D method {method!r}; choose from {sorted(METHODS)}")
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    name = METHODS[method][units]
    if name is None:
        raise ValueError(f"{method} is defined on per-token (normalised) log-probs only, not {units}")
    hparams: dict = {"beta": float(beta)}
    if method in ("cpo", "cpo_clip"):
        hparams["length_normalize"] = units == "normalised"
    if method == "cpo":
        hparams.update(gamma=CPO_GAMMA, tau=CPO_TAU)
    if method == "simpo":
        hparams["gamma"] = SIMPO_GAMMA_OVER_BETA * float(beta)
    return name, hparams


def true_preference(reward_margin: float) -> float:
    """``P(correct answer chosen) = sigmoid(reward_margin)`` under Bradley–Terry."""
    return 1.0 / (1.0 + math.exp(-reward_margin))


def bt_labelled(pairs: Sequence[dict], *, reward_margin: float, copies: int, seed: int) -> list[dict]:
    """``copies`` labelled copies of each pair (correct answer as ``chosen``), in both orders in proportion.

    Per pair, ``k`` copies keep the true order and ``copies - k`` swap ``chosen`` and ``rejected``, where
    ``k = floor(copies * p + u)``, ``u ~ U[0, 1)`` (unbiased rounding: ``E[k] = copies * p``). Every copy gets
    ``true_order`` (bool) and ``reward_margin``. Output order: pair by pair (the training pipeline shuffles).
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if not reward_margin > 0:
        raise ValueError(f"reward_margin must be > 0 (the correct answer is the better one), got {reward_margin}")
    p = true_preference(reward_margin)
    rng = np.random.default_rng(seed)
    out = []
    for pair in pairs:
        kept = int(math.floor(copies * p + rng.random()))
        for i in range(copies):
            record = dict(pair, true_order=i < kept, reward_margin=float(reward_margin))
            if i >= kept:
                record["chosen"], record["rejected"] = pair["rejected"], pair["chosen"]
                if "delta_ref" in pair:
                    record["delta_ref"] = -pair["delta_ref"]
                if "delta_ref_norm" in pair:
                    record["delta_ref_norm"] = -pair["delta_ref_norm"]
            out.append(record)
    return out


def target_margin(method: str, delta_ref: np.ndarray) -> np.ndarray:
    """The margin each loss pulls ``delta_theta`` towards: ``delta_ref`` (DPO), CPO's smooth target, or
    ``max(delta_ref, 0)`` (CPO-clip), in float64."""
    d = np.asarray(delta_ref, np.float64)
    if method == "dpo":
        return d
    if method == "cpo":
        return d + np.logaddexp(0.0, CPO_TAU * (CPO_GAMMA - d)) / CPO_TAU
    if method == "cpo_clip":
        return np.maximum(d, 0.0)
    raise ValueError(f"{method!r} has no target margin")


def predicted_margin(method: str, delta_ref: np.ndarray, *, reward_margin: float, beta: float) -> np.ndarray | None:
    """The per-pair ``delta_theta`` that minimises ``method``'s loss in expectation over BT labels, both orders.

    ``delta_ref`` ``[N]`` in the loss's units, true order. A copy in the true order (probability ``p``) pulls
    ``delta_theta`` up towards ``t(delta_ref)``; a swapped copy sees the reference margin ``-delta_ref`` and pulls
    ``-delta_theta`` towards ``t(-delta_ref)``. The minimiser solves
    ``p * sigmoid(beta * (t(d) - h)) = (1 - p) * sigmoid(beta * (h + t(-d)))`` (decreasing minus increasing in
    ``h``: one root, found by bisection in float64). For DPO that is ``d + reward_margin / beta``, the RLHF
    optimum's margin; for IPO, ``d + (2p - 1) / (2 beta)``. ``None`` for SimPO (reference-free: its minimiser
    does not depend on ``delta_ref``).
    """
    d = np.asarray(delta_ref, np.float64)
    p = true_preference(reward_margin)
    if method == "ipo":
        return d + (2.0 * p - 1.0) / (2.0 * beta)
    if method == "simpo":
        return None
    if method not in METHODS:
        raise ValueError(f"unknown Part D method {method!r}")
    t_true, t_swapped = target_margin(method, d), target_margin(method, -d)

    def excess(h):  # p * sigmoid(beta (t_true - h)) - (1 - p) * sigmoid(beta (h + t_swapped)), decreasing in h
        return p / (1.0 + np.exp(-beta * (t_true - h))) - (1.0 - p) / (1.0 + np.exp(-beta * (h + t_swapped)))

    span = np.abs(t_true) + np.abs(t_swapped) + 50.0 / beta
    low, high = -span, span
    for _ in range(200):
        mid = 0.5 * (low + high)
        up = excess(mid) > 0
        low, high = np.where(up, mid, low), np.where(up, high, mid)
    return 0.5 * (low + high)


def in_u(delta_theta: np.ndarray, delta_ref: np.ndarray) -> np.ndarray:
    """``[N]`` bool: ``delta_ref < delta_theta < 0``, the paper's region U."""
    delta_theta, delta_ref = np.asarray(delta_theta), np.asarray(delta_ref)
    return (delta_ref < delta_theta) & (delta_theta < 0)


def pair_metrics(policy: np.ndarray, reference: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """Part D's held-out pair metrics, in float64, from ``[N, 2]`` summed (correct, wrong) log-probs and lengths.

    ``frac_in_U``/``abs_accuracy``/``win_rate`` in summed units and with ``_norm`` per token; ``win_rate`` is
    ``mean sigmoid(delta_theta)``: the chance that the policy, choosing between the two answers in proportion to
    its probabilities, picks the truly better one. ``chosen_logp_change``: mean change of the correct answer's
    summed log-prob from the reference.
    """
    p, r, n = (np.asarray(x, np.float64) for x in (policy, reference, lengths))
    keep = np.isfinite(p).all(-1) & np.isfinite(r).all(-1) & (n > 0).all(-1)
    p, r, n = p[keep], r[keep], n[keep]
    out = {"pairs": float(len(p))}
    for suffix, (dp, dr) in {
        "": (p[:, 0] - p[:, 1], r[:, 0] - r[:, 1]),
        "_norm": (p[:, 0] / n[:, 0] - p[:, 1] / n[:, 1], r[:, 0] / n[:, 0] - r[:, 1] / n[:, 1]),
    }.items():
        out[f"frac_in_U{suffix}"] = float(in_u(dp, dr).mean())
        out[f"abs_accuracy{suffix}"] = float((dp > 0).mean())
        out[f"win_rate{suffix}"] = float((1.0 / (1.0 + np.exp(-dp))).mean())
        out[f"delta_theta_mean{suffix}"] = float(dp.mean())
    out["chosen_logp_change"] = float((p[:, 0] - r[:, 0]).mean())
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean and the two-sided Student-t interval across seeds (``half``: its half-width; NaN for one value)."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "half": math.nan, "n": float(len(x))}
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "half": half, "n": float(len(x))}


def mean_ci_text(values: Sequence[float], spec: str = ".3f") -> str:
    """``"mean ± half"`` of :func:`mean_ci` in the format ``spec`` (a sign flag applies to the mean only); the mean
    alone for one value."""
    ci = mean_ci(values)
    half = "" if math.isnan(ci["half"]) else f" ± {ci['half']:{spec.lstrip('+')}}"
    return f"{ci['mean']:{spec}}{half}"


def paired_seed_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired two-sided t-test of ``a - b`` across seeds (the same seed: the same labels and data order).

    ``diff`` holds the mean difference with its 95% interval; ``p`` is NaN with fewer than two seeds, and 1.0
    (or 0.0) when every difference is equal (zero spread).
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds: {a.shape} vs {b.shape}")
    d = a - b
    out = {"diff": mean_ci(d), "n": float(len(d))}
    if len(d) < 2:
        out["p"] = math.nan
    elif np.allclose(d, d[0]):
        out["p"] = 1.0 if d[0] == 0 else 0.0
    else:
        out["p"] = float(stats.ttest_rel(a, b).pvalue)
    return out


#: The smallest difference in frac_in_U (DPO minus CPO) that counts as an effect: "not supported" means the
#: 95% interval excludes a difference this large.
MEANINGFUL_DIFFERENCE = 0.05


def verdict(dpo_in_u: Sequence[float], cpo_in_u: Sequence[float], predicted_dpo_in_u: float) -> str:
    """The claim "DPO lands in U where CPO does not", in one cell, in plain words (IPO, whose target is also
    anchored at ``delta_ref``, can stand in for DPO).

    ``control`` where the theory predicts DPO in U for under 10% of the pairs (no separation expected). Otherwise,
    from the paired 95% interval of DPO's minus CPO's frac_in_U across seeds: ``supported`` when it lies above
    zero, ``not supported`` when it lies below :data:`MEANINGFUL_DIFFERENCE`, ``inconclusive`` otherwise (and
    with fewer than two seeds).
    """
    if predicted_dpo_in_u < 0.1:
        return "control"
    if len(dpo_in_u) < 2:
        return "inconclusive"
    diff = paired_seed_test(dpo_in_u, cpo_in_u)["diff"]
    if diff["low"] > 0:
        return "supported"
    if diff["high"] < MEANINGFUL_DIFFERENCE:
        return "not supported"
    return "inconclusive"
