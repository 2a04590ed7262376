"""KL-regularised RLHF: rewards (verifiers and reward models), rollouts, RLOO/GRPO/PPO, and the on-policy loop.

Only the pure algorithms are imported here (JAX and :mod:`cpo_jax.losses.rlhf`, which holds the KL estimators,
advantages and PPO/value losses). The rest is imported from its module, which loads what it needs:

* :mod:`cpo_jax.rlhf.rewards`: ``RewardFunction``, ``VerifierReward``, ``LearnedReward``, ``VERIFIERS``, ``make_reward``
* :mod:`cpo_jax.rlhf.rollout`: ``Rollout``, ``sample``, ``completion_logps``, ``completion_hidden`` (Flax models)
* :mod:`cpo_jax.rlhf.step`: the jitted scoring pass and update
* :mod:`cpo_jax.rlhf.trainer`: ``RLTrainer``, the loop (Orbax, grain, the data pipeline)
"""

from cpo_jax.rlhf.algorithms import (
    adaptive_kl_coef,
    advantages_and_returns,
    policy_objective,
)

__all__ = [
    "adaptive_kl_coef",
    "advantages_and_returns",
    "policy_objective",
]
