"""Run reports: generation accuracy on the verifiable task, before/after tables, training-curve plots."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from cpo_jax.parallel.multihost import global_to_host, host_value_to_global

#: Metrics shown in before/after tables, in order.
SUMMARY_KEYS = (
    "loss",
    "rewards/accuracies",
    "diagnostics/abs_accuracy",
    "diagnostics/abs_accuracy_norm",
    "diagnostics/frac_ref_prefers_rejected",
    "diagnostics/frac_in_U",
    "diagnostics/frac_in_U_norm",
    "generation/accuracy",
    "objective/scores",
    "response_length/mean",
)


def generation_accuracy(
    model, tokenizer, prompts_path, *, max_new_tokens: int = 24, batch: int = 16, max_prompt_length: int = 256
) -> dict[str, float]:
    """Greedy answers to prompt-only arithmetic records, scored by :func:`cpo_jax.data.score_arithmetic`."""
    correct = generation_correct(
        model, tokenizer, prompts_path, max_new_tokens=max_new_tokens, batch=batch, max_prompt_length=max_prompt_length
    )
    return {
        "generation/accuracy": float(correct.mean()) if correct.size else 0.0,
        "generation/prompts": float(correct.size),
    }


def generation_correct(
    model, tokenizer, prompts_path, *, max_new_tokens: int = 24, batch: int = 16, max_prompt_length: int = 256
) -> np.ndarray:
    """bool ``[N]``: whether the greedy answer to each kept prompt (in file order) is right.

    ``prompts_path``: a data spec/path of prompt-only arithmetic records, or a loaded ``RecordSet``."""
    from cpo_jax.data import (
        BatchConfig,
        PipelineConfig,
        TokenizeConfig,
        build_dataset,
        load_records,
        score_arithmetic,
    )
    from cpo_jax.models.generate import generate

    records = prompts_path if hasattr(prompts_path, "records") else load_records(prompts_path, "prompt_only")
    tok_cfg = TokenizeConfig(max_length=max_prompt_length * 2, max_prompt_length=max_prompt_length)
    batch_cfg = BatchConfig(pairs_per_batch=batch, max_length=max_prompt_length * 2, pad_id=tokenizer.pad_token_id or 0)
    pipe = PipelineConfig(kind="prompt_only", shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    # On several hosts every process runs every batch, and the inputs go onto the model's mesh.
    place = functools.partial(host_value_to_global, mesh=_multihost_mesh(model))
    correct = {}
    for b in build_dataset(records.records, tokenizer, tok_cfg, batch_cfg, pipe, sources=records.sources):
        out = generate(
            model,
            place(b["input_ids"]),
            place(b["attention_mask"]),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        tokens, mask = global_to_host(out.tokens), global_to_host(out.mask)
        for slot in np.nonzero(b["pair_mask"])[0]:
            text = tokenizer.decode(tokens[slot][mask[slot] > 0], skip_special_tokens=True)
            index = int(b["index"][slot])
            correct[index] = bool(score_arithmetic(records.records[index]["prompt"], text))
    return np.asarray([correct[i] for i in sorted(correct)], bool)


def _multihost_mesh(model):
    """The mesh of ``model``'s parameters when they span several processes, else None."""
    import jax
    from flax import nnx

    leaf = jax.tree.leaves(nnx.state(model))[0]
    return None if leaf.is_fully_addressable else leaf.sharding.mesh


def format_before_after(before: dict, after: dict) -> str:
    """A small table of :data:`SUMMARY_KEYS` before and after training."""
    rows = [f"{'metric':<42}{'before':>10}{'after':>10}"]
    for key in SUMMARY_KEYS:
        if key in before or key in after:
            cells = "".join(f"{d[key]:>10.4f}" if key in d else f"{'-':>10}" for d in (before, after))
            rows.append(f"{key:<42}{cells}")
    return "\n".join(rows)


#: ``(metric, title)`` panels of :func:`plot_curves` for preference runs and for RLHF runs.
PREFERENCE_PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("diagnostics/frac_in_U", "share of pairs in U"),
    ("diagnostics/abs_accuracy", "policy prefers chosen"),
)
RL_PANELS = (
    ("objective/scores", "reward (sampled; eval: greedy)"),
    ("objective/kl", "KL to reference (nats/seq)"),
    ("policy/entropy_avg", "token entropy"),
    ("response_length/mean", "completion length"),
)


def plot_curves(
    metrics_path: str | os.PathLike,
    out_path: str | os.PathLike,
    panels: tuple[tuple[str, str], ...] = PREFERENCE_PANELS,
) -> Path:
    """PNG of ``panels`` (metric, title) over steps, train and eval (``eval/<metric>``) when logged.

    Unreadable lines of ``metrics_path`` (a torn last write) are skipped with a warning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpo_jax.train.metrics_writer import read_metrics  # tolerates a torn last line (a kill during a write)

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for prefix, style in (("", "-"), ("eval/", "o--")):
            points = [
                (r.get("step", 0), r[prefix + key]) for r in records if isinstance(r.get(prefix + key), (int, float))
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label="eval" if prefix else "train")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
