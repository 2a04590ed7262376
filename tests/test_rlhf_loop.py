"""The on-policy loop end to end on a tiny random Llama (byte tokenizer, ``tests/train_fixtures.py``).

* RLOO with the ``digits`` verifier raises the reward and logs the TRL/verl metric names;
* sampling inside the loop is :func:`cpo_jax.models.generate.generate` token for token (one device and a
  data-parallel mesh);
* a run stopped and resumed equals an uninterrupted one, the adaptive KL coefficient included;
* PPO (value head, epochs x minibatches) and GRPO (KL in the loss) run and export an HF causal LM;
* config mistakes name their key;
* a reward model learns a synthetic preference, exports as an HF sequence classifier, scores like
  ``AutoModelForSequenceClassification`` through :class:`LearnedReward`, and drives an RLOO run.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cpo_jax.data import write_jsonl
from cpo_jax.models.generate import generate
from cpo_jax.rlhf.rewards import VERIFIERS, LearnedReward, make_reward
from cpo_jax.rlhf.trainer import RLTrainer
from cpo_jax.train import TrainConfig, from_dict
from cpo_jax.train.trainer import Trainer
from tests.train_fixtures import tiny_policy

pytest.importorskip("torch")

# The names TRL (RLOOTrainer / PPOTrainer) and verl log; dashboards built for them read ours.
TRL_VERL_NAMES = (
    "objective/kl",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/clipfrac_avg",
    "policy/entropy_avg",
    "policy/approxkl_avg",
    "response_length/mean",
    "timing_s/gen",
    "timing_s/update_actor",
    "perf/rollout_tokens_per_sec",
)
# Wall-clock metrics: everything else a step logs is a deterministic function of seed, data and config.
TIMING_PREFIXES = ("timing_s/", "perf/")
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    return str(tiny_policy(tmp_path_factory.mktemp("rl_policy") / "policy"))


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def rl_config(policy: str, out: Path, **overrides) -> TrainConfig:
    """configs/rlhf/tiny.yaml on the test policy, one device, no TensorBoard/export unless overridden."""
    base = {
        "output_dir": str(out),
        "model": {"path": policy},
        "data": {
            "train_files": ["bundled:arithmetic-prompts:256"],
            "eval_files": ["bundled:arithmetic-prompts:16"],
            "max_length": 96,
            "max_prompt_length": 64,
        },
        "loss": {"objective": "rlhf"},
        "rl": {
            "algorithm": "rloo",
            "reward": "verifier:digits",
            "prompts_per_step": 8,
            "num_generations": 4,
            "max_new_tokens": 16,
            "kl_coef": 0.01,
            "eval_max_new_tokens": 16,
        },
        "optim": {"learning_rate": 3e-3, "schedule": "constant"},
        "mesh": ONE_DEVICE,
        "steps": 2,
        "save_every": 1000,
        "progress_bar": False,
        "tensorboard": False,
        "export_hf": False,
    }
    return from_dict(TrainConfig, _merge(base, overrides))


def make_rl(cfg: TrainConfig) -> RLTrainer:
    """An RLTrainer on as many devices as its mesh asks for (``cfg.mesh`` sizes, no -1)."""
    return RLTrainer(cfg, devices=jax.devices()[: int(np.prod(list(cfg.mesh.values())))])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_records(records: list[dict]) -> list[dict]:
    """The per-step training records of ``metrics.jsonl`` (not the ``eval/`` ones)."""
    return [r for r in records if "objective/scores" in r]


def deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)}


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache for this module's tests, switched off again after them.

    Most tests here build a trainer of the same RLOO config (the resume test builds three), and each
    trainer jits its own sample / score / update programs: about 20 s of XLA compilation on a CPU. With
    the cache, the executables XLA built for the first trainer are loaded by the next ones (same HLO,
    same binary), so only the first test of a worker pays for them.
    """
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "xla_cache_rlhf_loop"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


# --------------------------------------------------------------------------------------------------
# 1. RLOO raises a verifier's reward


