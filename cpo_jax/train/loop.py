"""The one training loop that every objective runs through.

:class:`TrainLoop` owns what all runs share: the start (:func:`prepare_run`: validation, mesh, logical-axis
rules, the checkpoint directory with its changed-run refusal, the model path and tokenizer), loading the policy
and the train/eval records, the optimiser and train state, the output directory, restoring the newest intact
checkpoint, the step loop with its divergence diagnosis, the log/progress/eval/save cadence as hooks (as
Levanter's ``add_hook(fn, every=N)``), the HF export and the cleanup.

An objective is a small subclass that supplies only what is its own:

* ``run_step(step, data) -> metrics``: one optimiser step (or one RL rollout step) from the data iterator,
  updating ``self.state``;
* ``evaluate(params) -> metrics`` on the held-out split;
* ``extra_state()`` / ``load_extra_state(extra)``: what a checkpoint holds besides the train state and the data
  position (the RL trainer's adaptive KL coefficient);
* ``diagnose(step, problem, metrics)``: what the divergence message says about the last step.

:class:`cpo_jax.train.trainer.Trainer` (preference, SFT, reward) and :class:`cpo_jax.rlhf.trainer.RLTrainer`
(RLOO, GRPO, REINFORCE, PPO) are the two objectives today.

A checkpoint's data item is ``{"data": <data-iterator state>, **extra_state()}`` (per host); one written before
this layout (the bare iterator state of a preference run) is read as ``{"data": state}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cpo_jax.data import PipelineConfig, build_dataset, load_records
from cpo_jax.errors import CheckpointError, DataError, TrainingDiverged
from cpo_jax.hf.pretrained import from_pretrained, save_pretrained
from cpo_jax.hf.resolve import resolve_model_path
from cpo_jax.hf.tokenizer import load_tokenizer
from cpo_jax.parallel.sharding import activation_sharding, make_mesh, merge_rules
from cpo_jax.train import flops as flops_lib
from cpo_jax.train.checkpoint import Checkpointer
from cpo_jax.train.config import TrainConfig, resolve_epochs, to_dict
from cpo_jax.train.export import save_lora_spec, save_model_description
from cpo_jax.train.metrics_writer import MetricsWriter
from cpo_jax.train.optim import learning_rate_schedule, make_optimizer
from cpo_jax.train.resume import check_resume
from cpo_jax.train.stages import say, stage
from cpo_jax.train.step import init_state, model_of, state_shardings
from cpo_jax.train.validate import validate_config

log = logging.getLogger(__name__)

DIVERGENCE_HINT = (
    "lower optim.learning_rate, keep optim.max_grad_norm set, use float32 or bf16 instead of float16, "
    "or check the loss hyperparameters; the run resumes from its last checkpoint when rerun"
)


# ------------------------------------------------------------------------------------------------------------------
# The start of a run, before any model loads
def model_load_kwargs(cfg: TrainConfig, mesh) -> dict:
    """:func:`~cpo_jax.hf.pretrained.from_pretrained` keyword arguments for the ``model:`` section of ``cfg`` on
    ``mesh``, with the config's logical-axis rules (``mesh_rules`` over the defaults)."""
    kwargs = {
        "dtype": jnp.dtype(cfg.model.dtype),
        "param_dtype": jnp.dtype(cfg.model.param_dtype),
        "mesh": mesh,
        "rules": merge_rules(cfg.mesh_rules),
        "scan_layers": cfg.model.scan_layers,
        "remat": cfg.model.remat,
        "attention_impl": cfg.model.attention_impl,
    }
    if not cfg.model.freeze_padding_embedding:
        kwargs["padding_idx"] = None
    if cfg.model.router_aux_loss_coef is not None:
        kwargs["router_aux_loss_coef"] = cfg.model.router_aux_loss_coef
    return kwargs


def resume_check(cfg: TrainConfig, checkpointer: Checkpointer, saved: dict, step: int) -> None:
    """``check_config`` of :meth:`Checkpointer.restore_latest`: refuse a checkpoint of another run's config."""
    check_resume(saved, cfg, step=step, where=str(checkpointer.directory))


def refuse_changed_run(cfg: TrainConfig, checkpointer: Checkpointer) -> None:
    """Before any model loads: compare ``cfg`` with the config of the newest readable checkpoint, so a rerun that
    changed what the run means is refused in seconds (``restore_latest`` checks again, step by step)."""
    for step in sorted(checkpointer.manager.all_steps(), reverse=True):
        try:
            saved = checkpointer.read_config(step)
        except CheckpointError:
            continue  # damaged: restore_latest reports it and falls back
        resume_check(cfg, checkpointer, saved, step)
        return


