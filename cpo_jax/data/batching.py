"""Tokenised examples -> fixed-shape numpy batches: bucketed padding or packing, one layout for both.

The batch layout (every array numpy; ``R`` rows of ``L`` tokens, ``P`` = ``pairs_per_batch`` example slots):

=================  ===========  ====================================================================
key                shape/dtype  meaning
=================  ===========  ====================================================================
``input_ids``      [R, L] i32   tokens; ``pad_id`` in padding
``positions``      [R, L] i32   position ids, restarting at 0 in every segment
``segment_ids``    [R, L] i32   1, 2, ... per sequence packed in the row; 0 = padding
``targets``        [R, L] i32   the next token of the same segment (``pad_id`` where there is none)
``loss_mask``      [R, L] f32   1 where ``targets`` is a completion token (position t scores token t+1)
``sequence_ids``   [R, L] i32   the sequence slot of each position: ``2p`` (chosen of slot p), ``2p+1``
                                (rejected); ``p`` for unpaired examples; -1 for padding
``pair_mask``      [P] bool     slot p holds an example (a final partial batch has empty slots)
``index``          [P] i64      dataset index of the example in slot p (-1 when empty)
``labels``         [P] bool     unpaired (KTO) only: desirable or not
=================  ===========  ====================================================================

Per-sequence log-prob sums are then ``segment_sum(token_logps * loss_mask, sequence_ids, 2P)``, for
packed and padded batches alike. Prompt-only batches (for generation) are left-padded instead:
``input_ids`` and ``attention_mask`` [P, L], plus ``pair_mask`` and ``index``.

Bucketed padding pads ``L`` up to the smallest of ``buckets`` that holds the longest sequence, so jit
sees a handful of shapes; packing fills ``rows_per_batch`` rows of ``max_length`` first-fit.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from cpo_jax.errors import ConfigError

PREFERENCE, UNPAIRED, PROMPT_ONLY = "preference", "unpaired", "prompt_only"

#: Per-token ``[R, L]`` arrays of a batch and their dtypes.
ROW_KEYS = {
    "input_ids": np.int32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "sequence_ids": np.int32,
}


def row_fill(key: str, pad_id: int) -> int:
    """The value a per-token array holds in padding: ``pad_id`` for tokens, -1 for sequence slots, else 0."""
    return pad_id if key in ("input_ids", "targets") else (-1 if key == "sequence_ids" else 0)


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How examples become batches.

    Attributes:
      pairs_per_batch: example slots per batch (P): pairs, unpaired examples or prompts.
      max_length: the longest sequence (and the packed row length).
      buckets: padded lengths for unpacked batches; default: powers of two from 64 up to ``max_length``.
      pack: pack sequences into ``rows_per_batch`` rows of ``max_length`` with segment ids.
      rows_per_batch: rows of a packed batch (default ``pairs_per_batch``).
      pad_id: the padding token id.
    """

    pairs_per_batch: int
    max_length: int
    buckets: tuple[int, ...] = ()
    pack: bool = False
    rows_per_batch: int | None = None
    pad_id: int = 0

    def __post_init__(self):
        if self.pairs_per_batch < 1:
            raise ConfigError(f"pairs_per_batch must be >= 1, got {self.pairs_per_batch}", where="data.pairs_per_batch")
        if self.buckets and max(self.buckets) < self.max_length:
            raise ValueError(f"the largest bucket {max(self.buckets)} is below max_length {self.max_length}")
        if self.pack and self.rows < 2:
            raise ConfigError(
                f"packing needs at least 2 rows per batch (chosen and rejected), got {self.rows}",
                where="data.rows_per_batch",
                hint="set data.rows_per_batch >= 2 (it defaults to data.pairs_per_batch), or data.pack=false",
            )

    @property
    def rows(self) -> int:
        """Rows of a packed batch."""
        return self.rows_per_batch or self.pairs_per_batch

    def bucket_for(self, length: int) -> int:
        """The padded length for a batch whose longest sequence has ``length`` tokens."""
        buckets = self.buckets or default_buckets(self.max_length)
        return min(b for b in buckets if b >= length)


def default_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to and including ``max_length``."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


def example_sequences(example: dict, kind: str) -> list[tuple[np.ndarray, int, int]]:
    """``(ids, prompt_len, sequence slot offset)`` for each sequence of one tokenised example."""
    if kind == PREFERENCE:
        return [
            (example["chosen"], int(example["chosen_prompt_len"]), 0),
            (example["rejected"], int(example["rejected_prompt_len"]), 1),
        ]
    if kind == UNPAIRED:
        return [(example["completion"], int(example["prompt_len"]), 0)]
    raise ValueError(f"no sequences for kind {kind!r}")


