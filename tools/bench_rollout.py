"""Rollout throughput and the generation / training time split of the on-policy loop.

    python tools/bench_rollout.py configs/rlhf/smollm2_arithmetic.yaml --steps 4 [key=value ...]

Builds the config's ``RLTrainer``, runs ``--steps`` rollout steps after one warm-up (compilation) step, and
prints the median of each timing: sampling (``timing_s/gen``), scoring on the host, the policy + reference
scoring pass, the update, generated tokens per second of sampling, and the share of the step spent sampling
and updating. It writes nothing outside a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

KEYS = (
    "timing_s/gen",
    "timing_s/reward",
    "timing_s/old_log_prob",
    "timing_s/update_actor",
    "timing_s/step",
    "perf/rollout_tokens",
    "perf/rollout_tokens_per_sec",
    "perf/time_share_gen",
    "perf/time_share_update",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import jax

    from cpo_jax.cli import load_config
    from cpo_jax.rlhf.trainer import RLTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*args.overrides, f"output_dir={tmp}", "tensorboard=false"])
        trainer = RLTrainer(cfg)
        data = iter(trainer._pipeline(trainer.train_set, train=True))
        trainer.rollout_step(0, next(data))  # compiles sampling, scoring and the update
        runs = [trainer.rollout_step(step, next(data))[0] for step in range(1, args.steps + 1)]
    rl = cfg.rl
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "model": cfg.model.path,
        "rollouts_per_step": rl.prompts_per_step * rl.num_generations,
        "prompt_length": trainer.prompt_length,
        "max_new_tokens": rl.max_new_tokens,
        "algorithm": rl.algorithm,
        **{k: statistics.median(float(r[k]) for r in runs) for k in KEYS},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
