"""The training loop: mesh -> model(s) -> data -> jitted steps -> metrics / evaluation / checkpoints.

``Trainer(cfg).run()`` resumes from the latest checkpoint in ``cfg.output_dir`` when there is one (same
command, same directory), trains to ``cfg.steps``, and exports the policy as an HF directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from cpo_jax.data import BatchConfig, PipelineConfig, TokenizeConfig, build_dataset, load_records
from cpo_jax.data.batching import ROW_KEYS, row_fill
from cpo_jax.errors import CheckpointError, DataError, TrainingDiverged
from cpo_jax.hf.pretrained import from_pretrained, save_pretrained
from cpo_jax.hf.resolve import resolve_model_path
from cpo_jax.hf.tokenizer import load_tokenizer
from cpo_jax.parallel.multihost import host_to_global, lockstep
from cpo_jax.parallel.sharding import make_mesh, merge_rules
from cpo_jax.train import flops as flops_lib
from cpo_jax.train.checkpoint import Checkpointer
from cpo_jax.train.config import TrainConfig, to_dict
from cpo_jax.train.export import save_model_description
from cpo_jax.train.metrics_writer import MetricsWriter
from cpo_jax.train.optim import learning_rate_schedule, make_optimizer
from cpo_jax.train.reference_cache import cache_key, compute_reference_logps, load_or_compute
from cpo_jax.train.resume import check_resume
from cpo_jax.train.step import eval_step, init_state, jit_train_step
from cpo_jax.train.validate import validate_config

log = logging.getLogger(__name__)



def model_load_kwargs(cfg: TrainConfig, mesh) -> dict:
    """:func:`~cpo_jax.hf.pretrained.from_pretrained` keyword arguments for the ``model:`` section of ``cfg`` on
    ``mesh``, with the config's logical-axis rules (``mesh_rules`` over the defaults)."""
    rules = merge_rules(cfg.mesh_rules)
    kwargs = {"dtype": jnp.dtype(cfg.model.dtype), "param_dtype": jnp.dtype(cfg.model.param_dtype), "mesh": mesh,
              "rules": rules, "scan_layers": cfg.model.scan_layers, "remat": cfg.model.remat,
              "attention_impl": cfg.model.attention_impl}
    if not cfg.model.freeze_padding_embedding:
        kwargs["padding_idx"] = None
    return kwargs


