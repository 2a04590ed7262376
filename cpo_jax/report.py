"""Run reports: generation accuracy on the verifiable task, before/after tables, training-curve plots."""

from __future__ import annotations

import functools
import json
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
) -> dict:
    """Greedy answers to prompt-only arithmetic records, scored by :func:`cpo_jax.data.score_arithmetic`:
    :func:`generation_metrics` of :func:`generation_correct`."""
    correct = generation_correct(
        model, tokenizer, prompts_path, max_new_tokens=max_new_tokens, batch=batch, max_prompt_length=max_prompt_length
    )
    return generation_metrics(correct)


def generation_metrics(correct) -> dict:
    """``generation/accuracy`` and ``generation/prompts`` of per-prompt verdicts ``correct`` ``[N]`` bool, and the
    verdicts themselves as ``generation/correct`` (a list, for a paired before/after comparison)."""
    correct = [bool(c) for c in correct]
    return {
        "generation/accuracy": sum(correct) / len(correct) if correct else 0.0,
        "generation/prompts": float(len(correct)),
        "generation/correct": correct,
    }


def generation_correct(
    model, tokenizer, prompts_path, *, max_new_tokens: int = 24, batch: int = 16, max_prompt_length: int = 256
) -> np.ndarray:
    """bool ``[N]``: whether the greedy answer to each kept prompt (in file order) is right.

    ``prompts_path``: a data spec/path of prompt-only arithmetic records, or a loaded ``RecordSet``."""
    records, answers = greedy_answers(
        model, tokenizer, prompts_path, max_new_tokens=max_new_tokens, batch=batch, max_prompt_length=max_prompt_length
    )
    return score_answers(records, answers)


def score_answers(records: list[dict], answers: list[str]) -> np.ndarray:
    """bool ``[N]``: :func:`cpo_jax.data.score_arithmetic` of each answer against its prompt record."""
    from cpo_jax.data import score_arithmetic

    return np.asarray([bool(score_arithmetic(r["prompt"], a)) for r, a in zip(records, answers, strict=True)], bool)


