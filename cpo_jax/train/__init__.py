"""Training: config, objectives, jitted steps, Orbax checkpoints, metrics and the loop.

Only the configuration (plain dataclasses, no JAX) is imported here, so reading and validating a config loads
nothing heavy. The rest is imported from its module:

* :mod:`cpo_jax.train.trainer`: ``Trainer``, ``RunResult``, ``stack_micro_batches`` (the loop: data, models, Orbax)
* :mod:`cpo_jax.train.step`: ``TrainState``, ``init_state``, ``train_step``, ``eval_step``
* :mod:`cpo_jax.train.checkpoint`: ``Checkpointer``
* :mod:`cpo_jax.train.validate`: ``validate_config``
"""

from cpo_jax.train.config import DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig, from_dict, to_dict

__all__ = [
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "from_dict",
    "to_dict",
]
