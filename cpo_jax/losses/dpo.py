"""The DPO family, under TRL 1.x ``DPOTrainer`` ``loss_type`` names and formulas (TRL 1.13).

Every loss takes a :class:`~cpo_jax.losses.pair.PairLogps` of ``[B]`` **summed** completion
log-probs. Notation used in the docstrings:

* ``u_w = log pi(y_w) - log pi_ref(y_w)``, ``u_l`` likewise (the log-ratios, "implicit rewards"/beta);
* ``s = g(u)`` with the f-divergence transform ``g`` (identity for reverse KL, see
  :func:`f_divergence_transform`), ``Delta = s_w - s_l``;
* ``Delta_bar = s_w / n_w - s_l / n_l``: the same per completion token (lengths ``n``, at least 1);
* ``sigma`` the logistic function, ``eps`` = ``label_smoothing``.

Only the losses that TRL lets combine with an f-divergence take ``f_divergence``: sigmoid,
sigmoid_norm, hinge, ipo, exo_pair, robust and discopop. The others use the raw log-ratios.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from cpo_jax.losses._common import Array, at_least_f32, smoothed_sigmoid_loss
from cpo_jax.losses.pair import PairLogps, masked_sum, sort_real, to_real_slots
from cpo_jax.losses.registry import register

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
ALPHA_DIVERGENCE_MAX_EXPONENT = 80.0  # TRL's exponent cap for float32/bf16 (11 for fp16)


def f_divergence_transform(log_ratio: Array, f_divergence: FDivergence = "reverse_kl", alpha: float = 0.5) -> Array:
    """The score ``g(u)`` that replaces the log-ratio ``u`` under an f-divergence (Wang et al. 2023,
    "Beyond Reverse KL", arXiv 2309.16240, Table 1; constants as in TRL 1.13).

    * ``reverse_kl``: ``g(u) = u`` (standard DPO);
    * ``forward_kl``: ``g(u) = 1 - exp(min(-u, 80))`` (the cap, like TRL's for alpha, keeps it finite);
    * ``js_divergence``: ``g(u) = log 2 + log sigmoid(u)``;
    * ``alpha_divergence``: ``g(u) = (exp(min((alpha - 1) u, 80)) - 1) / (alpha - 1)``; ``u`` if alpha ~ 1.
    """
    if f_divergence == "reverse_kl":
        return log_ratio
    if f_divergence == "forward_kl":
        return -jnp.expm1(jnp.minimum(-log_ratio, ALPHA_DIVERGENCE_MAX_EXPONENT))
    if f_divergence == "js_divergence":
        return jnp.log(2.0) + jax.nn.log_sigmoid(log_ratio)
    if f_divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return log_ratio
        exponent = jnp.minimum((alpha - 1.0) * log_ratio, ALPHA_DIVERGENCE_MAX_EXPONENT)
        return jnp.expm1(exponent) / (alpha - 1.0)
    raise ValueError(
        f"unknown f_divergence {f_divergence!r}; expected 'reverse_kl', 'forward_kl', 'js_divergence' "
        "or 'alpha_divergence'"
    )


def log_ratios(logps: PairLogps, *, loss: str) -> tuple[Array, Array]:
    """``(u_w, u_l)`` ``[B]``: policy minus reference summed log-probs; the reference is required."""
    reference_chosen, reference_rejected = logps.reference(loss)
    policy_chosen, policy_rejected = logps.policy()
    return policy_chosen - reference_chosen, policy_rejected - reference_rejected


def _scores(logps: PairLogps, *, f_divergence, alpha, loss) -> tuple[Array, Array]:
    """``(s_w, s_l)`` = ``g(u_w), g(u_l)``."""
    chosen, rejected = log_ratios(logps, loss=loss)
    return f_divergence_transform(chosen, f_divergence, alpha), f_divergence_transform(rejected, f_divergence, alpha)


def _margin(logps: PairLogps, *, f_divergence, alpha, loss) -> Array:
    """``Delta = g(u_w) - g(u_l)``."""
    chosen, rejected = _scores(logps, f_divergence=f_divergence, alpha=alpha, loss=loss)
    return chosen - rejected


def _normalized_margin(logps: PairLogps, *, f_divergence, alpha, loss) -> Array:
    """``Delta_bar = g(u_w) / n_w - g(u_l) / n_l``."""
    chosen, rejected = logps.per_token(*_scores(logps, f_divergence=f_divergence, alpha=alpha, loss=loss), loss)
    return chosen - rejected


@register("sigmoid")
def sigmoid_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    """DPO (Rafailov et al. 2023, eq. 7; TRL ``sigmoid``): ``-log sigma(beta * Delta)``.

    With ``label_smoothing = eps > 0`` it is conservative DPO (cDPO, Mitchell 2023; TRL 0.x):
    ``-(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)``. TRL 1.x has eps = 0.
    """
    margin = _margin(
        logps, f_divergence=f_divergence, alpha=f_alpha_divergence_coef, loss="sigmoid",
    )  # fmt: skip
    return smoothed_sigmoid_loss(beta * margin, label_smoothing)


@register("sigmoid_norm")
def sigmoid_norm_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    """Length-normalised DPO (TRL 1.13 ``sigmoid_norm``): ``-log sigma(beta * Delta_bar)``.

    Keeps the reference (unlike SimPO); needs the lengths.
    """
    margin = _normalized_margin(
        logps, f_divergence=f_divergence, alpha=f_alpha_divergence_coef, loss="sigmoid_norm",
    )  # fmt: skip
    return -jax.nn.log_sigmoid(beta * margin)


@register("hinge")
def hinge_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    """SLiC hinge (Zhao et al. 2023, arXiv 2305.10425, eq. 3; TRL ``hinge``): ``relu(1 - beta * Delta)``."""
    margin = _margin(
        logps, f_divergence=f_divergence, alpha=f_alpha_divergence_coef, loss="hinge",
    )  # fmt: skip
    return jax.nn.relu(1.0 - beta * margin)


@register("ipo")
def ipo_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17; TRL ``ipo``): ``(Delta_bar - 1 / (2 beta))^2``.

    As in TRL, the log-ratios are per completion token, so the lengths are required.
    """
    margin = _normalized_margin(
        logps, f_divergence=f_divergence, alpha=f_alpha_divergence_coef, loss="ipo",
    )  # fmt: skip
    return jnp.square(margin - 1.0 / (2.0 * beta))


@register("exo_pair")
def exo_pair_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856, eq. 12; TRL ``exo_pair``).

    ``sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps)`` with
    ``z = beta * Delta``: the reverse KL from the policy's to the smoothed label distribution.
    ``eps = label_smoothing`` must be in (0, 1); the paper suggests 1e-3.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (suggested 1e-3); got {label_smoothing}")
    z = beta * _margin(
        logps, f_divergence=f_divergence, alpha=f_alpha_divergence_coef, loss="exo_pair",
    )  # fmt: skip
    log_p, log_q = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    return jnp.exp(log_p) * (log_p - jnp.log1p(-label_smoothing)) + jnp.exp(log_q) * (log_q - jnp.log(label_smoothing))


