"""The paper's failure mode, exactly: tabular softmax policies trained on Bradley-Terry preferences.

Each prompt ``p`` has ``K`` candidate answers with true rewards ``r[p, k]``. The reference policy is
``softmax(theta_ref[p])`` and the trained policy ``softmax(theta[p])``, one free logit per answer, so
``delta_theta = log pi(y_w) - log pi(y_l) = theta_w - theta_l`` exactly. Every unordered pair of answers
is compared ``comparisons_per_pair`` times by the Bradley-Terry model ``P(a > b) = sigmoid(r_a - r_b)``,
so the data hold both orders of most pairs, in proportion to the true preference.

The KL-regularised RLHF optimum is ``pi* ∝ pi_ref · exp(r / beta)``, so on each pair
``delta* = delta_ref + (r_w - r_l) / beta`` (``y_w`` is the answer with the higher true reward). The
paper's assumption is ``delta* > 0``; a pair *violates* it when ``delta_ref < 0`` and
``beta·|delta_ref| > r_w - r_l``. On such pairs DPO's population optimum is ``pi*`` itself: its loss falls
while the policy keeps preferring ``y_l``, inside ``U = {delta_ref < delta_theta < 0}``.

Every loss here is a :mod:`cpo_jax.losses` function, called on one-token "sequences" (lengths 1, so
length normalisation changes nothing), and minimised full-batch with optax Adam.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special

from cpo_jax import losses


@dataclasses.dataclass(frozen=True)
class Setting:
    """One synthetic problem.

    The reference logits are ``slope_p · r[p] / reward_gap + ref_noise · N(0, 1)`` with a per-prompt slope
    drawn from ``ref_slope``: a negative slope makes the reference prefer the worse answers.
    """

    name: str
    ref_slope: tuple[float, float]
    num_prompts: int = 48
    num_candidates: int = 4
    reward_gap: float = 1.0
    ref_noise: float = 0.5
    comparisons_per_pair: int = 16
    beta: float = 1.0
    expected_labels: bool = False  # label counts = comparisons · P(y_w > y_l) (the population), not draws
    seed: int = 0


SETTINGS = {
    "satisfied": Setting("satisfied", ref_slope=(0.0, 1.0)),
    "violated": Setting("violated", ref_slope=(-3.0, -0.5)),
}

# Method -> (registered loss, hyperparameters). ``None`` means "the setting's beta".
METHODS: dict[str, tuple[str, dict]] = {
    "dpo": ("sigmoid", {"beta": None}),
    "cpo": ("cpo", {"beta": None, "gamma": 0.5, "tau": 2.0}),
    "cpo_clip": ("cpo_clip", {"beta": None}),
    "cpo_easy": ("cpo_easy", {"beta": None, "gamma": 0.05}),
    "ipo": ("ipo", {"beta": None}),
    "simpo": ("simpo", {"beta": 2.0, "gamma": 1.0}),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """A drawn instance of a :class:`Setting`.

    Shapes: ``P`` prompts, ``K`` answers, ``Q`` unordered pairs, ``O = 2Q`` ordered observations.
    """

    rewards: np.ndarray  # [P, K] true rewards
    ref_logits: np.ndarray  # [P, K]
    pair_prompt: np.ndarray  # [Q] prompt of each pair
    pair_better: np.ndarray  # [Q] the answer with the higher true reward (y_w)
    pair_worse: np.ndarray  # [Q] (y_l)
    pair_wins: np.ndarray  # [Q] how often y_w was preferred, out of ``comparisons`` (float if expected)
    comparisons: int  # Bradley-Terry comparisons drawn per pair
    beta: float

    @property
    def observations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(prompt, chosen, rejected, count)`` ``[O]``: each pair in both orders, weighted by its label counts."""
        prompt = np.concatenate([self.pair_prompt, self.pair_prompt])
        chosen = np.concatenate([self.pair_better, self.pair_worse])
        rejected = np.concatenate([self.pair_worse, self.pair_better])
        count = np.concatenate([self.pair_wins, self.comparisons - self.pair_wins])
        return prompt, chosen, rejected, count.astype(np.float32)


