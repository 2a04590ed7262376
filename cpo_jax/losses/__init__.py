"""Pure preference and RLHF losses: (log-probs, hyperparameters) -> per-example losses.

Pairwise losses share one signature (see :mod:`cpo_jax.losses.registry`) and are found by name::

    from cpo_jax import losses
    per_pair = losses.get("cpo")(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr, beta=0.1)

``docs/losses.md`` tables every loss: formula, reference, and input units.
"""

from cpo_jax.losses import cpo as _cpo  # noqa: F401  (registers the losses)
from cpo_jax.losses import dpo as _dpo  # noqa: F401
from cpo_jax.losses import reference_free as _reference_free  # noqa: F401
from cpo_jax.losses.combine import combine
from cpo_jax.losses.cpo import (
    clip_target,
    cpo_clip_loss,
    cpo_easy_loss,
    cpo_loss,
    easy_target,
    preference_deltas,
    smooth_target,
)
from cpo_jax.losses.dpo import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    exo_pair_loss,
    f_divergence_transform,
    hinge_loss,
    ipo_loss,
    log_ratios,
    nca_pair_loss,
    robust_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
    update_reward_shift,
)
from cpo_jax.losses.kto import kto_kl_estimate, kto_loss
from cpo_jax.losses.metrics import preference_metrics
from cpo_jax.losses.reference_free import chosen_nll, contrastive_loss, orpo_loss, sft_loss, simpo_loss
from cpo_jax.losses.registry import PairwiseLoss, get, hyperparameters, names, register
from cpo_jax.losses.reward_model import bradley_terry_loss
from cpo_jax.losses.rlhf import (
    aggregate_token_losses,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    kl_penalized_sequence_reward,
    kl_penalized_token_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    reinforce_advantages,
    rloo_advantages,
    value_loss,
)

__all__ = [name for name in dir() if not name.startswith("_")]
