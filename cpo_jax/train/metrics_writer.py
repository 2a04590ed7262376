"""Metric sinks: ``metrics.jsonl`` (one object per logged step), TensorBoard (tensorboardX), optional
wandb, and a tqdm progress bar. Only process 0 writes.

A kill during a write can leave a torn (partial) last line in ``metrics.jsonl``. Every reader here
(:func:`read_metrics`, the resume truncation) drops unparseable lines with a warning naming ``file:line``
instead of failing, and the resume rewrites the file atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def _plain(value):
    with contextlib.suppress(AttributeError):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def parse_metrics(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """``(line, record)`` for every readable line of the JSONL file ``path``, in order.

    A line that is not a JSON object with a numeric (or absent) ``step`` (a torn last write, garbage) is dropped
    with a warning naming ``file:line``; blank lines are skipped silently."""
    out = []
    for number, line in enumerate(Path(path).read_text(errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            log.warning(
                "%s:%d: dropping an unreadable metrics line (a write cut short by a kill?): %.80r", path, number, line
            )
            continue
        out.append((line, record))
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of the metrics JSONL file ``path``, unreadable lines dropped (see :func:`parse_metrics`)."""
    return [record for _, record in parse_metrics(path)]


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a kill at any moment leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class MetricsWriter:
    """Writes step metrics to JSONL, TensorBoard and wandb; drives the progress bar."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        progress_bar: bool = True,
        config: dict | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir), resume="allow")
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` by a run that is now resumed from ``step``, and unreadable (torn)
        lines; the file is rewritten atomically, and only when that changes it."""
        if not self.path.is_file():
            return
        text = "".join(line + "\n" for line, record in parse_metrics(self.path) if record.get("step", 0) <= step)
        if text != self.path.read_text(errors="replace"):
            write_atomically(self.path, text)

    def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
        """Log ``metrics`` at ``step``; returns the plain-Python record written."""
        record = {"step": step, **{f"{prefix}{k}": _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        return record

    def advance(self, step: int, loss: float | None = None) -> None:
        """Move the progress bar to ``step`` and show the loss."""
        if self._bar is not None:
            self._bar.n = step
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        """Flush and close every sink."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