def open_run(cfg: TrainConfig, output_dir: Path, start_step: int, model_path: Path) -> MetricsWriter:
    """Create ``output_dir``, write the resolved ``config.json`` and the policy's config and tokenizer
    (``model/``, what ``convert orbax-to-hf`` needs besides the checkpoint) on process 0, and open the metrics
    writer at ``start_step``: the start of both trainers' ``run()``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (output_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
        save_model_description(model_path, output_dir)
    return MetricsWriter(output_dir, total_steps=cfg.steps, start_step=start_step, tensorboard=cfg.tensorboard,
                         wandb_project=cfg.wandb_project, progress_bar=cfg.progress_bar, config=to_dict(cfg))


def stack_micro_batches(batches: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """Stack micro-batches on a new leading axis, padding row length to the longest (bucketed) one."""
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        arrays = []
        for b in batches:
            x = b[key]
            if key in ROW_KEYS and x.shape[1] < length:
                x = np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=row_fill(key, pad_id))
            arrays.append(x)
        out[key] = np.stack(arrays)
    return out


DIVERGENCE_HINT = ("lower optim.learning_rate, keep optim.max_grad_norm set, use float32 or bf16 instead of float16, "
                   "or check the loss hyperparameters; the run resumes from its last checkpoint when rerun")


def divergence(cfg: TrainConfig, metrics: dict) -> str | None:
    """Why training must stop after a step with ``metrics``, or None: ``max_nonfinite_steps`` consecutive skipped
    non-finite steps, or an update larger than ``max_update_ratio`` times the parameters' norm (an explosion
    that produces no NaN)."""
    consecutive = int(metrics["nonfinite/consecutive"])
    if consecutive >= cfg.max_nonfinite_steps:
        return (f"{consecutive} consecutive non-finite steps (limit max_nonfinite_steps={cfg.max_nonfinite_steps}); "
                f"those updates were skipped, so the parameters are still finite")
    ratio = float(metrics.get("update_ratio", 0.0))
    if cfg.max_update_ratio is not None and ratio > cfg.max_update_ratio:
        return (f"the update exploded: its norm is {ratio:.3g} x the parameters' norm "
                f"{float(metrics['param_norm']):.3g} (limit max_update_ratio={cfg.max_update_ratio})")
    return None


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
    """The start both trainers share, cheapest checks first, before any model loads: validate ``cfg``, build the
    mesh and its logical-axis rules, open the checkpoint directory and refuse a rerun whose config changed what the
    run means, resolve ``model.path`` (its config.json checked) and load its tokenizer unless one is given."""
    validate_config(cfg)
    mesh = make_mesh(cfg.mesh, devices)
    checkpointer = Checkpointer(Path(cfg.output_dir) / "checkpoints", keep=cfg.keep_checkpoints,
                                async_save=cfg.async_checkpoints)
    refuse_changed_run(cfg, checkpointer)
    model_path = resolve_model_path(cfg.model.path)
    return RunSetup(mesh, merge_rules(cfg.mesh_rules), checkpointer, model_path,
                    tokenizer if tokenizer is not None else load_tokenizer(model_path))


def drop_hint(dropped: dict, max_length: int, prompt_limit: int) -> str:
    """What to do when the tokeniser drops every example, by the reasons counted in ``dropped``."""
    if set(dropped) <= {"identical_pair"}:
        return "every pair has chosen == rejected; check how the data file was built"
    return (f"raise data.max_length (now {max_length}) or data.max_prompt_length (now {prompt_limit}), "
            f"or check that the data file holds what you expect")


@dataclasses.dataclass
class RunResult:
    """What a run did: the logged records (this invocation) and where it stopped."""

    history: list[dict]
    start_step: int
    final_step: int
    output_dir: Path


class Trainer:
    """Builds everything from a :class:`TrainConfig`; ``run()`` trains."""

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, devices=None):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.mesh, self.rules, self.checkpointer, self.model_path, self.tokenizer = prepare_run(cfg, devices,
                                                                                                tokenizer)
        model_kw = model_load_kwargs(cfg, self.mesh)
        policy = from_pretrained(self.model_path, **model_kw)
        self.model_config = policy.config
        self.graphdef, model_state = nnx.split(policy)
        self.params = {"model": model_state}
        if cfg.loss.objective == "reward":
            head_sharding = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            self.params["head"] = jax.device_put(jnp.zeros((policy.config.hidden_size,), jnp.float32), head_sharding)
        self.ref_params = None
        if cfg.loss.objective == "preference" and cfg.loss.reference == "separate":
            self.ref_params = {"model": nnx.split(from_pretrained(self.model_path, **model_kw))[1]}
        self.num_params = sum(x.size for x in jax.tree.leaves(model_state))

        self.tokenize_cfg = TokenizeConfig(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                                           truncation=cfg.data.truncation, vocab_size=policy.config.vocab_size)
        self.batch_cfg = BatchConfig(pairs_per_batch=cfg.data.pairs_per_batch, max_length=cfg.data.max_length,
                                     pack=cfg.data.pack, rows_per_batch=cfg.data.rows_per_batch,
                                     pad_id=self.tokenizer.pad_token_id or 0)
        self.train_set = load_records(list(cfg.data.train_files), "preference", skip_invalid=cfg.data.skip_invalid,
                                      split=cfg.data.split)
        self.eval_set = (load_records(list(cfg.data.eval_files), "preference", skip_invalid=cfg.data.skip_invalid,
                                      split=cfg.data.split) if cfg.data.eval_files else None)
        self._check_lengths(self.train_set, "data.train_files")
        self.reference_table = self.eval_reference_table = None
        if cfg.loss.objective == "preference" and cfg.loss.reference == "precomputed":
            self.reference_table = self._precompute(policy, self.train_set)
            self.eval_reference_table = self._precompute(policy, self.eval_set) if self.eval_set else None

        # Built once: a jit of a fresh lambda per evaluate() call would recompile every time.
        self._eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg, graphdef=self.graphdef))
        self.schedule = learning_rate_schedule(cfg.optim, cfg.steps)
        self.optimizer = make_optimizer(cfg.optim, cfg.steps)
        self.state = jax.jit(lambda p: init_state(p, self.optimizer, cfg.seed))(self.params)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)

    # ----------------------------------------------------------------------------------------------
    def _check_lengths(self, records, key: str, sample: int = 2000) -> None:
        """Tokenise up to ``sample`` records: fail if the length policy drops all of them, warn on drops."""
        from cpo_jax.data import audit

        subset = records.records[:sample]
        report = audit(subset, self.tokenizer, self.tokenize_cfg, PipelineConfig(shard_index=0, shard_count=1),
                       sources=records.sources[:sample])
        if report.kept == 0:
            raise DataError(f"config key {key}", f"all {report.examples} checked pairs are dropped "
                            f"({dict(report.dropped)})", hint=drop_hint(report.dropped, self.cfg.data.max_length,
                                                                         self.tokenize_cfg.prompt_limit))
        if report.dropped:
            log.warning("%s: %d of the first %d pairs are dropped (%s)", key,
                        sum(report.dropped.values()), report.examples, dict(report.dropped))

    def _precompute(self, policy, records):
        key = cache_key(records.records, self.tokenizer, self.tokenize_cfg, self.model_path)
        return load_or_compute(self.output_dir / "reference_cache", key, lambda: compute_reference_logps(
            policy, records.records, records.sources, self.tokenizer, self.tokenize_cfg, self.batch_cfg,
            chunk_size=self.cfg.model.logprob_chunk_size), rows=len(records.records))

    def _pipeline(self, records, *, train: bool):
        cfg = self.cfg
        pipe = PipelineConfig(kind="preference", seed=cfg.data.seed, shuffle=train, num_epochs=None if train else 1,
                              num_workers=cfg.data.num_workers if train else 0)
        return build_dataset(records.records, self.tokenizer, self.tokenize_cfg, self.batch_cfg, pipe,
                             sources=records.sources)

    def _with_reference(self, batch: dict, table) -> dict:
        if table is None:
            return batch
        idx = np.maximum(batch["index"], 0)
        batch = dict(batch)
        batch["ref_chosen"] = np.where(batch["pair_mask"], table[idx, 0], 0.0).astype(np.float32)
        batch["ref_rejected"] = np.where(batch["pair_mask"], table[idx, 1], 0.0).astype(np.float32)
        return batch

    def _global(self, batch: dict) -> dict:
        """Process-local numpy micro-batches ``[M, ...]`` -> global arrays sharded over the batch axes."""
        out = {}
        pairs = batch["pair_mask"].shape[-1]
        for key, local in batch.items():
            if key == "sequence_ids":  # local slots -> global slots (process p holds pairs [p*P, (p+1)*P))
                local = np.where(local >= 0, local + jax.process_index() * 2 * pairs, local)
            out[key] = host_to_global(local, self.mesh, ("micro", "batch", "length"), batch_axis=1,
                                      rules=self.rules)
        return out

    def _shardings_of(self, batch: dict) -> dict:
        return {k: v.sharding for k, v in batch.items()}

    # ----------------------------------------------------------------------------------------------
    def evaluate(self, params) -> dict:
        """Mean metrics over up to ``eval_batches`` batches of the held-out split (weighted by pairs)."""
        if self.eval_set is None:
            return {}
        sums: dict[str, float] = {}
        pairs = 0.0
        # The untrained state's weights are the reference's: its reference log-probs are its own (as in TRL, the
        # rewards before training are exactly 0).
        initial = params is self.state.params and int(jax.device_get(self.state.step)) == 0
        for batch in lockstep(self._pipeline(self.eval_set, train=False), limit=self.cfg.eval_batches):
            batch = self._with_reference(batch, self.eval_reference_table)
            g = {k: v[0] for k, v in self._global(stack_micro_batches([batch], self.batch_cfg.pad_id)).items()}
            metrics = jax.device_get(self._eval_fn(params, g, self.ref_params, initial))
            n = float(metrics.pop("pairs"))
            if n == 0:  # every process had run out but one: nothing real in this global batch
                continue
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            pairs += n
        return {k: v / max(pairs, 1.0) for k, v in sums.items()}

    def run(self) -> RunResult:
        """Train from the latest checkpoint (or from scratch) to ``cfg.steps``; returns what was logged."""
        cfg = self.cfg
        data = iter(self._pipeline(self.train_set, train=True))
        start, data_state = self.restore_latest()
        if start:
            data.set_state(data_state)
            log.info("resumed from step %d in %s", start, self.output_dir)
        writer = open_run(cfg, self.output_dir, start, self.model_path)
        peak = cfg.peak_tflops_per_device or flops_lib.peak_tflops(jax.devices()[0].device_kind)
        step_fn = None
        history = []
        step = start
        try:
            while step < cfg.steps:
                micro = [self._with_reference(next(data), self.reference_table) for _ in range(cfg.grad_accum)]
                batch = self._global(stack_micro_batches(micro, self.batch_cfg.pad_id))
                if step_fn is None:
                    step_fn = jit_train_step(cfg, self.graphdef, self.optimizer, self.schedule, self.state_shardings,
                                             self._shardings_of(batch),
                                             None if self.ref_params is None else jax.tree.map(
                                                 lambda x: x.sharding, self.ref_params))
                t0 = time.perf_counter()
                self.state, metrics = step_fn(self.state, batch, self.ref_params)
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - t0
                step += 1
                problem = divergence(cfg, metrics)
                if problem:
                    raise TrainingDiverged(self._diagnosis(step, problem, metrics, micro),
                                           where=f"step {step} of {self.output_dir}", hint=DIVERGENCE_HINT)
                tokens = int(metrics["tokens"])
                row_length = batch["input_ids"].shape[-1]
                step_flops = flops_lib.step_flops(self.model_config, self.num_params, tokens, row_length,
                                                  reference_forward=self.ref_params is not None)
                metrics.update(step_time=elapsed, tokens_per_sec=tokens / elapsed,
                               tflops_per_sec=step_flops / elapsed / 1e12)
                if peak:
                    metrics["mfu"] = step_flops / elapsed / (peak * 1e12 * jax.device_count())
                if step % cfg.log_every == 0 or step == cfg.steps:
                    history.append(writer.write(step, metrics))
                writer.advance(step, float(metrics["loss"]))
                if cfg.eval_every and step % cfg.eval_every == 0:
                    writer.write(step, self.evaluate(self.state.params), prefix="eval/")
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self.checkpointer.save(step, self.state, data.get_state(), to_dict(cfg))
            self.checkpointer.wait()
            if cfg.export_hf:
                self.export(self.output_dir / "hf")
        finally:
            writer.close()
            self.checkpointer.wait()
            if hasattr(data, "close"):
                data.close()
        return RunResult(history=history, start_step=start, final_step=step, output_dir=self.output_dir)

    def restore_latest(self) -> tuple[int, dict | None]:
        """Load the newest intact checkpoint of ``output_dir`` into ``self.state``; ``(step, data state)`` or
        ``(0, None)``. A checkpoint saved under a config that changes the run's meaning is refused
        (:func:`cpo_jax.train.resume.check_resume`)."""
        step, self.state, data_state = self.checkpointer.restore_latest(
            self.state, self.state_shardings, check_config=functools.partial(resume_check, self.cfg, self.checkpointer))
        return step, data_state

    def policy(self):
        """The current policy as an NNX model."""
        return nnx.merge(self.graphdef, self.state.params["model"])

    def _diagnosis(self, step: int, problem: str, metrics: dict, micro: list[dict]) -> str:
        indexes = sorted(int(i) for b in micro for i in b["index"] if i >= 0)
        sources = [self.train_set.sources[i] for i in indexes[:4] if i < len(self.train_set.sources)]
        return (f"{problem} (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}, "
                f"learning_rate={metrics['learning_rate']:.3g}). The last batch held {sources}"
                f"{' ...' if len(indexes) > 4 else ''}. The checkpoints on disk are from before it and intact.")

    def export(self, path) -> Path:
        """Write the current policy as an HF directory (with the tokenizer).

        A reward model (``loss.objective: reward``) is written as ``*ForSequenceClassification`` with
        ``num_labels=1``, its head as ``score.weight``.
        """
        model = nnx.merge(self.graphdef, self.state.params["model"])
        return save_pretrained(model, path, tokenizer=self.tokenizer, score_head=self.state.params.get("head"))