def make_problem(setting: Setting) -> Problem:
    """Draws rewards, a reference policy and Bradley-Terry labels for ``setting`` (deterministic in its seed)."""
    rng = np.random.RandomState(setting.seed)
    P, K = setting.num_prompts, setting.num_candidates
    rewards = np.stack([rng.permutation(K) for _ in range(P)]).astype(np.float64) * setting.reward_gap
    slopes = rng.uniform(*setting.ref_slope, size=(P, 1))
    ref_logits = slopes * rewards / setting.reward_gap + setting.ref_noise * rng.randn(P, K)
    ref_logits -= ref_logits.max(axis=1, keepdims=True)
    a, b = np.triu_indices(K, k=1)
    prompt = np.repeat(np.arange(P), len(a))
    first, second = np.tile(a, P), np.tile(b, P)
    first_better = rewards[prompt, first] > rewards[prompt, second]
    better = np.where(first_better, first, second)
    worse = np.where(first_better, second, first)
    gap = rewards[prompt, better] - rewards[prompt, worse]
    win_probability = 1.0 / (1.0 + np.exp(-gap))
    draws = rng.binomial(setting.comparisons_per_pair, win_probability)
    wins = setting.comparisons_per_pair * win_probability if setting.expected_labels else draws
    return Problem(
        rewards=rewards, ref_logits=ref_logits, pair_prompt=prompt, pair_better=better, pair_worse=worse,
        pair_wins=wins, comparisons=setting.comparisons_per_pair, beta=setting.beta,
    )  # fmt: skip


def reference_log_policy(problem: Problem) -> jax.Array:
    """``log pi_ref`` ``[P, K]`` (float32), as the losses and diagnostics see it."""
    return jax.nn.log_softmax(jnp.asarray(problem.ref_logits, jnp.float32), axis=-1)


def rlhf_optimum_logits(problem: Problem) -> np.ndarray:
    """``log pi*`` ``[P, K]`` of the KL-regularised RLHF optimum ``pi* ∝ pi_ref · exp(r / beta)`` (float64)."""
    return scipy.special.log_softmax(problem.ref_logits + problem.rewards / problem.beta, axis=-1)


def pair_deltas(log_policy: jax.Array | np.ndarray, problem: Problem) -> jax.Array:
    """``log pi(y_w) - log pi(y_l)`` ``[Q]`` for every pair, ``y_w`` the answer with the higher true reward."""
    return log_policy[problem.pair_prompt, problem.pair_better] - log_policy[problem.pair_prompt, problem.pair_worse]


def violated_pairs(problem: Problem) -> np.ndarray:
    """``[Q]`` bool: pairs where the RLHF optimum prefers ``y_l`` (``delta* < 0``, the assumption fails)."""
    return np.asarray(pair_deltas(rlhf_optimum_logits(problem), problem)) < 0


def policy_summary(log_policy: jax.Array, problem: Problem) -> dict[str, jax.Array]:
    """The paper's diagnostics, true reward and KL of a policy ``log pi`` ``[P, K]``; scalars.

    Diagnostics are over pairs oriented by the true reward: ``frac_in_U`` is the share with
    ``delta_ref < delta_theta < 0``, ``abs_accuracy`` the share with ``delta_theta > 0``; the
    ``*_violated`` versions are restricted to the pairs that violate the assumption.
    """
    log_ref = reference_log_policy(problem)
    delta_theta, delta_ref = pair_deltas(log_policy, problem), pair_deltas(log_ref, problem)
    in_u = (delta_ref < delta_theta) & (delta_theta < 0)
    correct = delta_theta > 0
    violated = jnp.asarray(violated_pairs(problem))
    n_violated = jnp.maximum(violated.sum(), 1)
    policy = jnp.exp(log_policy)
    return {
        "frac_in_U": in_u.mean(),
        "abs_accuracy": correct.mean(),
        "frac_in_U_violated": (in_u & violated).sum() / n_violated,
        "abs_accuracy_violated": (correct & violated).sum() / n_violated,
        "true_reward": (policy * jnp.asarray(problem.rewards, jnp.float32)).sum(-1).mean(),
        "kl_to_ref": (policy * (log_policy - log_ref)).sum(-1).mean(),
    }