def test_rloo_raises_the_digits_reward_and_logs_trl_metric_names(policy_dir, tmp_path):
    out = tmp_path / "run"
    trainer = make_rl(rl_config(policy_dir, out, steps=40, eval_every=40, tensorboard=True))
    greedy_before = trainer.evaluate(trainer.state.params)["objective/scores"]
    result = trainer.run()

    scores = [h["objective/scores"] for h in result.history]
    first, last = float(np.mean(scores[:3])), float(np.mean(scores[-3:]))
    # Random init: about 10 digits in a 256-byte vocabulary (~0.04); 40 steps at lr 3e-3 reach ~0.35.
    assert last > first + 0.15 and last > 3 * first, (first, last, scores)
    assert last > greedy_before + 0.15, (greedy_before, last)

    records = read_metrics(out)
    train = train_records(records)
    assert [r["step"] for r in train] == list(range(1, 41))
    for key in TRL_VERL_NAMES:
        assert key in train[0], key
    for r in train:
        # TRL's definitions: rlhf_reward = scores + non_score_reward, non_score_reward = -beta * KL.
        np.testing.assert_allclose(
            r["objective/rlhf_reward"], r["objective/scores"] + r["objective/non_score_reward"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            r["objective/non_score_reward"], -r["actor/kl_coef"] * r["objective/kl"], rtol=1e-5, atol=1e-7
        )
        # One epoch of one minibatch updates on the rollout's own policy: the ratio is 1, nothing is clipped.
        assert r["policy/clipfrac_avg"] == 0.0
        assert abs(r["val/ratio"] - 1.0) < 1e-4 and abs(r["policy/approxkl_avg"]) < 1e-5
        assert r["response_length/mean"] <= 16 and r["perf/rollout_tokens_per_sec"] > 0
    evals = [r for r in records if "eval/objective/scores" in r]
    assert [r["step"] for r in evals] == [40]
    assert evals[0]["eval/objective/scores"] > greedy_before + 0.15  # greedy completions learned digits too
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------------------
# 2. Sampling inside the loop is standalone generation


@pytest.mark.parametrize("mesh", [ONE_DEVICE, {"data": 4, "fsdp": 1, "tensor": 1}], ids=["one_device", "data4"])
def test_rollout_samples_exactly_what_standalone_generate_samples(policy_dir, tmp_path, mesh):
    if jax.device_count() < mesh["data"]:
        pytest.skip(f"needs {mesh['data']} devices (tests/conftest.py sets XLA_FLAGS)")
    trainer = make_rl(rl_config(policy_dir, tmp_path / "run", mesh=mesh))
    rl = trainer.rl
    batch = next(iter(trainer._pipeline(trainer.train_set, train=True)))
    # The update donates the train state: keep a copy of the sampling policy (same shardings).
    before = jax.tree.map(lambda x: x.copy(), trainer.state.params["model"])
    policy = nnx.merge(trainer.graphdef, before)

    _, host = trainer.rollout_step(0, batch)

    prompts = np.repeat(batch["input_ids"], rl.num_generations, axis=0)  # row i answers prompt i // K
    prompt_mask = np.repeat(batch["attention_mask"], rl.num_generations, axis=0)
    kw = {
        "max_new_tokens": rl.max_new_tokens,
        "sampling": trainer.sampling,
        "eos_token_id": trainer.eos_id,
        "pad_token_id": trainer.pad_id,
    }
    standalone = generate(policy, prompts, prompt_mask, rng=trainer.rollout_key(0), **kw)
    np.testing.assert_array_equal(host["tokens"], np.asarray(standalone.tokens))
    np.testing.assert_array_equal(host["mask"], np.asarray(standalone.mask))
    # Single-device generation on host copies of the same parameters samples the same tokens too.
    host_policy = nnx.merge(trainer.graphdef, jax.tree.map(np.asarray, before))
    single = generate(host_policy, prompts, prompt_mask, rng=trainer.rollout_key(0), **kw)
    np.testing.assert_array_equal(host["tokens"], np.asarray(single.tokens))

    # The comparison can fail: K samples of one prompt differ, and so do the samples of another step's key.
    assert not np.array_equal(host["tokens"][0], host["tokens"][1])
    other = generate(policy, prompts, prompt_mask, rng=trainer.rollout_key(1), **kw)
    assert not np.array_equal(np.asarray(other.tokens), host["tokens"])
    # The step scored those completions with the verifier, and then moved the policy.
    texts = [trainer.tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(host["tokens"], host["mask"])]
    np.testing.assert_allclose(host["scores"], [VERIFIERS["digits"](None, t) for t in texts], rtol=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(trainer.state.params["model"]), leaves(before)))


