"""Training: config, objectives, jitted steps, Orbax checkpoints, metrics and the loop."""

from cpo_jax.train.checkpoint import Checkpointer
from cpo_jax.train.config import DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig, from_dict, to_dict
from cpo_jax.train.step import TrainState, eval_step, init_state, train_step
from cpo_jax.train.trainer import RunResult, Trainer, TrainingDiverged, stack_micro_batches

__all__ = [
    "Checkpointer",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunResult",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "eval_step",
    "from_dict",
    "init_state",
    "stack_micro_batches",
    "to_dict",
    "train_step",
]
