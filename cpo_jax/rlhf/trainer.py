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

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpo_jax.data import BatchConfig, PipelineConfig, TokenizeConfig
from cpo_jax.errors import ConfigError
from cpo_jax.models.generate import SamplingConfig
from cpo_jax.models.lora import zero_adapters
from cpo_jax.parallel.multihost import global_to_host, host_to_global, host_value_to_global, lockstep
from cpo_jax.rlhf.algorithms import adaptive_kl_coef
from cpo_jax.rlhf.rewards import RewardFunction, make_reward
from cpo_jax.rlhf.rollout import init_value_head, sample
from cpo_jax.rlhf.step import jit_score, jit_update
from cpo_jax.train import weighted
from cpo_jax.train.config import TrainConfig
from cpo_jax.train.loop import DIVERGENCE_HINT, TrainLoop

log = logging.getLogger(__name__)


class RLTrainer(TrainLoop):
    """``loss.objective: rlhf``: builds the reference, reward and prompt pipeline; ``run()`` trains."""

    record_kind = "prompt_only"
    record_noun = "prompts"
    progress_metric = "objective/scores"
    divergence_hint = DIVERGENCE_HINT + "; or lower rl.kl_coef"

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, devices=None, reward: RewardFunction | None = None):
        if cfg.loss.objective != "rlhf":
            raise ConfigError(
                f"RLTrainer trains loss.objective=rlhf, not {cfg.loss.objective!r}",
                where="config key loss.objective",
                hint="use cpo_jax.train.trainer.Trainer for it",
            )
        super().__init__(cfg, tokenizer=tokenizer, devices=devices)
        self.rl = rl = cfg.rl
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_id = self.tokenizer.eos_token_id
        params = {"model": self.initial_model_state}
        if rl.algorithm == "ppo":
            params["value_head"] = jax.tree.map(
                lambda x: host_value_to_global(np.asarray(x), self.mesh, (None,), rules=self.rules),
                init_value_head(self.model_config.hidden_size),
            )
        if self.lora_spec is None:
            self.ref_params = self.load_reference()
        else:  # on the one frozen base: fresh adapters switched off, or an imported adapter's frozen copy
            self.ref_params = {
                "model": self.initial_model_state
                if cfg.model.adapter_path is not None
                else zero_adapters(self.initial_model_state)
            }
        del self.initial_model_state  # the state holds the parameters

        self.prompt_length = cfg.data.max_prompt_length or cfg.data.max_length - rl.max_new_tokens
        self.tokenize_cfg = TokenizeConfig(
            max_length=self.prompt_length + rl.max_new_tokens,
            max_prompt_length=self.prompt_length,
            vocab_size=self.model_config.vocab_size,
        )
        # Every prompt fits the first bucket, so prompt batches have one static shape [P, prompt_length].
        self.batch_cfg = BatchConfig(
            pairs_per_batch=rl.prompts_per_step,
            max_length=self.tokenize_cfg.max_length,
            buckets=(self.prompt_length, self.tokenize_cfg.max_length),
            pad_id=self.pad_id,
        )
        self.check_lengths(self.train_set, "data.train_files")
        self.reward = reward if reward is not None else make_reward(rl.reward, mesh=self.mesh)

        self.updates_per_step = rl.ppo_epochs * rl.num_mini_batches
        self.init_state(params, self.cfg.steps * self.updates_per_step)  # with epochs, TrainLoop's steps
        self.kl_coef = rl.kl_coef
        self.sampling = SamplingConfig(temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p)
        self._score = jit_score(cfg, self.graphdef)
        self._update = jit_update(cfg, self.graphdef, self.optimizer, self.schedule, self.state_shardings)

    # ----------------------------------------------------------------------------------------------
    def drop_hint(self, dropped: dict) -> str:
        return (
            f"every checked prompt is longer than the prompt limit of {self.prompt_length} tokens: raise "
            f"data.max_prompt_length or data.max_length"
        )

    def pipeline_config(self, *, train: bool) -> PipelineConfig:
        # One worker: a step samples from exactly prompts_per_step prompts, in order.
        return PipelineConfig(
            kind="prompt_only", seed=self.cfg.data.seed, shuffle=train, num_epochs=None if train else 1, num_workers=0
        )

    def _global(self, x: np.ndarray) -> jax.Array:
        """This process's prompt rows ``[P, ...]`` -> the global batch ``[P * process_count, ...]`` on the mesh."""
        return host_to_global(x, self.mesh, rules=self.rules)

    def rollout_key(self, step: int) -> jax.Array:
        """The sampling key of (0-based) rollout ``step``: a function of the seed and the step only."""
        return jax.random.fold_in(jax.random.key(self.cfg.seed), step)

    # ----------------------------------------------------------------------------------------------
    def generate(
        self,
        params,
        prompt_ids,
        prompt_mask,
        key,
        *,
        num_generations: int,
        sampling: SamplingConfig,
        max_new_tokens: int,
    ):
        """Sample ``[P * K, N]`` completions from ``params`` (the live train-state arrays)."""
        state = params["model"] if self.frozen is None else nnx.merge_state(params["model"], self.frozen)
        return sample(
            self.graphdef,
            state,
            prompt_ids,
            prompt_mask,
            key,
            num_generations=num_generations,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )

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
        ids, mask, gen = self.generate(
            self.state.params,
            prompt_ids,
            prompt_mask,
            self.rollout_key(step),
            num_generations=rl.num_generations,
            sampling=self.sampling,
            max_new_tokens=rl.max_new_tokens,
        )
        # Every process reads back the whole global rollout (row i answers global prompt i // K) and scores it.
        tokens, comp_mask = global_to_host(gen.tokens), global_to_host(gen.mask)
        timings["timing_s/gen"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        index = np.repeat(global_to_host(self._global(batch["index"])), rl.num_generations)
        records = [self.train_set.records[int(i)] for i in index]
        scores, ended = self._scores(records, tokens, comp_mask)
        timings["timing_s/reward"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        with self.activations():
            rollout, metrics = self._score(
                self.state.params,
                self.ref_params,
                ids,
                mask,
                gen.tokens,
                gen.mask,
                host_value_to_global(scores, self.mesh, ("batch",), rules=self.rules),
                jnp.float32(self.kl_coef),
                self.frozen,
            )
        metrics = jax.device_get(metrics)
        timings["timing_s/old_log_prob"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        with self.activations():
            self.state, update_metrics = self._update(self.state, rollout, jnp.float32(self.kl_coef), self.frozen)
        update_metrics = jax.device_get(update_metrics)
        timings["timing_s/update_actor"] = time.perf_counter() - t3
        timings["timing_s/step"] = time.perf_counter() - t0

        generated = int(comp_mask.sum())
        metrics = {
            **metrics,
            **update_metrics,
            **timings,
            "response_length/clip_ratio": float(1.0 - ended.mean()),
            "actor/kl_coef": self.kl_coef,
            "perf/rollout_tokens": generated,
            "perf/rollout_tokens_per_sec": generated / timings["timing_s/gen"],
            "perf/time_share_gen": timings["timing_s/gen"] / timings["timing_s/step"],
            "perf/time_share_update": timings["timing_s/update_actor"] / timings["timing_s/step"],
        }
        host = {
            "prompt_ids": global_to_host(ids),
            "tokens": tokens,
            "mask": comp_mask,
            "scores": scores,
            "records": records,
            "index": index,
        }
        return metrics, host

    def evaluate(self, params) -> dict:
        """Greedy completions of every prompt in ``data.eval_files``: mean reward (``objective/scores``) and length.

        The CLI logs it at step 0 before training (``eval/...``); the loop every ``eval_every`` steps."""
        if self.eval_set is None:
            return {}

        def batch_metrics(batch) -> dict:
            _, _, gen = self.generate(
                params,
                self._global(batch["input_ids"]),
                self._global(batch["attention_mask"]),
                jax.random.key(0),
                num_generations=1,
                sampling=SamplingConfig(),
                max_new_tokens=self.rl.eval_max_new_tokens,
            )
            tokens, mask = global_to_host(gen.tokens), global_to_host(gen.mask)
            index = global_to_host(self._global(batch["index"]))
            real = np.nonzero(global_to_host(self._global(batch["pair_mask"])))[0]
            records = [self.eval_set.records[int(index[i])] for i in real]
            scores = np.asarray(self.reward(records, self._decode(tokens[real], mask[real])), np.float64)
            count = float(len(real))
            return {
                "objective/scores": weighted.Weighted(scores.sum(), count),
                "response_length/mean": weighted.Weighted(float(mask[real].sum()), count),
            }

        sums = weighted.total(batch_metrics(b) for b in lockstep(self._pipeline(self.eval_set, train=False)))
        return {
            **{k: float(v) for k, v in weighted.means(sums).items()},
            "prompts": float(sums["objective/scores"].count),
        }

    def run_step(self, step: int, data) -> dict:
        """One rollout step on the next prompt batch; then the adaptive KL controller, when configured."""
        rl = self.rl
        metrics, _ = self.rollout_step(step, next(data))
        if rl.adaptive_kl_target is not None:
            self.kl_coef = adaptive_kl_coef(
                self.kl_coef,
                float(metrics["objective/kl"]),
                rl.prompts_per_step * rl.num_generations,
                target=rl.adaptive_kl_target,
                horizon=rl.adaptive_kl_horizon,
            )
        return metrics

    def extra_state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_extra_state(self, extra: dict) -> None:
        self.kl_coef = float(extra["kl_coef"])
        log.info("kl_coef %.4g restored", self.kl_coef)

    def diagnose(self, step: int, problem: str, metrics: dict) -> str:
        return (
            f"{problem} (loss/total={metrics['loss/total']}, grad_norm={metrics['grad_norm']}). "
            f"The checkpoints on disk are from before it."
        )
