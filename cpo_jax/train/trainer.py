"""Preference, SFT and reward-model training: the objectives of :class:`Trainer` on the one loop of
:mod:`cpo_jax.train.loop`.

``Trainer(cfg).run()`` resumes from the latest checkpoint in ``cfg.output_dir`` when there is one (same
command, same directory), trains to ``cfg.steps``, and exports the policy as an HF directory. A step reads
``grad_accum`` micro-batches of pairs, adds the reference log-probs (a frozen second model, a precomputed table,
or none) and runs the jitted :func:`cpo_jax.train.step.train_step`.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from cpo_jax.data import BatchConfig, TokenizeConfig
from cpo_jax.data.batching import ROW_KEYS, row_fill
from cpo_jax.parallel.multihost import host_to_global, lockstep
from cpo_jax.train import flops as flops_lib
from cpo_jax.train import weighted
from cpo_jax.train.config import TrainConfig
from cpo_jax.train.loop import TrainLoop
from cpo_jax.train.reference_cache import cache_key, compute_reference_logps, load_or_compute
from cpo_jax.train.stages import stage
from cpo_jax.train.step import eval_step, jit_train_step, model_of, starts_at_reference

log = logging.getLogger(__name__)


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


class Trainer(TrainLoop):
    """``loss.objective`` ``preference`` (any registered pairwise loss), ``sft`` or ``reward``."""

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, devices=None):
        super().__init__(cfg, tokenizer=tokenizer, devices=devices)
        params = {"model": self.initial_model_state}
        if cfg.loss.objective == "reward":
            head_sharding = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            params["head"] = jax.device_put(jnp.zeros((self.model_config.hidden_size,), jnp.float32), head_sharding)
        self.ref_params = None
        if cfg.loss.objective == "preference" and cfg.loss.reference == "separate":
            self.ref_params = self.load_reference()
        elif cfg.loss.objective == "preference" and cfg.loss.reference == "adapter":
            # The imported adapters as they start, frozen: a few MB on the shared base (arrays are immutable, and
            # the train state holds its own buffers).
            self.ref_params = {"model": self.initial_model_state}

        self.tokenize_cfg = TokenizeConfig(
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
            truncation=cfg.data.truncation,
            vocab_size=self.model_config.vocab_size,
        )
        self.batch_cfg = BatchConfig(
            pairs_per_batch=cfg.data.pairs_per_batch,
            max_length=cfg.data.max_length,
            pack=cfg.data.pack,
            rows_per_batch=cfg.data.rows_per_batch,
            pad_id=self.tokenizer.pad_token_id or 0,
        )
        self.check_lengths(self.train_set, "data.train_files")
        self.reference_table = self.eval_reference_table = None
        if cfg.loss.objective == "preference" and cfg.loss.reference == "precomputed":
            policy = self.policy_at_start()
            self.reference_table = self._precompute(policy, self.train_set)
            self.eval_reference_table = self._precompute(policy, self.eval_set) if self.eval_set else None

        # Built once: a jit of a fresh lambda per evaluate() call would recompile every time.
        self._eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg, graphdef=self.graphdef))
        self._step_fn = None
        self.peak_tflops = cfg.peak_tflops_per_device or flops_lib.peak_tflops(jax.devices()[0].device_kind)
        self._last_indexes: list[int] = []
        self.init_state(params, self.cfg.steps)  # with epochs, the steps TrainLoop computed
        del self.initial_model_state  # the state holds the parameters now

    # ----------------------------------------------------------------------------------------------
    def policy_at_start(self):
        return model_of(self.graphdef, self.initial_model_state, self.frozen)

    def _precompute(self, policy, records):
        key = cache_key(records.records, self.tokenizer, self.tokenize_cfg, self.model_path)
        with stage(f"reference log-probs of {len(records.records)} pairs (cached for reruns)"):
            return load_or_compute(
                self.output_dir / "reference_cache",
                key,
                lambda: compute_reference_logps(
                    policy,
                    records.records,
                    records.sources,
                    self.tokenizer,
                    self.tokenize_cfg,
                    self.batch_cfg,
                    chunk_size=self.cfg.model.logprob_chunk_size,
                ),
                rows=len(records.records),
            )

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
            out[key] = host_to_global(local, self.mesh, ("micro", "batch", "length"), batch_axis=1, rules=self.rules)
        return out

    # ----------------------------------------------------------------------------------------------
    def evaluate(self, params) -> dict:
        """Metrics over up to ``eval_batches`` batches of the held-out split: every metric a sum over the real
        pairs divided by their number (:mod:`cpo_jax.train.weighted`), so a short last batch weighs by its pairs."""
        if self.eval_set is None:
            return {}
        # The untrained state's weights are the reference's: its reference log-probs are its own (as in TRL, the
        # rewards before training are exactly 0).
        initial = (
            params is self.state.params and int(jax.device_get(self.state.step)) == 0 and starts_at_reference(self.cfg)
        )

        def batch_metrics(batch):
            batch = self._with_reference(batch, self.eval_reference_table)
            g = {k: v[0] for k, v in self._global(stack_micro_batches([batch], self.batch_cfg.pad_id)).items()}
            with self.activations():
                return jax.device_get(self._eval_fn(params, g, self.ref_params, initial, self.frozen))

        sums = weighted.total(
            batch_metrics(b) for b in lockstep(self._pipeline(self.eval_set, train=False), limit=self.cfg.eval_batches)
        )
        return {k: float(v) for k, v in weighted.means(sums).items()}

    def run_step(self, step: int, data) -> dict:
        """Read ``grad_accum`` micro-batches, take one optimiser step; metrics with throughput and MFU."""
        cfg = self.cfg
        micro = [self._with_reference(next(data), self.reference_table) for _ in range(cfg.grad_accum)]
        self._last_indexes = sorted(int(i) for b in micro for i in b["index"] if i >= 0)
        batch = self._global(stack_micro_batches(micro, self.batch_cfg.pad_id))
        if self._step_fn is None:
            ref_shardings = None if self.ref_params is None else jax.tree.map(lambda x: x.sharding, self.ref_params)
            frozen_shardings = None if self.frozen is None else jax.tree.map(self._sharding_of, self.frozen)
            self._step_fn = jit_train_step(
                cfg,
                self.graphdef,
                self.optimizer,
                self.schedule,
                self.state_shardings,
                {k: v.sharding for k, v in batch.items()},
                ref_shardings,
                frozen_shardings,
            )
        t0 = time.perf_counter()
        with self.activations():
            self.state, metrics = self._step_fn(self.state, batch, self.ref_params, self.frozen)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - t0
        tokens = int(metrics["tokens"])
        step_flops = flops_lib.step_flops(
            self.model_config,
            self.num_params,
            tokens,
            batch["input_ids"].shape[-1],
            reference_forward=self.ref_params is not None
            or (self.cfg.loss.objective == "preference" and self.cfg.loss.reference == "base"),
            frozen_base=self.frozen is not None,
        )
        metrics.update(step_time=elapsed, tokens_per_sec=tokens / elapsed, tflops_per_sec=step_flops / elapsed / 1e12)
        if self.peak_tflops:
            metrics["mfu"] = step_flops / elapsed / (self.peak_tflops * 1e12 * jax.device_count())
        return metrics

    def _sharding_of(self, x: jax.Array):
        """``x.sharding``; a typed PRNG key (the adapters' dropout streams) is replicated as a scalar."""
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return NamedSharding(self.mesh, jax.sharding.PartitionSpec(*([None] * x.ndim)))
        return x.sharding

    def diagnose(self, step: int, problem: str, metrics: dict) -> str:
        indexes = self._last_indexes
        sources = [self.train_set.sources[i] for i in indexes[:4] if i < len(self.train_set.sources)]
        return (
            f"{problem} (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}, "
            f"learning_rate={metrics['learning_rate']:.3g}). The last batch held {sources}"
            f"{' ...' if len(indexes) > 4 else ''}. The checkpoints on disk are from before it and intact."
        )
