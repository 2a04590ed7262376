"""Before training: how often does a dataset break the assumption behind DPO?

The paper (Yang et al. 2026, "Conditional Equivalence of DPO and RLHF", arXiv 2605.20834) shows that
DPO is equivalent to KL-regularised RLHF only when the RLHF-optimal policy prefers the human-chosen
answer. The RLHF optimum is ``pi* ∝ pi_ref · exp(r / beta)``, so its margin is
``delta* = delta_ref + (r_w - r_l) / beta`` with

    delta_ref = log pi_ref(y_w | x) - log pi_ref(y_l | x)

(completion log-probs summed over tokens). The assumption can only fail where ``delta_ref < 0``: the
reference already prefers the *rejected* answer. On such a pair DPO's loss
``-log sigmoid(beta·(delta_theta - delta_ref))`` falls below log 2 as soon as ``delta_theta`` rises
above ``delta_ref``, so the policy can enter the undesirable region
``U = {delta_ref < delta_theta < 0}`` (the paper's Def. 3.3, as defined in the released code): lower
loss than the reference, yet it still prefers ``y_l`` ("pathological convergence"). The share of
pairs with ``delta_ref < 0`` is therefore the share on which DPO gives no guarantee of alignment.

:func:`audit_preferences` runs the frozen reference over a preference dataset once (the same
tokenisation, truncation and log-prob code as training, :func:`cpo_jax.train.reference_cache.
compute_reference_logps`) and reports:

* ``frac_ref_prefers_rejected``: share of scored pairs with summed ``delta_ref < 0`` (DPO's units;
  at step 0 it equals the training diagnostic ``diagnostics/frac_ref_prefers_rejected``);
* ``frac_ref_prefers_rejected_norm``: the same on length-normalised margins, each side divided by its
  number of scored completion tokens (the units of the released CPO code, whose targets use per-token
  averages); a long rejected answer makes the summed margin look better for ``y_w`` than the average;
* ``frac_ref_prefers_rejected_both``: negative in both units;
* summary statistics and histograms of both margins, and the ``top_k`` pairs most at risk (the most
  negative normalised margin) with previews, to inspect by hand.

Shares are over *scored* pairs: pairs the length policy drops (prompt longer than
``max_prompt_length``) are counted in ``num_dropped`` and otherwise left out, as training leaves them
out. A completion cut by truncation is measured as training sees it (its kept tokens only).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpo_jax.data import BatchConfig, PipelineConfig, TokenizeConfig, load_records
from cpo_jax.data import audit as tokenisation_report
from cpo_jax.fileio import apply_umask

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 40
PREVIEW_CHARS = 120


# ------------------------------------------------------------------------------------------------
# numbers


def summary_stats(values: np.ndarray) -> dict[str, float | None]:
    """``mean``, ``std`` (population), ``min``, ``q01`` ... ``q99`` (NumPy's linear quantiles), ``max``."""
    values = np.asarray(values, np.float64)
    names = ["mean", "std", "min", *(f"q{round(q * 100):02d}" for q in QUANTILES), "max"]
    if values.size == 0:
        return dict.fromkeys(names)
    numbers = [values.mean(), values.std(), values.min(), *np.quantile(values, QUANTILES), values.max()]
    return {name: float(x) for name, x in zip(names, numbers)}


def histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """``{"bins": edges (bins + 1), "counts": (bins)}`` over a range stretched to include 0."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"bins": [], "counts": []}
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return {"bins": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _share(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def _text(value: Any) -> str:
    """A record field as text: strings as they are, message lists as ``role: content`` lines."""
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    return str(value)


def preview(value: Any, chars: int = PREVIEW_CHARS) -> str:
    """The first ``chars`` characters of :func:`_text`, with ``…`` appended when cut."""
    text = _text(value)
    return text if len(text) <= chars else text[:chars] + "…"


# ------------------------------------------------------------------------------------------------
# the audit


def audit_preferences(
    model_path: str | os.PathLike,
    data_paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    truncation: str = "keep_start",
    pairs_per_batch: int = 8,
    top_k: int = 20,
    tokenizer=None,
) -> dict[str, Any]:
    """Measure, before training, how often the reference prefers the rejected answer.

    Args:
      model_path: HF checkpoint directory of the reference (SFT) model; its tokenizer is loaded from
        there unless ``tokenizer`` is given.
      data_paths: preference files (JSONL/Parquet/saved ``datasets``), read with
        :func:`cpo_jax.data.load_records` before the model is loaded; a missing file raises
        ``FileNotFoundError`` naming it.
      max_length, max_prompt_length, truncation: the length policy (:class:`cpo_jax.data.TokenizeConfig`);
        use the training run's values so that the audit sees the same tokens.
      pairs_per_batch: pairs per forward pass.
      top_k: how many of the most at-risk pairs to list.
      tokenizer: an HF tokenizer to use instead of the checkpoint's.

    Returns:
      A JSON-serialisable dict (statistics are ``None`` when no pair is scored):

      * ``model_path``, ``data_paths``, ``settings`` (the length policy with the effective
        ``max_prompt_length``, ``pairs_per_batch``, ``top_k``);
      * ``num_pairs`` (records read), ``num_scored``, ``num_dropped``, ``dropped_reasons`` (code -> count);
      * ``delta_ref`` and ``delta_ref_norm``: :func:`summary_stats` of the summed and the
        length-normalised margins;
      * ``num_ref_prefers_rejected{,_norm,_both}`` and ``frac_ref_prefers_rejected{,_norm,_both}``:
        counts and shares of scored pairs with ``delta_ref < 0`` (summed, normalised, both);
      * ``histogram``: ``{"summed": {"bins", "counts"}, "normalised": {...}}``;
      * ``top_at_risk``: up to ``top_k`` pairs sorted by ascending ``delta_ref_norm`` (ties by index),
        each with ``index``, ``source`` (``file:line``), ``at_risk`` (``delta_ref_norm < 0``),
        ``delta_ref``, ``delta_ref_norm``, ``ref_chosen_logp``, ``ref_rejected_logp``,
        ``chosen_tokens``, ``rejected_tokens`` and ``prompt``/``chosen``/``rejected`` previews
        (:data:`PREVIEW_CHARS` characters).
    """
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.train.reference_cache import compute_reference_logps

    data_paths = [data_paths] if isinstance(data_paths, (str, os.PathLike)) else list(data_paths)
    if not data_paths:
        raise ValueError("no data paths given")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    data = load_records(data_paths, "preference")  # before the model: a bad path fails fast
    if tokenizer is None:
        from cpo_jax.hf.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_path)
    model = from_pretrained(model_path)
    tokenize_cfg = TokenizeConfig(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation=truncation,
        vocab_size=model.config.vocab_size,
    )
    batch_cfg = BatchConfig(pairs_per_batch=pairs_per_batch, max_length=max_length, pad_id=tokenizer.pad_token_id or 0)

    # Scored token counts come from the same pass as the log-probs; drops are counted by reason.
    n = len(data)
    logps, lengths = compute_reference_logps(
        model, data.records, data.sources, tokenizer, tokenize_cfg, batch_cfg, return_lengths=True
    )
    logps, lengths = np.asarray(logps, np.float64), np.asarray(lengths, np.float64)
    dropped = tokenisation_report(
        data.records, tokenizer, tokenize_cfg, PipelineConfig(shard_index=0, shard_count=1), sources=data.sources
    ).dropped
    kept = ~np.isnan(logps).any(axis=1)
    idx = np.flatnonzero(kept)
    delta = logps[idx, 0] - logps[idx, 1]
    delta_norm = logps[idx, 0] / lengths[idx, 0] - logps[idx, 1] / lengths[idx, 1]
    neg, neg_norm = delta < 0, delta_norm < 0

    order = idx[np.argsort(delta_norm, kind="stable")][:top_k]
    position = {int(i): k for k, i in enumerate(idx)}
    top = []
    for i in order:
        k, record = position[int(i)], data.records[i]
        top.append(
            {
                "index": int(i),
                "source": data.sources[i],
                "at_risk": bool(delta_norm[k] < 0),
                "delta_ref": float(delta[k]),
                "delta_ref_norm": float(delta_norm[k]),
                "ref_chosen_logp": float(logps[i, 0]),
                "ref_rejected_logp": float(logps[i, 1]),
                "chosen_tokens": int(lengths[i, 0]),
                "rejected_tokens": int(lengths[i, 1]),
                "prompt": preview(record["prompt"]),
                "chosen": preview(record["chosen"]),
                "rejected": preview(record["rejected"]),
            }
        )

    return {
        "model_path": str(model_path),
        "data_paths": [str(p) for p in data_paths],
        "settings": {
            "max_length": max_length,
            "max_prompt_length": tokenize_cfg.prompt_limit,
            "truncation": truncation,
            "pairs_per_batch": pairs_per_batch,
            "top_k": top_k,
        },
        "num_pairs": n,
        "num_scored": int(idx.size),
        "num_dropped": int(n - idx.size),
        "dropped_reasons": dict(dropped),
        "delta_ref": summary_stats(delta),
        "delta_ref_norm": summary_stats(delta_norm),
        "num_ref_prefers_rejected": int(neg.sum()),
        "num_ref_prefers_rejected_norm": int(neg_norm.sum()),
        "num_ref_prefers_rejected_both": int((neg & neg_norm).sum()),
        "frac_ref_prefers_rejected": _share(neg),
        "frac_ref_prefers_rejected_norm": _share(neg_norm),
        "frac_ref_prefers_rejected_both": _share(neg & neg_norm),
        "histogram": {"summed": histogram(delta), "normalised": histogram(delta_norm)},
        "top_at_risk": top,
    }


# ------------------------------------------------------------------------------------------------
# output


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (
        ("summed", "frac_ref_prefers_rejected", "delta_ref (summed log-probs)"),
        ("normalised", "frac_ref_prefers_rejected_norm", "delta_ref (per-token average log-probs)"),
    )
    for ax, (key, share, label) in zip(fig.subplots(1, 2), panels):
        hist = report["histogram"][key]
        if hist["counts"]:
            ax.stairs(hist["counts"], hist["bins"], fill=True, alpha=0.6)
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{key}: {_percent(report[share])} of pairs < 0")
        ax.set_xlabel(label)
        ax.set_ylabel("pairs")
    fig.suptitle(f"Reference margin on {report['num_scored']} pairs (< 0: reference prefers the rejected answer)")
    fig.savefig(path, format="png", dpi=100)


def write_audit(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``audit.json`` (the report) and ``delta_ref_hist.png`` (two histograms) into ``out_dir``.

    Each file is written to a temporary name in ``out_dir`` and renamed into place, so a reader never
    sees a half-written file. Returns ``{"json": path, "png": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "audit.json", "png": out_dir / "delta_ref_hist.png"}
    text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    _replace_atomically(paths["json"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    _replace_atomically(paths["png"], lambda tmp: _plot(report, tmp))
    return paths


def format_audit(report: dict) -> str:
    """A few lines for a terminal: counts, the shares below zero, the margins' spread, the worst pair."""
    lines = [
        f"delta_ref audit of {report['num_scored']} pair(s) ({report['num_dropped']} dropped by the length "
        f"policy) under {report['model_path']}"
    ]
    shares = [_percent(report[f"frac_ref_prefers_rejected{s}"]) for s in ("", "_norm", "_both")]
    lines.append(
        f"reference prefers the rejected answer (delta_ref < 0): {shares[0]} summed, {shares[1]} per-token,"
        f" {shares[2]} both"
    )
    for key, name in (("delta_ref", "summed"), ("delta_ref_norm", "per-token")):
        s = report[key]
        if s["mean"] is not None:
            lines.append(
                f"  {name:9s} delta_ref: median {s['q50']:+.3f}, 5%..95% [{s['q05']:+.3f}, {s['q95']:+.3f}],"
                f" min {s['min']:+.3f}"
            )
    if report["top_at_risk"] and report["top_at_risk"][0]["at_risk"]:
        worst = report["top_at_risk"][0]
        lines.append(
            f"most at risk: {worst['source']} (per-token {worst['delta_ref_norm']:+.3f},"
            f" summed {worst['delta_ref']:+.3f})"
        )
    lines.append(
        "On pairs with delta_ref < 0, DPO can lower its loss while the policy still prefers the rejected "
        "answer (region U = {delta_ref < delta_theta < 0})."
    )
    return "\n".join(lines)
