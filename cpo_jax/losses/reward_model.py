"""Reward-model losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpo_jax.losses._common import at_least_f32

Array = jax.Array


def bradley_terry_loss(
    rewards_chosen: Array,
    rewards_rejected: Array,
    *,
    margin: Array | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> Array:
    """Bradley-Terry reward-model loss per pair ``[B]``.

    ``l = -log sigmoid(r_w - r_l - m) + c * (r_w + r_l)^2``

    Reference: Ouyang et al. 2022 (InstructGPT), eq. 1; the margin ``m`` is Llama 2's
    (Touvron et al. 2023, eq. 2); the centring term ``c`` is Eisenstein et al. 2023, as in
    TRL's ``RewardTrainer`` (``center_rewards_coefficient``), whose batch mean this equals.

    Args: scalar rewards ``[B]`` for the chosen and rejected completions; ``margin`` ``[B]`` or scalar.
    """
    rewards_chosen = at_least_f32(rewards_chosen)
    rewards_rejected = at_least_f32(rewards_rejected)
    difference = rewards_chosen - rewards_rejected
    if margin is not None:
        difference = difference - margin
    loss = -jax.nn.log_sigmoid(difference)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * jnp.square(rewards_chosen + rewards_rejected)
    return loss