@register("robust")
def robust_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, eq. 8; TRL ``robust``).

    ``(-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)) / (1 - 2 eps)``: unbiased
    under label flips with rate ``eps = label_smoothing`` in [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5; got {label_smoothing}")
    z = beta * _margin(
        logps, f_divergence=f_divergence, alpha=f_alpha_divergence_coef, loss="robust",
    )  # fmt: skip
    numerator = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)
    return numerator / (1.0 - 2.0 * label_smoothing)


@register("discopop")
def discopop_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    """DiscoPOP log-ratio modulated loss (Chan Lu et al. 2024, arXiv 2406.08414, eq. 5; TRL ``discopop``).

    With ``z = beta * Delta`` and ``m = sigma(z / tau)``: ``(1 - m) * (-log sigma(z)) + m * exp(-z)``.
    The exponential branch is evaluated as ``exp(min(-z, 80))``: where ``-z > 80`` its weight ``m``
    is below ``sigma(-80 / tau)`` ~ 0, so the cap changes nothing but keeps gradients finite.
    """
    z = beta * _margin(
        logps, f_divergence=f_divergence, alpha=f_alpha_divergence_coef, loss="discopop",
    )  # fmt: skip
    modulation = jax.nn.sigmoid(z / discopop_tau)
    return (1.0 - modulation) * -jax.nn.log_sigmoid(z) + modulation * jnp.exp(jnp.minimum(-z, 80.0))


