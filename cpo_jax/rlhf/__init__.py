"""KL-regularised RLHF: rewards (verifiers and reward models), rollouts, RLOO/GRPO/PPO, and the on-policy loop.

The pure losses (KL estimators, advantages, PPO/value losses) are in :mod:`cpo_jax.losses.rlhf`.
"""

from cpo_jax.rlhf.algorithms import (
    adaptive_kl_coef,
    advantages_and_returns,
    policy_objective,
)
from cpo_jax.rlhf.rewards import (
    VERIFIERS,
    LearnedReward,
    RewardFunction,
    VerifierReward,
    make_reward,
)
from cpo_jax.rlhf.rollout import Rollout, completion_hidden, completion_logps, sample
from cpo_jax.rlhf.trainer import RLTrainer

__all__ = [
    "VERIFIERS",
    "LearnedReward",
    "RLTrainer",
    "RewardFunction",
    "Rollout",
    "VerifierReward",
    "adaptive_kl_coef",
    "advantages_and_returns",
    "completion_hidden",
    "completion_logps",
    "make_reward",
    "policy_objective",
    "sample",
]
