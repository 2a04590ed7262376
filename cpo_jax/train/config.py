"""Training configuration: nested frozen dataclasses with strict dict loading (unknown keys are errors
that name their dotted path, e.g. ``optim.lerning_rate``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

#: Closed value sets. Kept here (not imported from the modules that implement them) so that this module stays
#: free of jax; tests/test_config_typing.py checks each against its implementation.
Dtype = Literal["float32", "bfloat16", "float16"]
Remat = Literal["none", "full", "dots", "dots_no_batch"]
AttentionImpl = Literal["xla", "auto"]
Truncation = Literal["keep_start", "keep_end"]
OptimizerName = Literal["adamw", "adam", "lion", "sgd", "adafactor"]
#: A logical-axis rule: one mesh axis, several (tried in order), or none (replicated).
MeshRule = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the decoder's linear projections (PEFT's ``LoraConfig``; see
    :class:`cpo_jax.models.lora.LoraSpec`). Only the adapters train; the base weights stay frozen and, with
    ``loss.reference: base``, are the reference too.

    ``targets``: HF module names (``q_proj``, ``v_proj``, ``gate_proj``; GPT-2's ``c_attn``, ``c_fc``, ``c_proj``);
    null: every linear projection of the decoder layers. ``use_rslora``: scale by ``alpha / sqrt(rank)`` instead of
    ``alpha / rank``."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    use_rslora: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy: an HF checkpoint directory, compute/param dtypes, remat and scan.

    ``freeze_padding_embedding``: as HF's Llama/Mistral/Qwen/Gemma modules (``nn.Embedding(padding_idx=
    pad_token_id)``), the embedding row of ``pad_token_id`` gets no gradient through the lookup (so TRL never
    changes it; with tied embeddings the output projection still trains it, as in PyTorch). GPT-2 has no such row.
    ``false`` trains that row like any other.

    ``lora``: train low-rank adapters instead of every weight (:class:`LoraConfig`). ``adapter_path``: a PEFT
    adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) to start from; its settings are
    the adapters' (a ``lora:`` section, if given, must agree). ``quantize``: store the frozen base as ``nf4`` or
    ``int8`` (QLoRA; needs adapters). ``router_aux_loss_coef``: weight of an MoE model's load-balancing loss in
    preference and SFT objectives (logged as ``router_aux_loss``); null: the checkpoint's ``router_aux_loss_coef``
    when its config sets ``output_router_logits``, else 0, as TRL."""

    path: str = ""
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"
    remat: Remat = "none"
    scan_layers: bool = False
    attention_impl: AttentionImpl = "xla"
    logprob_chunk_size: int = 1024
    freeze_padding_embedding: bool = True
    lora: LoraConfig | None = None
    adapter_path: str | None = None
    quantize: Literal["none", "nf4", "int8"] = "none"
    router_aux_loss_coef: float | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Files, tokenisation limits and batching (see :mod:`cpo_jax.data`)."""

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    split: str | None = None
    skip_invalid: bool = False
    max_length: int = 512
    max_prompt_length: int | None = None
    truncation: Truncation = "keep_start"
    pairs_per_batch: int = 8
    pack: bool = False
    rows_per_batch: int | None = None
    num_workers: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The objective: a registered pairwise loss (with its hyperparameters), ``sft``, ``reward``, or
    ``rlhf`` (on-policy RL from prompts; its settings live in :class:`RLConfig`).

    ``reference`` (preference losses): ``separate`` (a second copy of ``model.path``), ``precomputed`` (its
    log-probs computed once before training), ``none`` (reference-free losses), ``base`` (with adapters: the
    frozen base with the adapters off, no second copy) or ``adapter`` (with ``model.adapter_path``: the base plus
    the imported adapter, frozen). Unset, as TRL's ``DPOTrainer`` does: ``adapter`` when training an imported adapter
    (``model.adapter_path``), ``base`` for fresh adapters (``model.lora``), else ``separate``."""

    objective: Literal["preference", "sft", "reward", "rlhf"] = "preference"
    name: str = "sigmoid"
    hparams: dict = dataclasses.field(default_factory=dict)
    reference: Literal["separate", "precomputed", "none", "base", "adapter"] | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """optax optimiser, schedule, clipping and weight-decay mask.

    Unset (null) settings take the optimiser's own default, as optax, ``torch.optim`` and HF's ``optim=`` do
    (:data:`cpo_jax.train.optim.OPTIMIZER_DEFAULTS`): ``b1``/``b2``/``eps`` are 0.9/0.999/1e-8 for ``adam`` and
    ``adamw`` and 0.9/0.99 for ``lion``; ``momentum`` is 0 for ``sgd`` (``nesterov`` needs momentum > 0). A setting
    the chosen optimiser does not take is an error. ``weight_decay`` is 0 (HF's ``TrainingArguments`` default;
    ``torch.optim.AdamW``'s own is 0.01, optax's ``adamw`` 1e-4).
    """

    name: OptimizerName = "adamw"
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    b1: float | None = None
    b2: float | None = None
    eps: float | None = None
    momentum: float | None = None
    nesterov: bool = False
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    decay_norms_and_biases: bool = False


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """On-policy KL-regularised RLHF (``loss.objective: rlhf``); see :mod:`cpo_jax.rlhf`.

    Each step samples ``prompts_per_step`` prompts (per process) from ``data.train_files``, generates
    ``num_generations`` completions of up to ``max_new_tokens`` tokens for each, scores them, and runs
    ``ppo_epochs`` passes of ``num_mini_batches`` updates over the rollout.

    Attributes:
      algorithm: ``rloo``, ``grpo``, ``reinforce`` (sequence-level advantages) or ``ppo`` (GAE with a value head).
      reward: ``verifier:<name>`` (a rule-based verifier, see :data:`cpo_jax.rlhf.rewards.VERIFIERS`) or
        the path of a reward model (an HF ``*ForSequenceClassification`` directory, e.g. a reward run's ``hf/``).
      kl_coef: beta of the KL penalty; kl_estimator: ``k1``, ``k2`` or ``k3``; kl_in: ``reward`` (subtracted
        from the reward, RLOO/PPO style) or ``loss`` (added to the loss, GRPO style).
      adaptive_kl_target: when set, beta follows Ziegler et al.'s proportional controller towards this
        KL (nats per sequence) with ``adaptive_kl_horizon``.
      whiten_advantages: normalise advantages over the batch (PPO default; off for RLOO/GRPO).
      missing_eos_penalty: subtracted from the score of completions cut off before an end-of-sequence token.
      loss_aggregation: how token losses become a scalar (see :func:`cpo_jax.losses.aggregate_token_losses`).
      eval_max_new_tokens: greedy generation length for the verifier accuracy on ``data.eval_files``.
    """

    algorithm: Literal["rloo", "grpo", "reinforce", "ppo"] = "rloo"
    reward: str = "verifier:arithmetic"
    prompts_per_step: int = 8
    num_generations: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in: Literal["reward", "loss"] = "reward"
    adaptive_kl_target: float | None = None
    adaptive_kl_horizon: int = 10000
    ppo_epochs: int = 1
    num_mini_batches: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    vf_coef: float = 0.1
    value_clip_eps: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False
    missing_eos_penalty: float | None = None
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    eval_max_new_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
    """Rerunning ``train`` on an ``output_dir`` that holds checkpoints resumes the run.

    The config stored with the checkpoint is compared with the new one. Keys that change what the run
    means (model, loss and its hyperparameters, optimiser, data and tokenisation, batch layout, seeds) are
    refused with a diff unless ``allow_config_change``; the others (``steps``, logging, evaluation and
    checkpoint cadence, mesh and mesh_rules) are accepted and logged. See :mod:`cpo_jax.train.resume`.
    """

    allow_config_change: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run. ``mesh`` maps axis names to sizes (-1: the remaining devices); every axis must be one that a
    logical-axis rule uses (``data``, ``fsdp``, ``tensor`` by default).

    ``mesh_rules``: logical axis -> mesh axis (or a list of them, or null: replicated), merged over
    :data:`cpo_jax.parallel.sharding.DEFAULT_RULES`, e.g. ``{embed: null, mlp: fsdp}``. It changes how parameters
    and batches are laid out on devices, not what is computed.

    ``rl``: the on-policy RL settings, only for ``loss.objective: rlhf`` (its defaults when the section is left
    out); a preference, SFT or reward run has none (``null``), and giving it one is an error.

    ``max_nonfinite_steps``: consecutive non-finite steps (skipped) before training stops.
    ``max_update_ratio``: stop when one update is larger than this multiple of the parameters' norm
    (``||delta theta|| / ||theta||``, default 10): a divergence that produces no NaN, e.g. a learning rate of 1e6.
    Healthy fine-tuning steps are below 0.1, and even aggressive SGD on a tiny model stays near 1. None: off.
    """

    output_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    rl: RLConfig | None = None
    resume: ResumeConfig = ResumeConfig()
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    mesh_rules: dict[str, MeshRule] = dataclasses.field(default_factory=dict)
    steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int = 8
    save_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    max_nonfinite_steps: int = 5
    max_update_ratio: float | None = 10.0
    peak_tflops_per_device: float | None = None
    tensorboard: bool = True
    wandb_project: str | None = None
    progress_bar: bool = True
    export_hf: bool = True
    eval_generation_prompts: str | None = None
    eval_generation_tokens: int = 24

    def __post_init__(self):
        # The rl: section is the RL run's own: an rlhf run without one takes RLConfig's defaults, and any other
        # objective carries none (validate_config refuses one that is given).
        if self.loss.objective == "rlhf" and self.rl is None:
            object.__setattr__(self, "rl", RLConfig())
        if self.loss.reference is None:  # TRL's choices: a copy of an imported adapter, the base under new ones
            reference = (
                "adapter"
                if self.model.adapter_path is not None
                else "base"
                if self.model.lora is not None
                else "separate"
            )
            object.__setattr__(self, "loss", dataclasses.replace(self.loss, reference=reference))


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a mapping",
    type(None): "null",
}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
_GOT = {
    int: "an integer",
    float: "a float",
    bool: "a boolean",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def describe(annotation: Any) -> str:
    """What a value of ``annotation`` looks like, in the words of a config file (``a number or null``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_PLURALS.get(args[0], 'values')}" if len(args) == 2 and args[1] is Ellipsis else "a list"
    if origin is dict:
        return f"a mapping of {describe(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(annotation):
        return f"a mapping of {annotation.__name__} keys"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _wrong(value: Any, annotation: Any, path: str) -> TypeError:
    got = _GOT.get(type(value), f"a {type(value).__name__}")
    return TypeError(f"config key {path}={value!r} is {got}; expected {describe(annotation)}")


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """``value`` checked against ``annotation`` (and lists made tuples, ints made floats where a float is expected).

    Strict: a bool is not an int, an int is not a bool, a float is not an int, and ``X | None`` checks ``X``.
    Raises ``TypeError`` (or ``ValueError`` for a value outside a ``Literal``) naming the dotted ``path``."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise _wrong(value, annotation, path)
        return from_dict(annotation, value, path)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(value, option, path)
            except (TypeError, ValueError) as err:
                if len(options) == 1 and (
                    isinstance(err, ValueError) or not str(err).startswith(f"config key {path}=")
                ):
                    raise  # a value outside a Literal, or a list item / mapping entry: its own message is the news
        raise _wrong(value, annotation, path)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise ValueError(f"config key {path}={value!r}: expected one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong(value, annotation, path)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _wrong(value, annotation, path)
        if not args:
            return value
        return {k: _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong(value, annotation, path)
    if annotation in (int, bool, str) and type(value) is not annotation:
        raise _wrong(value, annotation, path)
    return value


def from_dict(cls, data: dict | None, path: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ``KeyError`` naming their path."""
    data = dict(data or {})
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise KeyError(f"unknown config key(s) {[where + k for k in unknown]}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """A JSON-serialisable nested dict of a config."""
    return dataclasses.asdict(cfg)
