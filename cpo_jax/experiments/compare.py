"""DPO vs CPO vs RLHF on one verifiable task: the common evaluation and the compute accounting.

Every trained policy is measured the same way against the same reference (the starting model):

* **true reward**: greedy verifier accuracy on held-out prompts (:func:`cpo_jax.report.generation_correct`),
  with an exact McNemar test of each policy against the start on the same prompts (:func:`mcnemar_exact`);
* **KL to the reference**: ``KL(pi || pi_ref)`` per completion, estimated from completions sampled from the
  policy at temperature 1 (k1 and k3 estimators, summed over tokens);
* **the paper's diagnostics** on held-out preference pairs: ``frac_in_U``, absolute accuracy
  (``delta_theta > 0``) and the share where the reference prefers the rejected answer.

Compute is counted as forward-pass token equivalents of padded rows (a backward pass is two forwards):
a preference step is ``rows x length x (3 + reference)``; an RLOO step is ``rows x (prompt + new tokens) x
(1 sampling + 2 scoring passes + 3 x ppo_epochs)``. :func:`forward_token_equivalents` gives both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.experiments.stats import mcnemar_p
from cpo_jax.losses.metrics import preference_metrics
from cpo_jax.losses.pair import PairLogps
from cpo_jax.losses.rlhf import kl_estimate

DIAGNOSTIC_KEYS = (
    "diagnostics/frac_in_U",
    "diagnostics/abs_accuracy",
    "diagnostics/frac_ref_prefers_rejected",
    "logps/chosen",
    "logps/rejected",
)


def question(record: dict) -> str:
    """The text a record asks: the last message's content of a conversational prompt, else the prompt."""
    prompt = record["prompt"]
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


def held_out(records, seen: set[str], limit: int | None = None):
    """The records whose question is not in ``seen``, each question once, in order, at most ``limit``.

    ``records``: a :class:`cpo_jax.data.RecordSet`; returns one of the same type.
    """
    import dataclasses

    keep, questions = [], set()
    for i, record in enumerate(records.records):
        q = question(record)
        if q in seen or q in questions:
            continue
        questions.add(q)
        keep.append(i)
        if limit is not None and len(keep) == limit:
            break
    return dataclasses.replace(
        records, records=[records.records[i] for i in keep], sources=[records.sources[i] for i in keep]
    )


def preference_step_cost(pairs_per_batch: int, row_length: int, *, reference_forward: bool) -> int:
    """Forward token equivalents of one preference step (chosen + rejected rows, fwd + bwd, + reference)."""
    return 2 * pairs_per_batch * row_length * (3 + int(reference_forward))


def rl_step_cost(prompts: int, generations: int, prompt_length: int, new_tokens: int, ppo_epochs: int = 1) -> int:
    """Forward token equivalents of one on-policy step: sampling, policy + reference scoring, updates."""
    return prompts * generations * (prompt_length + new_tokens) * (1 + 2 + 3 * ppo_epochs)


def forward_token_equivalents(steps: int, step_cost: int) -> int:
    """Total budget of ``steps`` steps of ``step_cost`` each."""
    return steps * step_cost


@functools.partial(jax.jit, static_argnums=(0, 2))
def _policy_and_reference_logps(graphdef, params, ref_graphdef, ref_params, ids, mask, tokens, comp_mask):
    """Per-token log-probs ``[B, N]`` of the sampled ``tokens`` under the policy and the reference.

    The weights are arguments, not captured: a jitted closure over the models would bake both into the executable
    as constants (about 1 GB for two SmolLM2-135M copies, compiled anew and cached on disk for every policy)."""
    from flax import nnx

    from cpo_jax.rlhf.rollout import completion_hidden, completion_logps

    out = []
    for g, p in ((graphdef, params), (ref_graphdef, ref_params)):
        model = nnx.merge(g, p)
        out.append(completion_logps(model, completion_hidden(model, ids, mask, tokens, comp_mask), tokens))
    return out


def sampled_kl(
    policy,
    reference,
    tokenizer,
    prompts,
    *,
    prompt_length: int,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean over prompts of the summed k1 and k3 estimates of ``KL(policy || reference)`` on policy samples.

    ``prompts``: prompt-only records as :func:`cpo_jax.data.load_records` returns them (``.records``, ``.sources``).
    """
    from flax import nnx

    from cpo_jax.data import BatchConfig, PipelineConfig, TokenizeConfig, build_dataset
    from cpo_jax.models.generate import SamplingConfig
    from cpo_jax.rlhf.rollout import sample

    graphdef, params = nnx.split(policy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tok = TokenizeConfig(max_length=prompt_length + max_new_tokens, max_prompt_length=prompt_length)
    batch_cfg = BatchConfig(
        pairs_per_batch=batch_size, max_length=tok.max_length, buckets=(prompt_length, tok.max_length), pad_id=pad
    )
    pipe = PipelineConfig(kind="prompt_only", shuffle=False, num_epochs=1, shard_index=0, shard_count=1)

    ref_graphdef, ref_params = nnx.split(reference)

    k1, k3 = [], []
    for i, b in enumerate(build_dataset(prompts.records, tokenizer, tok, batch_cfg, pipe, sources=prompts.sources)):
        ids, mask, gen = sample(
            graphdef,
            params,
            jnp.asarray(b["input_ids"]),
            jnp.asarray(b["attention_mask"]),
            jax.random.fold_in(jax.random.key(seed), i),
            num_generations=1,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature=1.0),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        lp, ref = _policy_and_reference_logps(
            graphdef, params, ref_graphdef, ref_params, ids, mask, gen.tokens, gen.mask
        )
        m = np.asarray(gen.mask, np.float32)
        real = np.asarray(b["pair_mask"])
        k1.extend((np.asarray(kl_estimate(lp, ref, "k1")) * m).sum(-1)[real])
        k3.extend((np.asarray(kl_estimate(lp, ref, "k3")) * m).sum(-1)[real])
    return {"kl/k1": float(np.mean(k1)), "kl/k3": float(np.mean(k3))}


def pair_diagnostics(policy_logps: np.ndarray, reference_logps: np.ndarray, *, beta: float = 0.1) -> dict[str, float]:
    """The paper's diagnostics from ``[N, 2]`` summed (chosen, rejected) log-probs; dropped (NaN) rows are skipped."""
    keep = np.isfinite(policy_logps).all(-1) & np.isfinite(reference_logps).all(-1)
    p, r = policy_logps[keep], reference_logps[keep]
    metrics = preference_metrics(PairLogps(*(jnp.asarray(x) for x in (p[:, 0], p[:, 1], r[:, 0], r[:, 1]))), beta=beta)
    return {k: float(metrics[k]) for k in DIAGNOSTIC_KEYS} | {"pairs": float(keep.sum())}


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """Exact two-sided McNemar test of paired 0/1 outcomes ``[N]`` (same prompts, two policies).

    ``gained`` counts prompts wrong before and right after, ``lost`` the reverse; under "no change" each
    discordant prompt is a fair coin, so ``p = min(1, 2 * P[Binomial(gained + lost, 1/2) <= min(gained, lost)])``.
    """
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    if before.shape != after.shape:
        raise ValueError(f"paired outcomes differ in shape: {before.shape} vs {after.shape}")
    gained, lost = int(np.sum(~before & after)), int(np.sum(before & ~after))
    return {"mcnemar/gained": float(gained), "mcnemar/lost": float(lost), "mcnemar/p": mcnemar_p(gained, lost)}
