"""Pure preference and RLHF losses: (log-probs, hyperparameters) -> per-example losses.

Pairwise losses share one signature, ``loss(logps: PairLogps, **hyperparameters) -> [B]`` (see
:mod:`cpo_jax.losses.registry`), and are found by name::

    from cpo_jax import losses
    logps = losses.PairLogps(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr, mask=real)
    per_pair = losses.get("cpo")(logps, beta=0.1)            # [B]; mask it: jnp.where(real, per_pair, 0)

``losses.couples_batch(name)`` tells which losses compute across pairs (and so need ``mask``).

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
from cpo_jax.losses.pair import PairLogps
from cpo_jax.losses.reference_free import chosen_nll, contrastive_loss, orpo_loss, sft_loss, simpo_loss
from cpo_jax.losses.registry import (
    ALIASES,
    PairwiseLoss,
    canonical,
    combined_name,
    components,
    couples_batch,
    get,
    hyperparameters,
    names,
    register,
)
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

__all__ = [
    "ALIASES",
    "PairLogps",
    "PairwiseLoss",
    "aggregate_token_losses",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bradley_terry_loss",
    "canonical",
    "chosen_nll",
    "clip_target",
    "combine",
    "combined_name",
    "components",
    "contrastive_loss",
    "couples_batch",
    "cpo_clip_loss",
    "cpo_easy_loss",
    "cpo_loss",
    "discopop_loss",
    "easy_target",
    "exo_pair_loss",
    "f_divergence_transform",
    "gae_advantages",
    "get",
    "grpo_advantages",
    "hinge_loss",
    "hyperparameters",
    "ipo_loss",
    "kl_estimate",
    "kl_penalized_sequence_reward",
    "kl_penalized_token_rewards",
    "kto_kl_estimate",
    "kto_loss",
    "log_ratios",
    "masked_mean",
    "masked_whiten",
    "names",
    "nca_pair_loss",
    "orpo_loss",
    "ppo_policy_loss",
    "preference_deltas",
    "preference_metrics",
    "register",
    "reinforce_advantages",
    "rloo_advantages",
    "robust_loss",
    "sft_loss",
    "sigmoid_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "smooth_target",
    "sppo_hard_loss",
    "update_reward_shift",
    "value_loss",
]
