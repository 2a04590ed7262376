"""Preference records from JSONL, Parquet and saved Hugging Face ``datasets`` directories.

Three record kinds, each in TRL's *standard* (strings) or *conversational* (lists of
``{"role", "content"}`` messages) form:

* ``preference``: ``prompt`` (optional: implicit prompts are extracted), ``chosen``, ``rejected``;
* ``unpaired`` (KTO): ``prompt``, ``completion``, ``label`` (bool: desirable or not);
* ``prompt_only`` (on-policy RLHF): ``prompt``, plus any extra keys (kept, e.g. a reference answer).

Every record keeps its provenance (``file:line`` for JSONL, ``file:row N`` otherwise), and every
problem (bad JSON, invalid UTF-8, a missing key, a wrong type, an empty completion) is a
:class:`DataError` naming the file, the line and the problem. With ``skip_invalid=True`` bad rows
are counted, logged and skipped instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("preference", "unpaired", "prompt_only")
_FIELDS = {
    "preference": ("chosen", "rejected"),
    "unpaired": ("completion",),
    "prompt_only": (),
}


class DataError(ValueError):
    """A bad input row; the message starts with ``file:line``."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source, self.problem = source, problem


@dataclasses.dataclass
class RecordSet:
    """Validated records with their provenance, and what was skipped (``skip_invalid=True``)."""

    records: list[dict]
    sources: list[str]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


# ------------------------------------------------------------------------------------------------
# raw rows


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield source, DataError(source, f"invalid UTF-8 at byte {err.start}")
                continue
            if not text.strip():
                continue
            try:
                yield source, json.loads(text)
            except json.JSONDecodeError as err:
                yield source, DataError(source, f"bad JSON: {err.msg} at column {err.colno}")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {number}", row


def _hf_dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split is None or split not in data:
            raise DataError(str(path), f"a DatasetDict with splits {sorted(data)}; choose one with split=")
        data, path = data[split], path / split
    for number, row in enumerate(data, start=1):
        yield f"{path}:row {number}", row


def raw_rows(path: str | os.PathLike, *, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """``(source, row)`` for every row of a JSONL/Parquet file, a saved ``datasets`` directory, or a
    ``bundled:<name>`` source (:mod:`cpo_jax.data.sources`).

    A row that cannot be decoded is yielded as a :class:`DataError` (not raised), so that the caller
    decides whether to skip it.
    """
    from cpo_jax.data.sources import bundled_rows, is_bundled

    if is_bundled(path):
        return iter(bundled_rows(path))
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _hf_dataset_rows(path, split)
        raise DataError(str(path), "a directory that is not a saved Hugging Face dataset (no dataset_info.json)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    if suffix in (".parquet", ".pq"):
        return _parquet_rows(path)
    raise DataError(str(path), f"unknown data format {suffix!r}; expected .jsonl, .parquet or a datasets directory")


# ------------------------------------------------------------------------------------------------
# validation


def is_conversational(value: Any) -> bool:
    """True for a list of messages."""
    return isinstance(value, list)


def _check_messages(value: list, key: str, source: str) -> None:
    if not value:
        raise DataError(source, f"{key!r} is an empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(source, f"{key}[{i}] is a {type(message).__name__}, expected a {{role, content}} dict")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise DataError(source, f"{key}[{i}] has no string {field!r}")


def _check_value(value: Any, key: str, source: str, *, allow_empty: bool) -> None:
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise DataError(source, f"{key!r} is empty")
    elif isinstance(value, list):
        _check_messages(value, key, source)
    else:
        raise DataError(source, f"{key!r} is a {type(value).__name__}, expected a string or a list of messages")


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """Split an implicit prompt off ``chosen``/``rejected`` (TRL's ``extract_prompt``).

    Conversational: the longest common message prefix. Standard: the longest common string prefix,
    moved back by one character when it ends just after a space (the space stays with the completions).
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and 0 < n < limit and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def validate(row: Any, kind: str, source: str) -> dict:
    """Check one row and return the normalised record (explicit prompt, consistent form)."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    if not isinstance(row, dict):
        raise DataError(source, f"a {type(row).__name__}, expected a JSON object")
    fields = _FIELDS[kind]
    missing = [k for k in fields if k not in row]
    if kind != "preference" and "prompt" not in row:
        missing.insert(0, "prompt")
    if kind == "unpaired" and "label" not in row:
        missing.append("label")
    if missing:
        raise DataError(source, f"missing key(s) {missing}; found {sorted(row)}")
    record = dict(row)
    for key in fields:
        _check_value(row[key], key, source, allow_empty=False)
    if kind == "preference" and "prompt" not in row:
        chosen, rejected = row["chosen"], row["rejected"]
        if is_conversational(chosen) != is_conversational(rejected):
            raise DataError(source, "'chosen' and 'rejected' mix strings and message lists")
        record["prompt"], record["chosen"], record["rejected"] = extract_prompt(chosen, rejected)
        for key in ("chosen", "rejected"):
            if not record[key]:
                raise DataError(source, f"no {key} completion is left after removing the implicit prompt")
    else:
        _check_value(row["prompt"], "prompt", source, allow_empty=kind != "prompt_only")
    forms = {is_conversational(record[k]) for k in ("prompt", *fields) if record[k] != ""}
    if len(forms) > 1:
        raise DataError(source, f"{['prompt', *fields]} mix strings and message lists")
    if kind == "unpaired" and not isinstance(row["label"], bool):
        raise DataError(source, f"'label' is a {type(row['label']).__name__}, expected true or false")
    return record


def load_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    kind: str = "preference",
    *,
    skip_invalid: bool = False,
    split: str | None = None,
) -> RecordSet:
    """Read and validate every row of one or more files/directories, in order.

    Raises the first :class:`DataError` unless ``skip_invalid``, in which case each bad row is logged
    and listed in :attr:`RecordSet.skipped`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = RecordSet([], [])
    for path in paths:
        for source, row in raw_rows(path, split=split):
            try:
                if isinstance(row, DataError):
                    raise row
                out.records.append(validate(row, kind, source))
                out.sources.append(source)
            except DataError as err:
                if not skip_invalid:
                    raise
                log.warning("skipping %s", err)
                out.skipped.append((source, err.problem))
    if out.skipped:
        log.warning("skipped %d invalid row(s) of %d", len(out.skipped), len(out.skipped) + len(out.records))
    return out


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write records as UTF-8 JSONL (one object per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