def objective(theta: jax.Array, problem: Problem, method: str) -> jax.Array:
    """Weighted mean over the observations of ``method``'s per-pair loss (a :mod:`cpo_jax.losses` function)."""
    name, hparams = METHODS[method]
    hparams = {k: problem.beta if v is None else v for k, v in hparams.items()}
    prompt, chosen, rejected, count = problem.observations
    log_policy = jax.nn.log_softmax(theta, axis=-1)
    log_ref = reference_log_policy(problem)
    ones = jnp.ones(prompt.shape, jnp.float32)
    logps = losses.PairLogps(
        log_policy[prompt, chosen], log_policy[prompt, rejected], log_ref[prompt, chosen], log_ref[prompt, rejected],
        chosen_lengths=ones, rejected_lengths=ones,
    )  # fmt: skip
    per_pair = losses.get(name)(logps, **hparams)
    return jnp.sum(per_pair * count) / jnp.sum(count)


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """What one training run recorded, every ``record_every`` steps (``T`` records, step 0 first)."""

    method: str
    steps: np.ndarray  # [T]
    loss: np.ndarray  # [T]
    delta_theta: np.ndarray  # [T, Q] per pair, oriented by the true reward
    summary: dict[str, np.ndarray]  # name -> [T], from policy_summary
    final_log_policy: np.ndarray  # [P, K]


def train(
    problem: Problem, method: str, *, steps: int = 1500, learning_rate: float = 0.05, record_every: int = 10
) -> Trajectory:
    """Full-batch Adam on ``method``'s loss from ``theta = theta_ref``; records the diagnostics as it goes."""
    if steps % record_every:
        raise ValueError(f"steps ({steps}) must be a multiple of record_every ({record_every})")
    optimizer = optax.adam(learning_rate)
    loss_and_grad = jax.value_and_grad(functools.partial(objective, problem=problem, method=method))

    def record(theta):
        log_policy = jax.nn.log_softmax(theta, axis=-1)
        return loss_and_grad(theta)[0], pair_deltas(log_policy, problem), policy_summary(log_policy, problem)

    def update(carry, _):
        theta, opt_state = carry
        _, grads = loss_and_grad(theta)
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        return (optax.apply_updates(theta, updates), opt_state), None

    def chunk(carry, _):
        carry, _ = jax.lax.scan(update, carry, None, length=record_every)
        return carry, record(carry[0])

    @jax.jit
    def run(theta):
        first = record(theta)
        (theta, _), rest = jax.lax.scan(chunk, (theta, optimizer.init(theta)), None, length=steps // record_every)
        history = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
        return theta, history

    theta, (loss, delta_theta, summary) = run(jnp.asarray(problem.ref_logits, jnp.float32))
    return Trajectory(
        method=method,
        steps=np.arange(0, steps + 1, record_every),
        loss=np.asarray(loss),
        delta_theta=np.asarray(delta_theta),
        summary={k: np.asarray(v) for k, v in summary.items()},
        final_log_policy=np.asarray(jax.nn.log_softmax(theta, axis=-1)),
    )


def scaled_loss_curve(method: str, delta_theta: np.ndarray, delta_ref: float, beta: float, **hparams) -> np.ndarray:
    """``(1/beta)·L`` ``[N]`` of a reference-based loss on the grid ``delta_theta`` at a fixed ``delta_ref``.

    Calls the registered loss with summed log-probs ``(delta_theta, 0)`` for the policy and ``(delta_ref, 0)``
    for the reference, so the deltas are exactly these values.
    """
    theta = jnp.asarray(delta_theta, jnp.float32)
    zeros = jnp.zeros_like(theta)
    ref = jnp.full_like(theta, delta_ref)
    extra = {"length_normalize": False} if method.startswith("cpo") else {}
    per_pair = losses.get(method)(losses.PairLogps(theta, zeros, ref, zeros), beta=beta, **extra, **hparams)
    return np.asarray(per_pair, np.float64) / beta
