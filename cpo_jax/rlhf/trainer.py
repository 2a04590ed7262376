"""The on-policy loop: prompts -> sample K completions -> score -> log-probs -> RLOO/GRPO/PPO update.

``RLTrainer(cfg).run()`` mirrors :class:`cpo_jax.train.trainer.Trainer`: it resumes from the latest checkpoint in
``cfg.output_dir`` (the KL coefficient of an adaptive controller included), logs TRL/verl metric names
to ``metrics.jsonl`` and TensorBoard, evaluates greedy completions of ``data.eval_files`` with the reward,
and exports the policy as an HF directory. The policy parameters live once, in the train state, in the
mesh sharding; sampling reads them in place.

Several hosts. Each process reads its own shard of the prompts (``P = rl.prompts_per_step`` each, so a
step samples ``P * process_count * K`` completions). Sampling, scoring passes and updates are global jitted
calls on the one mesh. The completions are all-gathered so that every process decodes and scores the whole
batch (the reward needs no cross-host transfer of text, and a learned reward model is called with the same
rows everywhere); the rewards go back onto the mesh in the batch sharding. Evaluation runs the processes'
eval shards in lockstep, padding the shorter ones.

Per step, the wall time is split into ``timing_s/gen`` (sampling), ``timing_s/reward`` (decoding and
scoring on the host), ``timing_s/old_log_prob`` (policy and reference scoring passes + advantages) and
``timing_s/update_actor``; ``perf/rollout_tokens_per_sec`` counts generated tokens per second of sampling.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpo_jax.data import (
    BatchConfig,
    PipelineConfig,
    TokenizeConfig,
    build_dataset,
    load_records,
)
from cpo_jax.errors import ConfigError, DataError, TrainingDiverged
from cpo_jax.hf.pretrained import from_pretrained, save_pretrained
from cpo_jax.models.generate import SamplingConfig
from cpo_jax.parallel.multihost import global_to_host, host_to_global, host_value_to_global, lockstep
from cpo_jax.rlhf.algorithms import adaptive_kl_coef
from cpo_jax.rlhf.rewards import RewardFunction, make_reward
from cpo_jax.rlhf.rollout import init_value_head, sample
from cpo_jax.rlhf.step import jit_score, jit_update
from cpo_jax.train.config import TrainConfig, to_dict
from cpo_jax.train.optim import learning_rate_schedule, make_optimizer
from cpo_jax.train.step import init_state
from cpo_jax.train.trainer import (
    DIVERGENCE_HINT,
    RunResult,
    divergence,
    model_load_kwargs,
    open_run,
    prepare_run,
    resume_check,
)

log = logging.getLogger(__name__)


class RLTrainer:
    """Builds the policy, reference, reward and prompt pipeline from a :class:`TrainConfig`; ``run()`` trains."""

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, devices=None, reward: RewardFunction | None = None):
        self.cfg = cfg
        self.rl = cfg.rl
        self.output_dir = Path(cfg.output_dir)
        if cfg.loss.objective != "rlhf":
            raise ConfigError(f"RLTrainer trains loss.objective=rlhf, not {cfg.loss.objective!r}",
                              where="config key loss.objective", hint="use cpo_jax.train.trainer.Trainer for it")
        self.mesh, self.rules, self.checkpointer, self.model_path, tokenizer = prepare_run(cfg, devices, tokenizer)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        model_kw = model_load_kwargs(cfg, self.mesh)
        policy = from_pretrained(self.model_path, **model_kw)
        self.model_config = policy.config
        self.graphdef, model_state = nnx.split(policy)
        params = {"model": model_state}
        if self.rl.algorithm == "ppo":
            params["value_head"] = jax.tree.map(
                lambda x: host_value_to_global(np.asarray(x), self.mesh, (None,), rules=self.rules),
                init_value_head(policy.config.hidden_size))
        self.ref_params = {"model": nnx.split(from_pretrained(self.model_path, **model_kw))[1]}
        self.num_params = sum(x.size for x in jax.tree.leaves(model_state))

        self.prompt_length = cfg.data.max_prompt_length or cfg.data.max_length - self.rl.max_new_tokens
        self.tokenize_cfg = TokenizeConfig(max_length=self.prompt_length + self.rl.max_new_tokens,
                                           max_prompt_length=self.prompt_length, vocab_size=policy.config.vocab_size)
        # Every prompt fits the first bucket, so prompt batches have one static shape [P, prompt_length].
        self.batch_cfg = BatchConfig(pairs_per_batch=self.rl.prompts_per_step, max_length=self.tokenize_cfg.max_length,
                                     buckets=(self.prompt_length, self.tokenize_cfg.max_length), pad_id=self.pad_id)
        self.train_set = load_records(list(cfg.data.train_files), "prompt_only", skip_invalid=cfg.data.skip_invalid,
                                      split=cfg.data.split)
        self.eval_set = (load_records(list(cfg.data.eval_files), "prompt_only", skip_invalid=cfg.data.skip_invalid,
                                      split=cfg.data.split) if cfg.data.eval_files else None)
        self._check_lengths(self.train_set, "data.train_files")
        self.reward = reward if reward is not None else make_reward(self.rl.reward, mesh=self.mesh)

        self.updates_per_step = self.rl.ppo_epochs * self.rl.num_mini_batches
        self.schedule = learning_rate_schedule(cfg.optim, cfg.steps * self.updates_per_step)
        self.optimizer = make_optimizer(cfg.optim, cfg.steps * self.updates_per_step)
        self.state = jax.jit(lambda p: init_state(p, self.optimizer, cfg.seed))(params)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.kl_coef = self.rl.kl_coef
        self.sampling = SamplingConfig(temperature=self.rl.temperature, top_k=self.rl.top_k, top_p=self.rl.top_p)
        self._score = jit_score(cfg, self.graphdef)
        self._update = jit_update(cfg, self.graphdef, self.optimizer, self.schedule, self.state_shardings)

    # ----------------------------------------------------------------------------------------------
    def _check_lengths(self, records, key: str, sample_size: int = 2000) -> None:
        from cpo_jax.data import audit

        report = audit(records.records[:sample_size], self.tokenizer, self.tokenize_cfg,
                       PipelineConfig(kind="prompt_only", shard_index=0, shard_count=1),
                       sources=records.sources[:sample_size])
        if report.kept == 0:
            raise DataError(f"config key {key}", f"all {report.examples} checked prompts are longer than the prompt "
                            f"limit of {self.prompt_length} tokens", hint="raise data.max_prompt_length or "
                                                                           "data.max_length")
        if report.dropped:
            log.warning("%s: %d of the first %d prompts exceed %d tokens and are skipped", key,
                        sum(report.dropped.values()), report.examples, self.prompt_length)

    def _pipeline(self, records, *, train: bool):
        pipe = PipelineConfig(kind="prompt_only", seed=self.cfg.data.seed, shuffle=train,
                              num_epochs=None if train else 1, num_workers=0)
        return build_dataset(records.records, self.tokenizer, self.tokenize_cfg, self.batch_cfg, pipe,
                             sources=records.sources)

    def _global(self, x: np.ndarray) -> jax.Array:
        """This process's prompt rows ``[P, ...]`` -> the global batch ``[P * process_count, ...]`` on the mesh."""
        return host_to_global(x, self.mesh, rules=self.rules)

    def rollout_key(self, step: int) -> jax.Array:
        """The sampling key of (0-based) rollout ``step``: a function of the seed and the step only."""
        return jax.random.fold_in(jax.random.key(self.cfg.seed), step)

    # ----------------------------------------------------------------------------------------------
    def generate(self, params, prompt_ids, prompt_mask, key, *, num_generations: int, sampling: SamplingConfig,
                 max_new_tokens: int):
        """Sample ``[P * K, N]`` completions from ``params`` (the live train-state arrays)."""
        return sample(self.graphdef, params["model"], prompt_ids, prompt_mask, key, num_generations=num_generations,
                      max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=self.eos_id,
                      pad_token_id=self.pad_id)

    def _decode(self, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
        return [self.tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]

    def _scores(self, records: list[dict], tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [B], ended [B])``: the reward of each completion, and whether it emitted EOS."""
        scores = np.asarray(self.reward(records, self._decode(tokens, mask)), np.float32)
        ended = np.any((tokens == self.eos_id) & (mask > 0), axis=-1)
        if self.rl.missing_eos_penalty is not None:
            scores = np.where(ended, scores, scores - self.rl.missing_eos_penalty).astype(np.float32)
        return scores, ended

    def rollout_step(self, step: int, batch: dict) -> tuple[dict, dict]:
        """Sample, score and update once on a prompt batch; returns ``(metrics, host arrays of the rollout)``."""
        rl = self.rl
        timings = {}
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = self._global(batch["input_ids"]), self._global(batch["attention_mask"])
        ids, mask, gen = self.generate(self.state.params, prompt_ids, prompt_mask, self.rollout_key(step),
                                       num_generations=rl.num_generations, sampling=self.sampling,
                                       max_new_tokens=rl.max_new_tokens)
        # Every process reads back the whole global rollout (row i answers global prompt i // K) and scores it.
        tokens, comp_mask = global_to_host(gen.tokens), global_to_host(gen.mask)
        timings["timing_s/gen"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        index = np.repeat(global_to_host(self._global(batch["index"])), rl.num_generations)
        records = [self.train_set.records[int(i)] for i in index]
        scores, ended = self._scores(records, tokens, comp_mask)
        timings["timing_s/reward"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        rollout, metrics = self._score(self.state.params, self.ref_params, ids, mask, gen.tokens, gen.mask,
                                       host_value_to_global(scores, self.mesh, ("batch",), rules=self.rules),
                                       jnp.float32(self.kl_coef))
        metrics = jax.device_get(metrics)
        timings["timing_s/old_log_prob"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        self.state, update_metrics = self._update(self.state, rollout, jnp.float32(self.kl_coef))
        update_metrics = jax.device_get(update_metrics)
        timings["timing_s/update_actor"] = time.perf_counter() - t3
        timings["timing_s/step"] = time.perf_counter() - t0

        generated = int(comp_mask.sum())
        metrics = {**metrics, **update_metrics, **timings,
                   "response_length/clip_ratio": float(1.0 - ended.mean()),
                   "actor/kl_coef": self.kl_coef,
                   "perf/rollout_tokens": generated,
                   "perf/rollout_tokens_per_sec": generated / timings["timing_s/gen"],
                   "perf/time_share_gen": timings["timing_s/gen"] / timings["timing_s/step"],
                   "perf/time_share_update": timings["timing_s/update_actor"] / timings["timing_s/step"]}
        host = {"prompt_ids": global_to_host(ids), "tokens": tokens, "mask": comp_mask, "scores": scores,
                "records": records, "index": index}
        return metrics, host

    def evaluate(self, params) -> dict:
        """Greedy completions of every prompt in ``data.eval_files``: mean reward (``objective/scores``) and length.

        The CLI logs it at step 0 before training (``eval/...``); the loop every ``eval_every`` steps."""
        if self.eval_set is None:
            return {}
        scores, lengths = [], []
        for batch in lockstep(self._pipeline(self.eval_set, train=False)):
            _, _, gen = self.generate(params, self._global(batch["input_ids"]), self._global(batch["attention_mask"]),
                                      jax.random.key(0), num_generations=1, sampling=SamplingConfig(),
                                      max_new_tokens=self.rl.eval_max_new_tokens)
            tokens, mask = global_to_host(gen.tokens), global_to_host(gen.mask)
            index = global_to_host(self._global(batch["index"]))
            real = np.nonzero(global_to_host(self._global(batch["pair_mask"])))[0]
            records = [self.eval_set.records[int(index[i])] for i in real]
            scores.extend(self.reward(records, self._decode(tokens[real], mask[real])))
            lengths.extend(mask[real].sum(-1))
        return {"objective/scores": float(np.mean(scores)), "response_length/mean": float(np.mean(lengths)),
                "prompts": float(len(scores))}

    def run(self) -> RunResult:
        """Train from the latest checkpoint (or from scratch) to ``cfg.steps`` rollout steps."""
        cfg, rl = self.cfg, self.rl
        data = iter(self._pipeline(self.train_set, train=True))
        start, extra = self.restore_latest()
        if start:
            data.set_state(extra["data"])
            log.info("resumed from step %d in %s (kl_coef %.4g)", start, self.output_dir, self.kl_coef)
        writer = open_run(cfg, self.output_dir, start, self.model_path)
        history = []
        step = start
        try:
            while step < cfg.steps:
                metrics, _ = self.rollout_step(step, next(data))
                step += 1
                problem = divergence(cfg, metrics)
                if problem:
                    raise TrainingDiverged(f"{problem} (loss/total={metrics['loss/total']}, grad_norm="
                                           f"{metrics['grad_norm']}). The checkpoints on disk are from before it.",
                                           where=f"rollout step {step} of {self.output_dir}",
                                           hint=DIVERGENCE_HINT + "; or lower rl.kl_coef")
                if rl.adaptive_kl_target is not None:
                    self.kl_coef = adaptive_kl_coef(self.kl_coef, float(metrics["objective/kl"]),
                                                    rl.prompts_per_step * rl.num_generations,
                                                    target=rl.adaptive_kl_target, horizon=rl.adaptive_kl_horizon)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    history.append(writer.write(step, metrics))
                writer.advance(step, float(metrics["objective/scores"]))
                if cfg.eval_every and step % cfg.eval_every == 0:
                    writer.write(step, self.evaluate(self.state.params), prefix="eval/")
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self.checkpointer.save(step, self.state, {"data": data.get_state(), "kl_coef": self.kl_coef},
                                           to_dict(cfg))
            self.checkpointer.wait()
            if cfg.export_hf:
                self.export(self.output_dir / "hf")
        finally:
            writer.close()
            self.checkpointer.wait()
        return RunResult(history=history, start_step=start, final_step=step, output_dir=self.output_dir)

    def restore_latest(self) -> tuple[int, dict | None]:
        """Load the newest checkpoint into ``self.state`` and the KL coefficient; ``(step, extra)`` or ``(0, None)``."""
        step, self.state, extra = self.checkpointer.restore_latest(
            self.state, self.state_shardings, check_config=functools.partial(resume_check, self.cfg, self.checkpointer))
        if step:
            self.kl_coef = float(extra["kl_coef"])
        return step, extra

    def policy(self):
        """The current policy as an NNX model."""
        return nnx.merge(self.graphdef, self.state.params["model"])

    def export(self, path) -> Path:
        """Write the policy as an HF causal-LM directory (the PPO value head is not part of it)."""
        return save_pretrained(self.policy(), path, tokenizer=self.tokenizer)

