"""Training configuration: nested frozen dataclasses with strict dict loading (unknown keys are errors
that name their dotted path, e.g. ``optim.lerning_rate``)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

#: Closed value sets. Kept here (not imported from the modules that implement them) so that this module stays
#: free of jax; tests/test_config_typing.py checks each against its implementation.
Dtype = Literal["float32", "bfloat16", "float16"]
Remat = Literal["none", "full", "dots", "dots_no_batch"]
AttentionImpl = Literal["xla", "auto", "cudnn", "splash", "best"]  # as cpo_jax.ops.attention.IMPLEMENTATIONS (tested)
Truncation = Literal["keep_start", "keep_end"]
OptimizerName = Literal["adamw", "adam", "lion", "sgd", "adafactor"]
#: A logical-axis rule: one mesh axis, several (tried in order), or none (replicated).
MeshRule = str | tuple[str, ...] | None
#: The loss ``loss.name`` defaults to (DPO).
DEFAULT_LOSS = "sigmoid"
#: Other names of registered losses (TRL's); :data:`cpo_jax.losses.ALIASES` is the same table (tested).
LOSS_ALIASES = {"dpo": "sigmoid"}


def combined_loss_name(names, weights=None) -> str:
    """The registry name of the weighted sum of losses ``names`` (``weights``: 1.0 each when None), as
    :func:`cpo_jax.losses.combined_name` writes it: ``0.8*sigmoid+1.0*sft``; one loss of weight 1 is its name."""
    weights = [1.0] * len(names) if weights is None else weights
    terms = [(LOSS_ALIASES.get(n, n), float(w)) for n, w in zip(names, weights)]
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    return "+".join(f"{w!r}*{n}" for n, w in terms)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the decoder's linear projections (PEFT's ``LoraConfig``; see
    :class:`cpo_jax.models.lora.LoraSpec`). Only the adapters train; the base weights stay frozen and, with
    ``loss.reference: base``, are the reference too."""

    rank: int = 16
    """Rank r of each adapter pair ``A [in, r]``, ``B [r, out]``."""
    alpha: float = 32.0
    """Scale numerator: an adapter adds ``alpha / rank * x A B`` (``alpha / sqrt(rank)`` with ``use_rslora``)."""
    dropout: float = 0.0
    """Dropout on the adapters' input in training, in [0, 1); masks are drawn from (seed, step, micro-batch)."""
    targets: tuple[str, ...] | None = None
    """HF module names to adapt (``q_proj``, ``v_proj``, ``gate_proj``; GPT-2's ``c_attn``, ``c_fc``, ``c_proj``);
    null: every linear projection of the decoder layers."""
    use_rslora: bool = False
    """Scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank`` (rank-stabilised LoRA)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy: an HF checkpoint directory, compute/param dtypes, remat and scan, adapters."""

    path: str = ""
    """The model: an HF checkpoint directory (``config.json`` + ``*.safetensors``), a directory written by
    ``cpo-jax convert hf-to-orbax`` (fast sharded loading), a Hugging Face hub id already in the local HF cache
    (``HuggingFaceTB/SmolLM2-135M-Instruct``; nothing is downloaded), or the built-in names ``smollm2`` and
    ``tiny-random`` (created once in ``$CPO_JAX_CACHE``)."""
    dtype: Dtype = "float32"
    """Compute dtype of activations; the log-softmax, the loss and attention's softmax stay float32."""
    param_dtype: Dtype = "float32"
    """Dtype the parameters are stored and updated in."""
    remat: Remat = "none"
    """Activation checkpointing policy (``jax.checkpoint``): ``none``, ``full``, ``dots`` or ``dots_no_batch``."""
    scan_layers: bool = False
    """Run the decoder layers with ``lax.scan``: one layer compiles once, which compiles deep models faster."""
    attention_impl: AttentionImpl = "best"
    """Attention kernel (:mod:`cpo_jax.ops.attention`): ``best`` (the fused kernel the machine has: cuDNN flash
    attention on a GPU, splash on a TPU, else the einsum path, quietly), ``xla`` (einsum reference), ``auto``
    (``jax.nn.dot_product_attention``), ``cudnn`` (cuDNN flash attention on a GPU), ``splash`` (the TPU Pallas
    kernel). A requested fused path that cannot run falls back to ``xla`` with a warning."""
    logprob_chunk_size: int = 1024
    """Vocabulary-projection chunk (tokens) of the memory-lean log-probs: the logits are never materialised as
    ``[rows, length, vocab]``, only a few ``chunk x vocab`` float32 buffers at a time."""
    freeze_padding_embedding: bool = True
    """As HF's Llama/Mistral/Qwen/Gemma modules (``nn.Embedding(padding_idx=pad_token_id)``), the embedding row of
    ``pad_token_id`` gets no gradient through the lookup (so TRL never changes it; with tied embeddings the output
    projection still trains it, as in PyTorch). GPT-2 has no such row. ``false`` trains that row like any other."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of every weight (the ``model.lora`` keys); null: full fine-tuning."""
    adapter_path: str | None = None
    """A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) to start from; its
    settings are the adapters' (a ``lora:`` section, if given, must agree)."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Store the frozen base as ``nf4`` or ``int8`` (QLoRA; needs adapters)."""
    router_aux_loss_coef: float | None = None
    """Weight of an MoE model's load-balancing loss in preference, SFT and RL objectives (logged as
    ``router_aux_loss``); null: the checkpoint's ``router_aux_loss_coef`` when its config sets
    ``output_router_logits``, else 0, as TRL."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Files, tokenisation limits and batching (see :mod:`cpo_jax.data` and docs/data.md)."""

    train_files: tuple[str, ...] = ()
    """Training data: JSONL, Parquet, saved ``datasets`` directories or TFDS ArrayRecord in TRL's formats, or
    ``bundled:<name>[:N]`` (``arithmetic-train``, ``arithmetic-eval``, ``arithmetic-prompts``, ``tiny-chat``)."""
    eval_files: tuple[str, ...] = ()
    """Held-out data in the same formats; empty: no evaluation."""
    split: str | None = None
    """The split to read from a saved ``DatasetDict`` (e.g. ``train``)."""
    skip_invalid: bool = False
    """Skip (and log) bad rows instead of stopping at the first one; bad files always stop."""
    max_length: int = 512
    """Longest tokenised sequence (prompt + completion); longer completions are truncated."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens, in [1, max_length); longer prompts are dropped (never cut); null: max_length // 2."""
    truncation: Truncation = "keep_start"
    """Which end of a completion survives truncation: ``keep_start`` or ``keep_end``."""
    pairs_per_batch: int = 8
    """Preference pairs per micro-batch and process (chosen and rejected are two rows each); a step reads
    ``grad_accum`` micro-batches."""
    pack: bool = False
    """Pack sequences into ``rows_per_batch`` rows of ``max_length`` (first fit) instead of padding each pair."""
    rows_per_batch: int | None = None
    """Rows of a packed batch; null: ``pairs_per_batch``."""
    num_workers: int = 0
    """grain worker processes that tokenise and batch; 0: in-process. Resume with the same value."""
    seed: int = 0
    """Shuffling seed; every epoch is reshuffled."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The objective: a registered pairwise loss (with its hyperparameters), or a weighted sum of them, ``sft``,
    ``reward``, or ``rlhf`` (on-policy RL from prompts; its settings live in :class:`RLConfig`).

    ``dpo`` is an alias of ``sigmoid``, in ``name`` and in ``type``; the stored config holds ``sigmoid``. With
    ``type``, ``name`` is derived from it (``0.8*sigmoid+0.2*bco_pair+1.0*sft``, what
    :func:`cpo_jax.losses.combined_name` writes), and a different ``name`` is an error."""

    objective: Literal["preference", "sft", "reward", "rlhf"] = "preference"
    """What is trained: ``preference`` (a pairwise loss), ``sft`` (NLL of the chosen completions), ``reward``
    (a Bradley-Terry reward model) or ``rlhf`` (on-policy RL, the ``rl:`` section)."""
    name: str = "sigmoid"
    """The pairwise loss (``sigmoid`` = DPO, ``cpo``, ``ipo``, ``simpo``, ...; docs/losses.md lists them)."""
    hparams: dict = dataclasses.field(default_factory=dict)
    """Keyword hyperparameters of the loss (``beta``, ``gamma``, ...); an unset one takes the loss's default. For
    ``reward``: ``margin`` and ``center_rewards_coefficient``; ``sft`` and ``rlhf`` take none."""
    type: str | tuple[str, ...] | None = None
    """TRL's ``loss_type``: a list of loss names whose weighted sum is the loss (MPO:
    ``[sigmoid, bco_pair, sft]``); each hyperparameter goes to every listed loss that takes it. Null: ``name``."""
    weights: tuple[float, ...] | None = None
    """TRL's ``loss_weights``: one weight per ``type`` entry; null: 1.0 each."""
    reference: Literal["separate", "precomputed", "none", "base", "adapter"] | None = None
    """The reference model of preference losses: ``separate`` (a second copy of ``model.path``), ``precomputed``
    (its log-probs computed once before training), ``none`` (reference-free losses), ``base`` (with adapters: the
    frozen base with the adapters off, no second copy) or ``adapter`` (with ``model.adapter_path``: the base plus
    the imported adapter, frozen). Unset, as TRL's ``DPOTrainer``: ``adapter`` when training an imported adapter,
    ``base`` for fresh adapters (``model.lora``), else ``separate``."""

    def __post_init__(self):
        # TRL's names: dpo is sigmoid; a one-string loss_type is a one-entry list. The stored config is canonical.
        name, kind = self.name, self.type
        if isinstance(kind, str):
            kind = (kind,)
        if kind is not None:
            kind = tuple(LOSS_ALIASES.get(k, k) for k in kind)
            object.__setattr__(self, "type", kind)
        if isinstance(name, str):
            name = LOSS_ALIASES.get(name, name)
            object.__setattr__(self, "name", name)
        if kind and (self.weights is None or len(self.weights) == len(kind)):
            derived = combined_loss_name(kind, self.weights)
            if name not in (derived, DEFAULT_LOSS):
                raise ValueError(
                    f"config key loss.name={name!r} conflicts with loss.type={list(kind)}: give one of them "
                    f"(loss.type is TRL's loss_type list; loss.name a single loss)"
                )
            object.__setattr__(self, "name", derived)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """optax optimiser, schedule, clipping and weight-decay mask.

    Unset (null) settings take the optimiser's own default, as optax, ``torch.optim`` and HF's ``optim=`` do
    (:data:`cpo_jax.train.optim.OPTIMIZER_DEFAULTS`). A setting the chosen optimiser does not take is an error."""

    name: OptimizerName = "adamw"
    """The optimiser: ``adamw``, ``adam``, ``lion``, ``sgd`` or ``adafactor``."""
    learning_rate: float = 5e-7
    """Peak learning rate, reached after ``warmup_steps``."""
    weight_decay: float = 0.0
    """Decoupled weight decay (HF's ``TrainingArguments`` default 0; ``torch.optim.AdamW``'s own is 0.01, optax's
    ``adamw`` 1e-4); ``adam`` takes none."""
    b1: float | None = None
    """First-moment decay, in [0, 1); null: 0.9 for ``adam``/``adamw``/``lion``."""
    b2: float | None = None
    """Second-moment decay, in [0, 1); null: 0.999 for ``adam``/``adamw``, 0.99 for ``lion``."""
    eps: float | None = None
    """Denominator epsilon of ``adam``/``adamw``; null: 1e-8."""
    momentum: float | None = None
    """Momentum of ``sgd``, in [0, 1); null: 0."""
    nesterov: bool = False
    """Nesterov momentum (``sgd`` with momentum > 0)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the linear warm-up, over the run's ``steps``."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to ``learning_rate``."""
    min_lr_ratio: float = 0.0
    """Where the cosine or linear decay ends, as a fraction of ``learning_rate``, in [0, 1]."""
    max_grad_norm: float | None = 1.0
    """Global-norm gradient clipping; null: no clipping."""
    decay_norms_and_biases: bool = False
    """Also decay 1-D parameters (norm scales, biases), which weight decay skips by default."""


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """On-policy KL-regularised RLHF (``loss.objective: rlhf``); see :mod:`cpo_jax.rlhf` and docs/rlhf.md.

    Each step samples ``prompts_per_step`` prompts (per process) from ``data.train_files``, generates
    ``num_generations`` completions of up to ``max_new_tokens`` tokens for each, scores them, and runs
    ``ppo_epochs`` passes of ``num_mini_batches`` updates over the rollout."""

    algorithm: Literal["rloo", "grpo", "reinforce", "ppo", "online"] = "rloo"
    """``rloo``, ``grpo``, ``reinforce`` (sequence-level advantages), ``ppo`` (GAE with a value head) or ``online``
    (online DPO/CPO, as TRL's ``OnlineDPOTrainer``: the ``num_generations: 2`` samples of a prompt, ranked by the
    reward, make a preference pair, trained with the pairwise loss ``loss.name`` and ``loss.hparams``)."""
    reward: str = "verifier:arithmetic"
    """``verifier:<name>`` (a rule-based verifier, see :data:`cpo_jax.rlhf.rewards.VERIFIERS`) or the path of a
    reward model (an HF ``*ForSequenceClassification`` directory, e.g. a reward run's ``hf/``)."""
    prompts_per_step: int = 8
    """Prompts sampled per step and process."""
    num_generations: int = 4
    """Completions per prompt (at least 2 for ``rloo`` and ``grpo``)."""
    max_new_tokens: int = 32
    """Longest sampled completion."""
    temperature: float = 1.0
    """Sampling temperature (> 0); log-probs are scored at this temperature."""
    top_k: int = 0
    """Sample from the k most likely tokens; 0: off."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]; 1: off."""
    kl_coef: float = 0.05
    """Beta of the KL penalty towards the reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator (Schulman's k1, k2, k3)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL goes: ``reward`` (subtracted from the reward, RLOO/PPO style) or ``loss`` (added to the loss,
    GRPO style)."""
    adaptive_kl_target: float | None = None
    """When set, ``kl_coef`` follows Ziegler et al.'s proportional controller towards this KL (nats per sequence)."""
    adaptive_kl_horizon: int = 10000
    """Horizon of the adaptive KL controller."""
    ppo_epochs: int = 1
    """Passes over each rollout."""
    num_mini_batches: int = 1
    """Updates per pass; must divide ``prompts_per_step x num_generations``."""
    clip_eps: float = 0.2
    """PPO ratio clipping (lower side, and upper side unless ``clip_eps_high``)."""
    clip_eps_high: float | None = None
    """Upper ratio clip (DAPO's clip-higher); null: ``clip_eps``."""
    vf_coef: float = 0.1
    """Weight of the value loss (``ppo``)."""
    value_clip_eps: float | None = 0.2
    """Clipping of the value prediction (``ppo``); null: none."""
    gamma: float = 1.0
    """Discount of GAE (``ppo``)."""
    lam: float = 0.95
    """Lambda of GAE (``ppo``)."""
    whiten_advantages: bool = False
    """Normalise advantages over the batch (PPO's default; off for RLOO/GRPO)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions cut off before an end-of-sequence token."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    """How token losses become a scalar (see :func:`cpo_jax.losses.aggregate_token_losses`)."""
    eval_max_new_tokens: int = 32
    """Greedy generation length for the verifier accuracy on ``data.eval_files``."""
    online_ties: Literal["skip", "first"] = "skip"
    """``online`` only: a pair whose two scores are equal carries no preference and is skipped (``skip``), or its
    first completion is chosen (``first``, as TRL's ``OnlineDPOTrainer``)."""


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
    """Rerunning ``train`` on an ``output_dir`` that holds checkpoints resumes the run.

    The config stored with the checkpoint is compared with the new one. Keys that change what the run
    means (model, loss and its hyperparameters, optimiser, data and tokenisation, batch layout, seeds) are
    refused with a diff unless ``allow_config_change``; the others (``steps``, ``epochs``, logging, evaluation and
    checkpoint cadence, mesh and mesh_rules) are accepted and logged. See :mod:`cpo_jax.train.resume`.
    """

    allow_config_change: bool = False
    """Resume even when a key that changes what the run means differs from the checkpoint's config."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run: the ``model``, ``data``, ``loss``, ``optim``, ``rl`` and ``resume`` sections, the mesh, and
    the length, cadence and outputs of training."""

    output_dir: str = "runs/default"
    """Where the run writes checkpoints, ``metrics.jsonl``, ``config.json``, ``summary.json``, curves and ``hf/``;
    rerunning on it resumes."""
    model: ModelConfig = ModelConfig()
    """The policy."""
    data: DataConfig = DataConfig()
    """Data files, tokenisation and batches."""
    loss: LossConfig = LossConfig()
    """The objective."""
    optim: OptimConfig = OptimConfig()
    """The optimiser."""
    rl: RLConfig | None = None
    """The on-policy RL settings, only for ``loss.objective: rlhf`` (its defaults when the section is left out); a
    preference, SFT or reward run has none (null), and giving it one is an error."""
    resume: ResumeConfig = ResumeConfig()
    """What a rerun on the same ``output_dir`` may change."""
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    """Device mesh: axis name -> size (-1: the remaining devices). Every axis must be one that a logical-axis rule
    uses (``data``, ``fsdp``, ``tensor`` by default)."""
    mesh_rules: dict[str, MeshRule] = dataclasses.field(default_factory=dict)
    """Logical axis -> mesh axis (or a list of them, or null: replicated), merged over
    :data:`cpo_jax.parallel.sharding.DEFAULT_RULES`, e.g. ``{embed: null, mlp: fsdp}``. It changes how parameters
    and batches are laid out on devices, not what is computed."""
    steps: int = 100
    """Optimiser steps of the run (TRL's ``max_steps``). Give ``steps`` or ``epochs``, not both."""
    epochs: float | None = None
    """Passes over ``data.train_files`` (TRL's ``num_train_epochs``), instead of ``steps``: steps =
    ceil(epochs x train pairs / (data.pairs_per_batch x grad_accum x processes)) (RL: prompts /
    (rl.prompts_per_step x processes)), computed when the data is read and recorded as ``steps`` in the run's
    ``config.json`` and checkpoints. With ``data.pack`` a batch may hold fewer pairs, so an epoch is approximate."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (gradient accumulation; equal to one batch that large)."""
    seed: int = 0
    """Seed of initialisation, dropout and RL sampling."""
    log_every: int = 1
    """Write metrics every N steps (``metrics.jsonl``, TensorBoard, wandb)."""
    eval_every: int = 0
    """Evaluate on ``data.eval_files`` every N steps; 0: only before and after training."""
    eval_batches: int = 8
    """Batches per evaluation."""
    save_every: int = 50
    """Checkpoint every N steps (and at the last step)."""
    keep_checkpoints: int = 3
    """Checkpoints kept (the newest)."""
    async_checkpoints: bool = True
    """Write checkpoints in the background while training continues (Orbax async); false: block until each
    save is on disk."""
    max_nonfinite_steps: int = 5
    """Consecutive non-finite steps (skipped) before training stops."""
    max_update_ratio: float | None = 10.0
    """Stop when one update is larger than this multiple of the parameters' norm (``||delta theta|| / ||theta||``):
    a divergence that produces no NaN, e.g. a learning rate of 1e6. Healthy fine-tuning steps are below 0.1, and
    even aggressive SGD on a tiny model stays near 1. Null: off."""
    peak_tflops_per_device: float | None = None
    """Dense bf16 peak of one device for MFU; null: known GPUs and TPUs are looked up, a CPU reports no MFU."""
    tensorboard: bool = True
    """Also write metrics to ``output_dir/tensorboard``."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project; needs the ``wandb`` extra (``pip install
    'cpo_jax[wandb]'``), checked before training starts."""
    progress_bar: bool = True
    """Show a tqdm progress bar with the loss and the ETA."""
    export_hf: bool = True
    """At the end, write the policy as an HF directory to ``output_dir/hf`` (with adapters: the merged model, and
    the adapters in PEFT's format in ``output_dir/hf_adapter``)."""
    eval_generation_prompts: str | None = None
    """Prompt-only arithmetic records (e.g. ``bundled:arithmetic-eval-prompts:32``) answered greedily before and
    after training: ``generation/accuracy`` in the summary."""
    eval_generation_tokens: int = 24
    """Longest greedy answer for ``eval_generation_prompts``."""

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


def records_per_step(cfg: TrainConfig) -> int:
    """Training records one step reads on one process: ``data.pairs_per_batch x grad_accum`` pairs, or
    ``rl.prompts_per_step`` prompts for ``loss.objective: rlhf``."""
    if cfg.loss.objective == "rlhf":
        return (cfg.rl or RLConfig()).prompts_per_step
    return cfg.data.pairs_per_batch * cfg.grad_accum


def steps_for_epochs(cfg: TrainConfig, num_records: int, processes: int = 1) -> int:
    """The steps of ``cfg.epochs`` passes over ``num_records`` training records read by ``processes`` processes:
    ``ceil(epochs x records / (records_per_step x processes))``, at least 1."""
    per_step = records_per_step(cfg) * processes
    return max(1, math.ceil(round(cfg.epochs * num_records / per_step, 9)))


def resolve_epochs(cfg: TrainConfig, num_records: int, processes: int = 1) -> TrainConfig:
    """``cfg`` with ``steps`` computed from ``epochs`` (:func:`steps_for_epochs`); ``cfg`` itself without epochs."""
    if cfg.epochs is None:
        return cfg
    return dataclasses.replace(cfg, steps=steps_for_epochs(cfg, num_records, processes))


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
        if not args:
            return "a mapping"
        plural = _PLURALS.get(args[1])
        return (
            f"a mapping of names to {plural}" if plural else f"a mapping of names to values, each {describe(args[1])}"
        )
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