class RunSetup(NamedTuple):
    """What a trainer holds before any model loads (see :func:`prepare_run`)."""

    mesh: jax.sharding.Mesh
    rules: dict
    checkpointer: Checkpointer
    model_path: Path
    tokenizer: object


def prepare_run(cfg: TrainConfig, devices=None, tokenizer=None) -> RunSetup:
    """The start every run shares, cheapest checks first, before any model loads: validate ``cfg``, build the
    mesh and its logical-axis rules, open the checkpoint directory and refuse a rerun whose config changed what the
    run means, resolve ``model.path`` (its config.json checked) and load its tokenizer unless one is given."""
    validate_config(cfg)
    mesh = make_mesh(cfg.mesh, devices)
    checkpointer = Checkpointer(
        Path(cfg.output_dir) / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints
    )
    refuse_changed_run(cfg, checkpointer)
    model_path = resolve_model_path(cfg.model.path)
    return RunSetup(
        mesh,
        merge_rules(cfg.mesh_rules),
        checkpointer,
        model_path,
        tokenizer if tokenizer is not None else load_tokenizer(model_path),
    )


def open_run(cfg: TrainConfig, output_dir: Path, start_step: int, model_path: Path) -> MetricsWriter:
    """Create ``output_dir``, write the resolved ``config.json`` and the policy's config and tokenizer
    (``model/``, what ``convert orbax-to-hf`` needs besides the checkpoint) on process 0, and open the metrics
    writer at ``start_step``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (output_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
        save_model_description(model_path, output_dir)
    return MetricsWriter(
        output_dir,
        total_steps=cfg.steps,
        start_step=start_step,
        tensorboard=cfg.tensorboard,
        wandb_project=cfg.wandb_project,
        progress_bar=cfg.progress_bar,
        config=to_dict(cfg),
    )


def divergence(cfg: TrainConfig, metrics: dict) -> str | None:
    """Why training must stop after a step with ``metrics``, or None: ``max_nonfinite_steps`` consecutive skipped
    non-finite steps, or an update larger than ``max_update_ratio`` times the parameters' norm (an explosion
    that produces no NaN)."""
    consecutive = int(metrics["nonfinite/consecutive"])
    if consecutive >= cfg.max_nonfinite_steps:
        return (
            f"{consecutive} consecutive non-finite steps (limit max_nonfinite_steps={cfg.max_nonfinite_steps}); "
            f"those updates were skipped, so the parameters are still finite"
        )
    ratio = float(metrics.get("update_ratio", 0.0))
    if cfg.max_update_ratio is not None and ratio > cfg.max_update_ratio:
        return (
            f"the update exploded: its norm is {ratio:.3g} x the parameters' norm "
            f"{float(metrics['param_norm']):.3g} (limit max_update_ratio={cfg.max_update_ratio})"
        )
    return None


def lora_spec_of(cfg: TrainConfig):
    """The :class:`~cpo_jax.models.lora.LoraSpec` of ``model.lora`` (None without the section)."""
    from cpo_jax.models.lora import LoraSpec

    lora = cfg.model.lora
    if lora is None:
        return None
    return LoraSpec(
        rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets, use_rslora=lora.use_rslora
    )


def attach_adapters(policy, cfg: TrainConfig, *, read_weights: bool = True):
    """Give ``policy`` its adapters, in place: the PEFT adapter of ``model.adapter_path`` (whose settings must agree
    with a ``model.lora`` section, when one is given), or fresh ones (``B = 0``) of ``model.lora``. Returns their
    :class:`~cpo_jax.models.lora.LoraSpec`, or None for full fine-tuning.

    ``read_weights=False`` (shapes only, e.g. under ``nnx.eval_shape``): an imported adapter is added fresh with its
    settings from ``adapter_config.json``, its tensors unread."""
    from cpo_jax.errors import ConfigError
    from cpo_jax.hf.peft import add_adapter, load_adapter, read_adapter_spec

    wanted = lora_spec_of(cfg)
    rngs = nnx.Rngs(params=cfg.seed, dropout=jax.random.fold_in(jax.random.key(cfg.seed), 1))
    if cfg.model.adapter_path is None:
        if wanted is not None:
            add_adapter(policy, wanted, rngs=rngs)
        return wanted
    if read_weights:
        spec = load_adapter(policy, cfg.model.adapter_path, rngs=rngs)
    else:
        spec = read_adapter_spec(policy.config, cfg.model.adapter_path)
        add_adapter(policy, spec, rngs=rngs)
    if wanted is not None:
        for key in ("rank", "alpha", "dropout", "targets", "use_rslora"):
            ours, theirs = getattr(wanted, key), getattr(spec, key)
            if key == "targets" and ours is None:
                continue
            if (sorted(ours) if key == "targets" else ours) != (sorted(theirs) if key == "targets" else theirs):
                raise ConfigError(
                    f"is {ours!r}, but the adapter in model.adapter_path has {theirs!r}",
                    where=f"config key model.lora.{key}",
                    hint="remove the model.lora section to take the adapter's own settings",
                )
    return spec


def adapt_policy(policy, cfg: TrainConfig, *, read_weights: bool = True):
    """The ``model:`` section's adapters (:func:`attach_adapters`), then its QLoRA quantisation of the base, applied to
    ``policy`` in place; the adapters' spec or None. ``read_weights=False``: shapes only (``nnx.eval_shape``)."""
    spec = attach_adapters(policy, cfg, read_weights=read_weights)
    if cfg.model.quantize != "none":  # the frozen base in nf4/int8 from here on (adapters stay as they are)
        from cpo_jax.models.quantize import quantize_model

        quantize_model(policy, cfg.model.quantize)
    return spec