# --------------------------------------------------------------------------------------------------
# 3. Resume


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(policy_dir, tmp_path):
    kl = {"kl_coef": 0.05, "adaptive_kl_target": 1.0, "adaptive_kl_horizon": 100}
    full = make_rl(rl_config(policy_dir, tmp_path / "full", steps=4, save_every=2, rl=kl))
    full_result = full.run()

    stopped = make_rl(rl_config(policy_dir, tmp_path / "resumed", steps=2, save_every=2, rl=kl))
    assert stopped.run().final_step == 2
    assert stopped.kl_coef != 0.05  # the controller moved beta (KL 0 at step 1 < target)
    resumed = make_rl(rl_config(policy_dir, tmp_path / "resumed", steps=4, save_every=2, rl=kl))
    assert resumed.kl_coef == 0.05  # nothing restored before run()
    result = resumed.run()

    assert result.start_step == 2 and result.final_step == 4
    # Beta came back from the checkpoint: the first resumed step used the value the full run had there.
    assert result.history[0]["actor/kl_coef"] == full_result.history[2]["actor/kl_coef"] == stopped.kl_coef
    assert resumed.kl_coef == full.kl_coef
    for a, b in zip(leaves(resumed.state.params), leaves(full.state.params)):
        np.testing.assert_array_equal(a, b)
    resumed_log = train_records(read_metrics(tmp_path / "resumed"))
    full_log = train_records(read_metrics(tmp_path / "full"))
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4]
    assert deterministic(resumed_log[-1]) == deterministic(full_log[-1])
    assert deterministic(resumed_log[2]) == deterministic(full_log[2])


# --------------------------------------------------------------------------------------------------
# 4. PPO and GRPO


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_ppo_and_grpo_runs_are_finite_and_export_a_causal_lm(policy_dir, tmp_path, algorithm):
    import torch
    from transformers import AutoModelForCausalLM

    rl = (
        {"algorithm": "ppo", "ppo_epochs": 2, "num_mini_batches": 2}
        if algorithm == "ppo"
        else {"algorithm": "grpo", "kl_in": "loss", "kl_estimator": "k3", "kl_coef": 0.1}
    )
    out = tmp_path / algorithm
    trainer = make_rl(rl_config(policy_dir, out, steps=2, rl=rl, export_hf=True))
    initial = leaves(trainer.state.params["model"])
    history = trainer.run().history

    for record in history:
        for key, value in record.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        for key in TRL_VERL_NAMES:
            assert key in record, key
    if algorithm == "ppo":
        for key in ("loss/value_avg", "val/clipfrac_avg", "critic/values/mean", "critic/returns/mean"):
            assert key in history[0], key
        assert np.abs(np.asarray(trainer.state.params["value_head"]["kernel"])).max() > 0  # the value head trained
    else:
        assert "loss/kl_avg" in history[0] and "loss/value_avg" not in history[0]
        # k3 of the policy against itself is 0 at step 1; after one update the policy has left the reference.
        assert abs(history[0]["loss/kl_avg"]) < 1e-6 and history[1]["loss/kl_avg"] > 0

    hf = AutoModelForCausalLM.from_pretrained(out / "hf", attn_implementation="eager").eval()
    ids = np.asarray([trainer.tokenizer("What is 12 + 30?")["input_ids"]], np.int32)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(trainer.policy()(ids))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)  # the trained policy, not the initial one
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(trainer.state.params["model"]), initial))