class BatchBuilder:
    """Accumulates examples into one batch; :meth:`add` says whether an example still fits."""

    def __init__(self, cfg: BatchConfig, kind: str):
        self.cfg, self.kind = cfg, kind
        self.examples: list[dict] = []
        self.placements: list[list[int]] = []  # per example: the row of each of its sequences
        self.row_fill = [0] * cfg.rows if cfg.pack else []

    @property
    def full(self) -> bool:
        """No example slot is left."""
        return len(self.examples) == self.cfg.pairs_per_batch

    def add(self, example: dict) -> bool:
        """Place ``example`` if it fits (slots, and packed rows first-fit); returns False otherwise."""
        if self.full:
            return False
        if self.kind == PROMPT_ONLY or not self.cfg.pack:
            self.examples.append(example)
            return True
        fill = list(self.row_fill)
        rows = []
        for ids, _, _ in example_sequences(example, self.kind):
            row = next((r for r, used in enumerate(fill) if used + len(ids) <= self.cfg.max_length), None)
            if row is None:
                if not self.examples:
                    raise ValueError(f"example {int(example['index'])} does not fit in an empty packed batch")
                return False
            fill[row] += len(ids)
            rows.append(row)
        self.row_fill = fill
        self.examples.append(example)
        self.placements.append(rows)
        return True

    def build(self) -> dict[str, np.ndarray]:
        """The batch arrays (see the module docstring)."""
        if self.kind == PROMPT_ONLY:
            return self._prompt_batch()
        cfg, p = self.cfg, self.cfg.pairs_per_batch
        per_example = 2 if self.kind == PREFERENCE else 1
        if cfg.pack:
            rows, length = cfg.rows, cfg.max_length
        else:
            rows = per_example * p
            longest = max((len(s[0]) for ex in self.examples for s in example_sequences(ex, self.kind)), default=1)
            length = cfg.bucket_for(longest)
        batch = {key: np.full((rows, length), row_fill(key, cfg.pad_id), dtype) for key, dtype in ROW_KEYS.items()}
        batch["pair_mask"] = np.zeros((p,), bool)
        batch["index"] = np.full((p,), -1, np.int64)
        if self.kind == UNPAIRED:
            batch["labels"] = np.zeros((p,), bool)
        cursor = np.zeros((rows,), np.int64)
        segments = np.zeros((rows,), np.int32)
        for slot, example in enumerate(self.examples):
            batch["pair_mask"][slot] = True
            batch["index"][slot] = example["index"]
            if self.kind == UNPAIRED:
                batch["labels"][slot] = example["label"]
            for k, (ids, prompt_len, offset) in enumerate(example_sequences(example, self.kind)):
                row = self.placements[slot][k] if cfg.pack else per_example * slot + offset
                start = int(cursor[row])
                end = start + len(ids)
                segments[row] += 1
                segment = int(segments[row])
                batch["input_ids"][row, start:end] = ids
                batch["positions"][row, start:end] = np.arange(len(ids))
                batch["segment_ids"][row, start:end] = segment
                batch["targets"][row, start : end - 1] = ids[1:]
                # position t scores token t+1: completion tokens are ids[prompt_len:]
                batch["loss_mask"][row, start + max(prompt_len - 1, 0) : end - 1] = 1.0
                batch["sequence_ids"][row, start:end] = per_example * slot + offset
                cursor[row] = end
        return batch

    def _prompt_batch(self) -> dict[str, np.ndarray]:
        cfg, p = self.cfg, self.cfg.pairs_per_batch
        longest = max((len(ex["prompt"]) for ex in self.examples), default=1)
        length = cfg.bucket_for(longest)
        batch = {
            "input_ids": np.full((p, length), cfg.pad_id, np.int32),
            "attention_mask": np.zeros((p, length), np.int32),
            "pair_mask": np.zeros((p,), bool),
            "index": np.full((p,), -1, np.int64),
        }
        for slot, example in enumerate(self.examples):
            ids = example["prompt"]
            batch["input_ids"][slot, length - len(ids) :] = ids
            batch["attention_mask"][slot, length - len(ids) :] = 1
            batch["pair_mask"][slot] = True
            batch["index"][slot] = example["index"]
        return batch


class BatchIterDataset(grain.IterDataset):
    """Groups a stream of tokenised examples into batches (:class:`BatchBuilder`), checkpointably."""

    def __init__(self, parent: grain.IterDataset, cfg: BatchConfig, kind: str):
        super().__init__(parent)
        self._cfg, self._kind = cfg, kind

    def __iter__(self) -> grain.DatasetIterator:
        return _BatchIterator(self._parent.__iter__(), self._cfg, self._kind)

    def __str__(self) -> str:
        return f"BatchIterDataset(pairs_per_batch={self._cfg.pairs_per_batch}, pack={self._cfg.pack})"


class _BatchIterator(grain.DatasetIterator):
    """State = the parent's state before the example that is waiting for the next batch.

    An example that did not fit is held back; restoring re-reads it from the parent, so a restored
    iterator produces exactly the batches the original would have.
    """

    def __init__(self, parent: grain.DatasetIterator, cfg: BatchConfig, kind: str):
        super().__init__(parent)
        self._it, self._cfg, self._kind = parent, cfg, kind
        self._pending = None
        self._pending_state = None

    def _pull(self) -> bool:
        state = self._it.get_state()
        try:
            self._pending = next(self._it)
        except StopIteration:
            return False
        self._pending_state = state
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pending is None and not self._pull():
            raise StopIteration
        builder = BatchBuilder(self._cfg, self._kind)
        while builder.add(self._pending):
            self._pending = None
            if builder.full or not self._pull():
                break
        return builder.build()

    def get_state(self) -> dict:
        return {"parent": self._pending_state if self._pending is not None else self._it.get_state()}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["parent"])
        self._pending = None
        self._pending_state = None