def checkpoint_extra(saved: dict | None) -> dict | None:
    """A checkpoint's data item as ``{"data": iterator state, ...}``; a preference checkpoint written before the
    one loop stored the bare iterator state."""
    if saved is None or "data" in saved:
        return saved
    return {"data": saved}


# ------------------------------------------------------------------------------------------------------------------
# Hooks
@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees after a step: the step count (1-based, after the update), its host metrics and the loop."""

    step: int
    metrics: dict
    loop: TrainLoop


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(info)`` every ``every`` steps, and after the final step too when ``at_end``."""

    fn: Callable[[StepInfo], Any]
    every: int
    at_end: bool = False

    def due(self, step: int, last: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == last)


@dataclasses.dataclass
class RunResult:
    """What a run did: the logged records (this invocation) and where it stopped."""

    history: list[dict]
    start_step: int
    final_step: int
    output_dir: Path


class TrainLoop:
    """The loop and everything a run shares; subclasses supply an objective (see the module docstring).

    After ``__init__``: ``cfg``, ``output_dir``, ``mesh``, ``rules``, ``checkpointer``, ``model_path``,
    ``tokenizer``, ``graphdef`` and ``model_config`` of the policy, ``train_set``/``eval_set`` records; the
    subclass then calls :meth:`init_state` to create ``state`` (and ``optimizer``, ``schedule``,
    ``state_shardings``)."""

    #: ``"preference"`` or ``"prompt_only"``: how data files are read.
    record_kind: ClassVar[str] = "preference"
    #: What the records are called in messages.
    record_noun: ClassVar[str] = "pairs"
    #: The metric the progress bar shows.
    progress_metric: ClassVar[str] = "loss"
    divergence_hint: ClassVar[str] = DIVERGENCE_HINT

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, devices=None):
        self.cfg = cfg
        train_set = None
        if cfg.epochs is not None:  # steps from the train set's size, before the config is compared or saved
            validate_config(cfg)
            train_set = self.load_split(cfg.data.train_files)
            self.cfg = cfg = resolve_epochs(cfg, len(train_set.records), jax.process_count())
            say("epochs=%g over %d training records: %d steps", cfg.epochs, len(train_set.records), cfg.steps)
        self.output_dir = Path(cfg.output_dir)
        self.mesh, self.rules, self.checkpointer, self.model_path, self.tokenizer = prepare_run(cfg, devices, tokenizer)
        self.model_kwargs = model_load_kwargs(cfg, self.mesh)
        with stage(f"loading the model from {self.model_path}"):
            policy = from_pretrained(self.model_path, **self.model_kwargs)
        self.model_config = policy.config
        self.lora_spec = adapt_policy(policy, cfg)
        if self.lora_spec is None:  # full fine-tuning: every weight trains
            self.graphdef, self.initial_model_state = nnx.split(policy)
            self.frozen = None
        else:  # only the adapters train; the base is held once, frozen (and is the reference with loss.reference=base)
            self.graphdef, self.initial_model_state, self.frozen = nnx.split(policy, nnx.LoRAParam, ...)
        self.num_params = flops_lib.count_params(policy)
        self.train_set = train_set if train_set is not None else self.load_split(cfg.data.train_files)
        self.eval_set = self.load_split(cfg.data.eval_files) if cfg.data.eval_files else None
        self._hooks: list[Hook] = []

    # -------------------------------------------------------------------------------------------- set-up helpers
    def load_split(self, files):
        return load_records(
            list(files), self.record_kind, skip_invalid=self.cfg.data.skip_invalid, split=self.cfg.data.split
        )

    def load_reference(self) -> dict:
        """A second copy of the policy's initial weights (the frozen reference), in the policy's sharding."""
        return {"model": nnx.split(from_pretrained(self.model_path, **self.model_kwargs))[1]}

    def init_state(self, params, num_updates: int) -> None:
        """The optimiser (its schedule over ``num_updates``) and a fresh train state for ``params``."""
        self.schedule = learning_rate_schedule(self.cfg.optim, num_updates)
        self.optimizer = make_optimizer(self.cfg.optim, num_updates)
        init = lambda p: init_state(p, self.optimizer, self.cfg.seed)  # noqa: E731
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        shardings = state_shardings(
            jax.tree.map(lambda x: x.sharding, params), self.optimizer, jax.eval_shape(init, params), replicated
        )
        self.state = jax.jit(init, out_shardings=shardings)(params)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)

    def check_lengths(self, records, key: str, sample: int = 2000) -> None:
        """Tokenise up to ``sample`` records: fail if the length policy drops all of them, warn on drops."""
        from cpo_jax.data import audit

        report = audit(
            records.records[:sample],
            self.tokenizer,
            self.tokenize_cfg,
            PipelineConfig(kind=self.record_kind, shard_index=0, shard_count=1),
            sources=records.sources[:sample],
        )
        if report.kept == 0:
            raise DataError(
                f"config key {key}",
                f"all {report.examples} checked {self.record_noun} are dropped ({dict(report.dropped)})",
                hint=self.drop_hint(report.dropped),
            )
        if report.dropped:
            log.warning(
                "%s: %d of the first %d %s are dropped (%s)",
                key,
                sum(report.dropped.values()),
                report.examples,
                self.record_noun,
                dict(report.dropped),
            )

    def drop_hint(self, dropped: dict) -> str:
        """What to do when the tokeniser drops every record, by the reasons counted in ``dropped``."""
        if set(dropped) <= {"identical_pair"}:
            return "every pair has chosen == rejected; check how the data file was built"
        return (
            f"raise data.max_length (now {self.cfg.data.max_length}) or data.max_prompt_length (now "
            f"{self.tokenize_cfg.prompt_limit}), or check that the data file holds what you expect"
        )

    def pipeline_config(self, *, train: bool) -> PipelineConfig:
        data = self.cfg.data
        return PipelineConfig(
            kind=self.record_kind,
            seed=data.seed,
            shuffle=train,
            num_epochs=None if train else 1,
            num_workers=data.num_workers if train else 0,
        )

    def _pipeline(self, records, *, train: bool):
        return build_dataset(
            records.records,
            self.tokenizer,
            self.tokenize_cfg,
            self.batch_cfg,
            self.pipeline_config(train=train),
            sources=records.sources,
        )

    # -------------------------------------------------------------------------------------------- the objective
    def run_step(self, step: int, data) -> dict:
        """One step (0-based ``step``) from the data iterator ``data``: update ``self.state``; host metrics."""
        raise NotImplementedError

    def evaluate(self, params) -> dict:
        """Metrics of ``params`` on the held-out split (``{}`` without one)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """What a checkpoint holds besides the train state and the data position (JSON-serialisable)."""
        return {}

    def load_extra_state(self, extra: dict) -> None:
        """Restore what :meth:`extra_state` saved."""

    def diagnose(self, step: int, problem: str, metrics: dict) -> str:
        """The divergence message after ``step``."""
        return (
            f"{problem} (loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}). "
            f"The checkpoints on disk are from before it and intact."
        )

    # -------------------------------------------------------------------------------------------- the loop
    def add_hook(self, fn: Callable[[StepInfo], Any], *, every: int = 1, at_end: bool = False) -> None:
        """Call ``fn(StepInfo)`` after every ``every``-th step (and after the last one when ``at_end``), after
        the built-in log, progress, eval and save hooks."""
        if every < 0:
            raise ValueError(f"every={every}: expected a number of steps >= 0")
        self._hooks.append(Hook(fn, every, at_end))

    def _built_in_hooks(self, writer: MetricsWriter, data, history: list[dict]) -> list[Hook]:
        cfg = self.cfg

        def log_metrics(info: StepInfo):
            history.append(writer.write(info.step, info.metrics))

        def progress(info: StepInfo):
            writer.advance(info.step, float(info.metrics[self.progress_metric]))

        def evaluate(info: StepInfo):
            writer.write(info.step, self.evaluate(self.state.params), prefix="eval/")

        def save(info: StepInfo):
            self.checkpointer.save(
                info.step, self.state, {"data": data.get_state(), **self.extra_state()}, to_dict(cfg)
            )

        return [
            Hook(log_metrics, cfg.log_every, at_end=True),
            Hook(progress, 1),
            Hook(evaluate, cfg.eval_every),
            Hook(save, cfg.save_every, at_end=True),
        ]

    def run(self) -> RunResult:
        """Train from the newest intact checkpoint (or from scratch) to ``cfg.steps``, export, clean up."""
        cfg = self.cfg
        data = iter(self._pipeline(self.train_set, train=True))
        writer = None
        history: list[dict] = []
        step = start = 0
        try:
            start, extra = self.restore_latest()
            if start:
                data.set_state(extra["data"])
                say("resuming from step %d of %d in %s", start, cfg.steps, self.output_dir)
            writer = open_run(cfg, self.output_dir, start, self.model_path)
            if self.lora_spec is not None and jax.process_index() == 0:
                save_lora_spec(self.lora_spec, self.output_dir)
            hooks = self._built_in_hooks(writer, data, history) + self._hooks
            step = start
            while step < cfg.steps:
                metrics = self.run_step(step, data)
                step += 1
                problem = divergence(cfg, metrics)
                if problem:
                    raise TrainingDiverged(
                        self.diagnose(step, problem, metrics),
                        where=f"step {step} of {self.output_dir}",
                        hint=self.divergence_hint,
                    )
                info = StepInfo(step, metrics, self)
                for hook in hooks:
                    if hook.due(step, cfg.steps):
                        hook.fn(info)
            self.checkpointer.wait()
            if cfg.export_hf:
                with stage(f"exporting {self.output_dir / 'hf'}"):
                    self.export(self.output_dir / "hf")
        finally:
            if writer is not None:
                writer.close()
            self.checkpointer.wait()
            if hasattr(data, "close"):
                data.close()
        return RunResult(history=history, start_step=start, final_step=step, output_dir=self.output_dir)

    def restore_latest(self) -> tuple[int, dict | None]:
        """Load the newest intact checkpoint of ``output_dir`` into ``self.state`` (and :meth:`load_extra_state`);
        ``(step, {"data": ..., **extra})`` or ``(0, None)``. A checkpoint saved under a config that changes the
        run's meaning is refused (:func:`cpo_jax.train.resume.check_resume`)."""
        step, self.state, saved = self.checkpointer.restore_latest(
            self.state, self.state_shardings, check_config=functools.partial(resume_check, self.cfg, self.checkpointer)
        )
        extra = checkpoint_extra(saved)
        if step:
            self.load_extra_state(extra)
        return step, extra

    def activations(self):
        """The context the jitted steps are called in: :func:`cpo_jax.parallel.constrain` pins activations (the
        residual stream at each block) on the run's mesh by its rules while they are traced. Every call of a jitted
        step goes through it, so each compiles once (``jax.jit`` keys its cache on the mesh context)."""
        return activation_sharding(self.mesh, self.rules)

    def policy(self):
        """The current policy as an NNX model (with its adapters, when they train)."""
        return model_of(self.graphdef, self.state.params["model"], self.frozen)

    def export(self, path) -> Path:
        """Write the current policy as an HF directory (with the tokenizer). A reward model (``params["head"]``)
        is written as ``*ForSequenceClassification`` with ``num_labels=1``, its head as ``score.weight``; other
        heads (the PPO value head) are not part of the export. With adapters, ``path`` holds the merged weights
        (``W + scale * A @ B``) and ``path``'s sibling ``<name>_adapter`` the adapters in PEFT's format."""
        policy = self.policy()
        if self.lora_spec is None:
            return save_pretrained(policy, path, tokenizer=self.tokenizer, score_head=self.state.params.get("head"))
        from cpo_jax.hf.peft import save_adapter
        from cpo_jax.models.lora import merge_lora

        path = Path(path)
        save_adapter(
            policy, self.lora_spec, path.with_name(path.name + "_adapter"), base_model_name_or_path=self.cfg.model.path
        )
        return save_pretrained(
            merge_lora(policy), path, tokenizer=self.tokenizer, score_head=self.state.params.get("head")
        )