# --------------------------------------------------------------------------------------------------
# 5. Config errors


def test_rl_config_errors_name_the_key(policy_dir, tmp_path):
    from cpo_jax.cli import ConfigError, load_config

    out = tmp_path / "x"
    with pytest.raises(ConfigError, match=r"config key rl\.num_generations: 1 is too small: rloo needs at least 2"):
        make_rl(rl_config(policy_dir, out, rl={"num_generations": 1}))
    with pytest.raises(ConfigError, match=r"config key rl\.num_mini_batches: 3 must divide the 32 rollouts"):
        make_rl(rl_config(policy_dir, out, rl={"num_mini_batches": 3}))
    with pytest.raises(
        ConfigError,
        match=r"config key rl\.max_new_tokens: 40 plus data\.max_prompt_length \(64\) "
        r"must fit in data\.max_length \(96\)",
    ):
        make_rl(rl_config(policy_dir, out, rl={"max_new_tokens": 40}))
    with pytest.raises(ConfigError, match=r"rl\.reward: 'verifier:digitz' names no verifier(.|\n)*verifier:digits"):
        make_rl(rl_config(policy_dir, out, rl={"reward": "verifier:digitz"}))
    with pytest.raises(FileNotFoundError, match=r"rl\.reward='.*nowhere'"):
        make_reward(str(tmp_path / "nowhere"))

    yaml = tmp_path / "bad.yaml"
    yaml.write_text(
        f"model:\n  path: {policy_dir}\nloss:\n  objective: rlhf\nrl:\n  algorithm: rloo\n  num_generatons: 4\n"
    )
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['rl\.num_generatons'\]"):
        load_config(yaml)
    yaml.write_text(f"model:\n  path: {policy_dir}\nloss:\n  objective: rlhf\nrl:\n  algorithm: dpo\n")
    with pytest.raises(ConfigError, match=r"rl\.algorithm='dpo': expected one of"):
        load_config(yaml)


# --------------------------------------------------------------------------------------------------
# 6-7. A learned reward model


def synthetic_preferences(n: int, seed: int) -> list[dict]:
    """Conversational pairs: the chosen answer is a random lowercase word with 2-4 digits in it, the rejected
    one an independent random lowercase word. Held-out pairs (another seed) share no words with training."""
    rng = np.random.RandomState(seed)
    letters = list(string.ascii_lowercase)

    def word() -> list[str]:
        return list(rng.choice(letters, rng.randint(6, 13)))

    rows = []
    for _ in range(n):
        topic = "".join(rng.choice(letters, rng.randint(3, 8)))
        chosen = word()
        for pos in rng.choice(len(chosen), rng.randint(2, 5), replace=False):
            chosen[pos] = str(rng.randint(10))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Name a {topic}."}],
                "chosen": [{"role": "assistant", "content": "".join(chosen)}],
                "rejected": [{"role": "assistant", "content": "".join(word())}],
            }
        )
    return rows


@pytest.fixture(scope="module")
def reward_run(policy_dir, tmp_path_factory) -> dict:
    """A reward model trained on :func:`synthetic_preferences` and exported to ``hf/``."""
    root = tmp_path_factory.mktemp("reward_model")
    train = write_jsonl(synthetic_preferences(256, seed=0), root / "train.jsonl")
    held_out_rows = synthetic_preferences(64, seed=1)
    held_out = write_jsonl(held_out_rows, root / "held_out.jsonl")
    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(root / "run"),
            "model": {"path": policy_dir},
            "data": {
                "train_files": [str(train)],
                "eval_files": [str(held_out)],
                "max_length": 96,
                "max_prompt_length": 48,
                "pairs_per_batch": 8,
            },
            "loss": {"objective": "reward", "name": "sigmoid", "hparams": {}, "reference": "none"},
            "optim": {"learning_rate": 1e-2, "schedule": "constant"},
            "mesh": ONE_DEVICE,
            "steps": 40,
            "save_every": 1000,
            "eval_batches": 8,
            "progress_bar": False,
            "tensorboard": False,
            "export_hf": True,
        },
    )
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    before = trainer.evaluate(trainer.state.params)
    trainer.run()
    return {
        "before": before,
        "after": trainer.evaluate(trainer.state.params),
        "hf": root / "run" / "hf",
        "held_out": held_out_rows,
    }