@register("nca_pair")
def nca_pair_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
) -> Array:
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369, eq. 12; TRL ``nca_pair``).

    ``-log sigma(beta u_w) - 1/2 log sigma(-beta u_w) - 1/2 log sigma(-beta u_l)``.
    """
    chosen, rejected = log_ratios(logps, loss="nca_pair")
    chosen, rejected = beta * chosen, beta * rejected
    return -jax.nn.log_sigmoid(chosen) - 0.5 * jax.nn.log_sigmoid(-chosen) - 0.5 * jax.nn.log_sigmoid(-rejected)


@register("bco_pair")
def bco_pair_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    reward_shift: Array | float = 0.0,
) -> Array:
    """BCO, pairwise (Jung et al. 2024, arXiv 2404.04656, eq. 7; TRL ``bco_pair``).

    ``-log sigma(beta u_w - delta) - log sigma(-(beta u_l - delta))``. TRL 1.x uses ``delta = 0``;
    TRL 0.x used a running mean of the rewards: keep it with :func:`update_reward_shift` and pass
    it as ``reward_shift``.
    """
    chosen, rejected = log_ratios(logps, loss="bco_pair")
    shift = jax.lax.stop_gradient(at_least_f32(reward_shift))
    return -jax.nn.log_sigmoid(beta * chosen - shift) - jax.nn.log_sigmoid(-(beta * rejected - shift))


def update_reward_shift(
    mean: Array, count: Array, batch_rewards: Array, mask: Array | None = None
) -> tuple[Array, Array]:
    """Running mean of BCO's reward shift: folds the mean of ``batch_rewards`` (both ``beta * u_w``
    and ``beta * u_l``) into ``(mean, count)`` as one observation, as TRL 0.x's RunningMoments did.
    ``mask`` (shaped like ``batch_rewards``, True for real pairs) keeps empty slots out of the mean.
    Returns the new ``(mean, count)``; start from ``(0.0, 0.0)``.
    """
    rewards = at_least_f32(batch_rewards)
    real = jnp.ones(rewards.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask) > 0, rewards.shape)
    observation = jax.lax.stop_gradient(masked_sum(rewards, real) / jnp.maximum(jnp.sum(real), 1))
    count = count + 1.0
    return mean + (observation - mean) / count, count


@register("sppo_hard")
def sppo_hard_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
) -> Array:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, eq. 4.4; TRL ``sppo_hard``).

    ``(u_w - 1 / (2 beta))^2 + (u_l + 1 / (2 beta))^2``: the winner's log-ratio is pushed to
    ``1/(2 beta)`` and the loser's to ``-1/(2 beta)``.
    """
    chosen, rejected = log_ratios(logps, loss="sppo_hard")
    return jnp.square(chosen - 0.5 / beta) + jnp.square(rejected + 0.5 / beta)


def _aot(chosen: Array, rejected: Array, real: Array, *, beta: float, label_smoothing: float) -> Array:
    """``-(1-eps) log sigma(beta d) - eps log sigma(-beta d)`` with ``d = sort(chosen) - sort(rejected)`` over
    the real pairs only; the j-th quantile's loss goes to the j-th real slot, 0 to the empty slots."""
    delta = to_real_slots(sort_real(chosen, real) - sort_real(rejected, real), real)
    return smoothed_sigmoid_loss(beta * delta, label_smoothing)


@register("aot", couples_batch=True)
def aot_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Array:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882, eq. 9; TRL ``aot``).

    ``d = sort_batch(log pi(y_w) - log pi(y_l)) - sort_batch(log pi_ref(y_w) - log pi_ref(y_l))``
    (ascending over the real pairs), loss ``-(1-eps) log sigma(beta d) - eps log sigma(-beta d)``. The
    j-th real slot holds the j-th quantile pair, not its own pair. Couples the batch: the sorts use only the
    pairs with ``logps.mask`` set, and empty slots get 0.
    """
    reference_chosen, reference_rejected = logps.reference("aot")
    policy_chosen, policy_rejected = logps.policy()
    return _aot(
        policy_chosen - policy_rejected,
        reference_chosen - reference_rejected,
        logps.real(),
        beta=beta,
        label_smoothing=label_smoothing,
    )


@register("aot_unpaired", couples_batch=True)
def aot_unpaired_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Array:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882, eq. 8; TRL ``aot_unpaired``).

    ``d = sort_batch(u_w) - sort_batch(u_l)``, loss ``-(1-eps) log sigma(beta d) - eps log sigma(-beta d)``.
    Couples the batch like ``aot``: the sorts use only the real pairs (``logps.mask``), empty slots get 0.
    """
    chosen, rejected = log_ratios(logps, loss="aot_unpaired")
    return _aot(chosen, rejected, logps.real(), beta=beta, label_smoothing=label_smoothing)


@register("apo_zero")
def apo_zero_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
) -> Array:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7; TRL ``apo_zero``).

    ``(1 - sigma(beta u_w)) + sigma(beta u_l)``: raises the winner's and lowers the loser's
    likelihood; for when the winners are better than the model's own outputs.
    """
    chosen, rejected = log_ratios(logps, loss="apo_zero")
    return (1.0 - jax.nn.sigmoid(beta * chosen)) + jax.nn.sigmoid(beta * rejected)


@register("apo_down")
def apo_down_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
) -> Array:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8; TRL ``apo_down``).

    ``sigma(beta u_w) + (1 - sigma(beta (u_w - u_l)))``: lowers both likelihoods while keeping the
    winner above the loser; for when the model's outputs are better than the winners.
    """
    chosen, rejected = log_ratios(logps, loss="apo_down")
    return jax.nn.sigmoid(beta * chosen) + (1.0 - jax.nn.sigmoid(beta * (chosen - rejected)))