def greedy_answers(
    model, tokenizer, prompts_path, *, max_new_tokens: int = 24, batch: int = 16, max_prompt_length: int = 256
) -> tuple[list[dict], list[str]]:
    """``(records, answers)``: the kept prompt records in file order and the greedy completion of each, decoded.

    ``prompts_path``: a data spec/path of prompt-only records, or a loaded ``RecordSet``. Prompts the tokenisation
    policy drops (too long) are left out of both lists."""
    from cpo_jax.data import BatchConfig, PipelineConfig, TokenizeConfig, build_dataset, load_records
    from cpo_jax.models.generate import generate

    records = prompts_path if hasattr(prompts_path, "records") else load_records(prompts_path, "prompt_only")
    tok_cfg = TokenizeConfig(max_length=max_prompt_length * 2, max_prompt_length=max_prompt_length)
    batch_cfg = BatchConfig(pairs_per_batch=batch, max_length=max_prompt_length * 2, pad_id=tokenizer.pad_token_id or 0)
    pipe = PipelineConfig(kind="prompt_only", shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    # On several hosts every process runs every batch, and the inputs go onto the model's mesh.
    place = functools.partial(host_value_to_global, mesh=_multihost_mesh(model))
    answers = {}
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
            answers[int(b["index"][slot])] = tokenizer.decode(tokens[slot][mask[slot] > 0], skip_special_tokens=True)
    kept = sorted(answers)
    return [records.records[i] for i in kept], [answers[i] for i in kept]


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


#: ``(metric, title, y label)`` panels of :func:`plot_curves` for preference runs and for RLHF runs.
PREFERENCE_PANELS = (
    ("loss", "loss", "loss per pair"),
    ("rewards/accuracies", "reward accuracy", "share of pairs"),
    ("diagnostics/frac_in_U", "share of pairs in U", "share of pairs"),
    ("diagnostics/abs_accuracy", "policy prefers chosen", "share of pairs"),
    ("generation/accuracy", "generation accuracy (greedy)", "share of prompts solved"),
)
RL_PANELS = (
    ("objective/scores", "reward (sampled; eval: greedy)", "mean reward"),
    ("objective/kl", "KL to reference", "nats per sequence"),
    ("policy/entropy_avg", "token entropy", "nats per token"),
    ("response_length/mean", "completion length", "tokens"),
)
PREFERENCE_CAPTION = (
    "share of pairs in U: pairs whose reference prefers the rejected answer and whose policy still does, "
    "by less (delta_ref < delta_theta < 0), where DPO's loss falls while the preference stays wrong"
)
EMA_WEIGHT = 0.9  # smoothing of the per-batch train lines (TensorBoard's "smoothing" slider)


def ema(values, weight: float = EMA_WEIGHT) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing): ``s_t = w s_{t-1} + (1 - w) x_t`` divided by
    ``1 - w^t``, so the first point is the first value."""
    out, acc = [], 0.0
    for t, x in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * float(x)
        out.append(acc / (1 - weight**t))
    return np.asarray(out)


def plot_curves(
    metrics_path: str | os.PathLike | list[dict],
    out_path: str | os.PathLike,
    panels: tuple[tuple[str, ...], ...] = PREFERENCE_PANELS,
    caption: str | None = None,
) -> Path:
    """PNG of ``panels`` (metric, title, y label) over steps: the train line smoothed (:func:`ema`) over a faint raw
    line, and eval points (``eval/<metric>``). A panel whose metric was never logged is left out; ``caption`` (by
    default :data:`PREFERENCE_CAPTION` when the U panel is shown) goes under the panels.

    ``metrics_path``: a metrics.jsonl file (unreadable lines, a torn last write, are skipped with a warning), or its
    rows already read (a kept curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpo_jax.train.metrics_writer import read_metrics  # tolerates a torn last line (a kill during a write)

    records = list(metrics_path) if isinstance(metrics_path, list) else read_metrics(metrics_path)

    def series(key):
        points = [(r.get("step", 0), r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return tuple(zip(*points)) if points else None

    panels = [(key, title, rest[0] if rest else "") for key, title, *rest in panels]  # (metric, title) works too
    shown = [p for p in panels if series(p[0]) or series("eval/" + p[0])]
    if caption is None and any(p[0] == "diagnostics/frac_in_U" for p in shown):
        caption = PREFERENCE_CAPTION
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(4 * max(len(shown), 1), 3.4), squeeze=False)
    for ax, (key, title, ylabel) in zip(axes[0], shown):
        train = series(key)
        if train:
            (raw,) = ax.plot(*train, "-", alpha=0.25, linewidth=1)
            ax.plot(train[0], ema(train[1]), "-", color=raw.get_color(), label="train (EMA)")
        evaluation = series("eval/" + key)
        if evaluation:
            ax.plot(*evaluation, "o--", label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=8, wrap=True)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    else:
        fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


BEFORE_FILE = "eval_before.json"

#: Files and folders a run may write, in the order :func:`describe_outputs` lists them, with what each is.
RUN_OUTPUTS = (
    ("hf", "the trained model in Hugging Face format (transformers' from_pretrained reads it)"),
    ("hf_adapter", "the LoRA adapters in PEFT's format"),
    ("checkpoints", "Orbax checkpoints: a rerun resumes from the newest; `cpo-jax convert orbax-to-hf` exports any"),
    ("summary.json", "the before/after metrics printed above"),
    ("curves.png", "training curves"),
    ("metrics.jsonl", "every logged metric, one JSON line per step"),
    ("tensorboard", "TensorBoard event files (tensorboard --logdir <this folder>)"),
    ("config.json", "the run's resolved config (a rerun must match it)"),
    ("reference_cache", "reference log-probs, reused by a rerun on the same data"),
    (BEFORE_FILE, "the metrics before training, kept for a resumed run's report"),
)


def write_before(output_dir: Path, before: dict) -> None:
    """Keep the metrics measured before training (scalars, and per-prompt lists such as ``generation/correct``), for
    the report of a run that is later resumed."""
    kept = {k: (list(v) if isinstance(v, (list, tuple)) else float(v)) for k, v in before.items()}
    (Path(output_dir) / BEFORE_FILE).write_text(json.dumps(kept, indent=2))


def generation_change(before: dict, after: dict) -> dict | None:
    """:func:`cpo_jax.experiments.stats.paired_change` of the per-prompt greedy verdicts (``generation/correct``)
    before and after training, or None when either is missing or they cover different prompts."""
    from cpo_jax.experiments.stats import paired_change

    b, a = before.get("generation/correct"), after.get("generation/correct")
    if not b or not a or len(b) != len(a):
        return None
    return paired_change(b, a)


def read_before(output_dir: Path) -> dict:
    """The metrics measured when the run started (:func:`write_before`), else an older run's ``summary.json``
    "before"; ``{}`` when neither exists (the "before" column then shows "-")."""
    for name, pick in ((BEFORE_FILE, lambda d: d), ("summary.json", lambda d: d.get("before") or {})):
        path = Path(output_dir) / name
        if path.is_file():
            try:
                found = pick(json.loads(path.read_text()))
            except (json.JSONDecodeError, AttributeError):
                continue
            if found:
                return found
    return {}


def describe_outputs(output_dir: Path) -> str:
    """Lines naming what ``output_dir`` holds (of :data:`RUN_OUTPUTS`), for the end of a run."""
    output_dir = Path(output_dir)
    rows = [f"outputs in {output_dir}:"]
    for name, what in RUN_OUTPUTS:
        path = output_dir / name
        if path.exists():
            label = name + ("/" if path.is_dir() else "")
            if name == "checkpoints":
                steps = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
                if steps:
                    what = f"{what} (steps {', '.join(map(str, steps))})"
            rows.append(f"  {label:<18}{what}")
    return "\n".join(rows)


def replace_marked(path: Path, begin: str, end: str, body: str) -> None:
    """Rewrites ``path`` with ``body`` between its ``begin`` and ``end`` marker lines (kept), the rest untouched.

    Raises :class:`~cpo_jax.errors.DataError` unless each marker occurs exactly once, ``begin`` first: a table is
    never written into the wrong place, nor dropped silently."""
    from cpo_jax.errors import DataError

    text = Path(path).read_text()
    counts = (text.count(begin), text.count(end))
    if counts != (1, 1) or text.index(begin) > text.index(end):
        raise DataError(
            str(path),
            f"expected the markers {begin!r} and {end!r} once each, in that order; found them {counts[0]} and "
            f"{counts[1]} times",
            hint="restore the two marker lines around the generated text, then rerun",
        )
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    Path(path).write_text(f"{head}{begin}\n{body}\n{end}{tail}")