def test_reward_model_learns_a_synthetic_preference(reward_run):
    # The head starts at zero: every pair ties, and a tie is not a correct ranking.
    assert reward_run["before"]["rewards/accuracies"] <= 0.5
    after = reward_run["after"]
    assert after["rewards/accuracies"] > 0.9, after  # 64 held-out pairs (8 batches of 8)
    assert after["rewards/margins"] > 0


def _hf_reward_model(path):
    import torch
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def _hf_score(hf, ids: list[int]) -> float:
    import torch

    with torch.no_grad():
        return float(hf(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, 0])


def test_learned_reward_scores_like_hf_sequence_classification(reward_run):
    from transformers import AutoTokenizer

    path = reward_run["hf"]
    reward = LearnedReward.from_pretrained(path)
    held_out = reward_run["held_out"][:10]
    # 20 rows: two chunks of batch_size 16, the second one topped up with filler rows.
    records = [{"prompt": r["prompt"]} for r in held_out for _ in (0, 1)]
    completions = [r[k][0]["content"] for r in held_out for k in ("chosen", "rejected")]
    ours = reward(records, completions)
    assert ours.dtype == np.float32 and ours.shape == (20,)

    tokenizer, hf = AutoTokenizer.from_pretrained(path), _hf_reward_model(path)
    theirs = [
        _hf_score(
            hf,
            tokenizer.apply_chat_template(
                [*r["prompt"], {"role": "assistant", "content": c}], tokenize=True, return_dict=True
            )["input_ids"],
        )
        for r, c in zip(records, completions)
    ]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # The exported model keeps the learned preference: chosen (even rows) above rejected (odd rows).
    assert np.mean(ours[0::2] > ours[1::2]) >= 0.9
    from_spec = make_reward(str(path))
    assert isinstance(from_spec, LearnedReward)
    np.testing.assert_allclose(from_spec(records, completions), ours, atol=1e-6)


def test_learned_reward_reads_plain_text_records_as_reward_training_does(reward_run):
    from transformers import AutoTokenizer

    from cpo_jax.data import RecordTokenizer, TokenizeConfig

    path = reward_run["hf"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The sequence a `loss.objective: reward` run scores for a plain-text record: prompt + completion + EOS.
    trained_on, _ = RecordTokenizer(tokenizer, TokenizeConfig(max_length=64)).sequence("Name a cat. ", "mi7ten", "x")
    assert trained_on[-1] == tokenizer.eos_token_id
    ours = LearnedReward.from_pretrained(path)([{"prompt": "Name a cat. "}], ["mi7ten"])
    np.testing.assert_allclose(ours, [_hf_score(_hf_reward_model(path), trained_on)], atol=1e-4, rtol=1e-4)


def test_rloo_runs_on_a_learned_reward(policy_dir, reward_run, tmp_path):
    out = tmp_path / "run"
    trainer = make_rl(rl_config(policy_dir, out, steps=2, rl={"reward": str(reward_run["hf"])}))
    assert isinstance(trainer.reward, LearnedReward)
    history = trainer.run().history
    logged = train_records(read_metrics(out))
    assert [r["step"] for r in logged] == [1, 2]
    for record in history:
        assert all(math.isfinite(record[k]) for k in ("objective/scores", "objective/rlhf_reward", "objective/kl"))
        assert record["critic/score/max"] > record["critic/score/min"]  # real model scores, not a constant
