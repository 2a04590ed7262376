"""Preference records from JSONL, Parquet and saved Hugging Face ``datasets`` directories.

Three record kinds, each in TRL's *standard* (strings) or *conversational* (lists of
``{"role", "content"}`` messages) form:

* ``preference``: ``prompt`` (optional: implicit prompts are extracted), ``chosen``, ``rejected``;
* ``unpaired`` (KTO): ``prompt``, ``completion``, ``label`` (bool: desirable or not);
* ``prompt_only`` (on-policy RLHF): ``prompt``, plus any extra keys (kept, e.g. a reference answer).

Every record keeps its provenance (``file:line`` for JSONL, ``file:row N`` otherwise), and every
problem with a row (bad JSON, invalid UTF-8, a missing key, a wrong type, an empty completion, an
unknown chat role) is a :class:`DataError` naming the file, the line and the problem. With
``skip_invalid=True`` bad rows are counted, logged and skipped instead. Problems with a whole file (a
missing path, an unknown format, a JSON array in a ``.jsonl`` file, an unreadable Parquet file or saved
dataset, a file that holds no records) are raised whatever ``skip_invalid`` says.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cpo_jax.errors import DataError, UserFileNotFoundError, first_line

log = logging.getLogger(__name__)

KINDS = ("preference", "unpaired", "prompt_only")
_FIELDS = {
    "preference": ("chosen", "rejected"),
    "unpaired": ("completion",),
    "prompt_only": (),
}
_NEEDS = {
    "preference": "'chosen' and 'rejected' (and optionally 'prompt')",
    "unpaired": "'prompt', 'completion' and a true/false 'label'",
    "prompt_only": "'prompt'",
}
#: Chat roles a message may have (those chat templates know, OpenAI's and Llama 3's included).
ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}
#: Accepted data paths, for error messages.
FORMATS = (
    ".jsonl (or .json holding JSON Lines), .parquet (or .pq), a saved Hugging Face datasets directory, "
    "or bundled:<name>"
)
#: Bytes read to tell JSON Lines from a JSON array or a pretty-printed JSON document.
_SNIFF_BYTES = 1 << 16


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


def json_layout(head: bytes) -> str | None:
    """What the first bytes of a ``.jsonl``/``.json`` file say it is, without reading the rest.

    Returns ``"array"`` (one JSON array, on one line or pretty-printed), ``"document"`` (one JSON object spread over
    several lines: its first line is valid JSON up to the line end but incomplete, and the next non-blank line does not
    start a new object), or None (JSON Lines as far as the first lines show; bad rows are then reported one by one).
    """
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        return "array"
    first, newline, rest = text.partition("\n")
    if not text.startswith("{") or not newline:  # not an object, or a first line longer than the bytes read
        return None
    try:
        json.loads(first)
        return None
    except json.JSONDecodeError as err:
        if err.pos < len(first.rstrip()):  # broken inside the line, not cut short by its end: a bad JSON Lines row
            return None
    second = next((line for line in rest.splitlines() if line.strip()), "")
    return None if second.lstrip().startswith("{") else "document"


def _not_json_lines(path: Path, layout: str) -> DataError:
    """The error for a ``.jsonl``/``.json`` file that holds one JSON array or document."""
    quoted = shlex.quote(str(path))
    if layout == "array":
        return DataError(
            str(path),
            "holds one JSON array, not JSON Lines (one JSON object per line)",
            hint=f"convert it with: jq -c '.[]' {quoted} > out.jsonl; or, without jq: python -c "
            f'"import json, sys; [print(json.dumps(r, ensure_ascii=False)) for r in '
            f'json.load(open(sys.argv[1]))]" {quoted} > out.jsonl',
        )
    return DataError(
        str(path),
        "holds one JSON object spread over several lines, not JSON Lines (one JSON object per line)",
        hint=f"write one record per line: jq -c . {quoted} > out.jsonl (or jq -c '.KEY[]' when the "
        f"records are a list under KEY)",
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        layout = json_layout(f.read(_SNIFF_BYTES))
        if layout is not None:
            raise _not_json_lines(path, layout)
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            source = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    source,
                    DataError(
                        source,
                        f"invalid UTF-8 at byte {err.start}",
                        hint="save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    ),
                )
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not text or text.isspace():  # isspace: no copy of a long line
                continue
            try:
                yield source, json.loads(text)
            except json.JSONDecodeError as err:
                yield (
                    source,
                    DataError(
                        source,
                        f"bad JSON: {err.msg} at column {err.colno}",
                        hint="each line must be one complete JSON object",
                    ),
                )


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):  # a batch at a time, not the whole table
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row
    except (pa.ArrowException, OSError) as err:
        where = f" after row {number}" if number else ""
        raise DataError(
            str(path),
            f"not a readable Parquet file{where}: {first_line(err)}",
            hint="check that the file was written completely by a Parquet writer "
            "(e.g. pyarrow.parquet.write_table or Dataset.to_parquet)",
        ) from err


def _hf_dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets raises many types (FileNotFoundError, ValueError, Arrow errors)
        raise DataError(
            str(path),
            f"a saved Hugging Face dataset that does not load: {first_line(err)}",
            hint="re-create it with Dataset.save_to_disk, or give the JSONL/Parquet files it came from",
        ) from err
    if isinstance(data, datasets.DatasetDict):
        if split is None or split not in data:
            chosen = "no split was chosen" if split is None else f"split {split!r} is not one of them"
            raise DataError(
                str(path),
                f"a DatasetDict with splits {sorted(data)}; {chosen}",
                hint="choose one with split= (data.split in a training config)",
            )
        data, path = data[split], path / split
    for number, row in enumerate(data, start=1):
        yield f"{path}:row {number}", row


def raw_rows(path: str | os.PathLike, *, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """``(source, row)`` for every row of a JSONL/Parquet file, a saved ``datasets`` directory, or a
    ``bundled:<name>`` source (:mod:`cpo_jax.data.sources`).

    A row that cannot be decoded is yielded as a :class:`DataError` (not raised), so that the caller
    decides whether to skip it. Problems with the whole file are raised: a missing path
    (:class:`UserFileNotFoundError`), an empty file, an unknown format, a JSON array or pretty-printed
    JSON document in a ``.jsonl``/``.json`` file, an unreadable Parquet file or saved dataset
    (:class:`DataError`; the last three when iteration starts).
    """
    from cpo_jax.data.sources import bundled_rows, is_bundled

    if is_bundled(path):
        return iter(bundled_rows(path))
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _hf_dataset_rows(path, split)
        raise DataError(
            str(path),
            "a directory that is not a saved Hugging Face dataset (no dataset_info.json or dataset_dict.json)",
            hint=f"give a data file or a dataset directory: {FORMATS}",
        )
    if not path.is_file():
        raise UserFileNotFoundError(
            "no such data file", where=str(path), hint=f"check the path (relative paths start at {Path.cwd()})"
        )
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet", ".pq"):
        raise DataError(
            str(path),
            f"unknown data format {suffix!r}; expected {FORMATS}",
            hint="convert the file to JSON Lines or Parquet",
        )
    if path.stat().st_size == 0:
        raise DataError(
            str(path),
            "holds no records: the file is empty (0 bytes)",
            hint="check that it was written completely, or leave it out",
        )
    return _jsonl_rows(path) if suffix in (".jsonl", ".json") else _parquet_rows(path)


# ------------------------------------------------------------------------------------------------
# validation


def is_conversational(value: Any) -> bool:
    """True for a list of messages."""
    return isinstance(value, list)


def _role_hint(role: str) -> str:
    """What to do about an unknown chat role."""
    known = role.lower() if role.lower() in ROLES else _ROLE_ALIASES.get(role.lower())
    if known is not None:
        return f"use {known!r} for {role!r} (rename the roles when converting the data, e.g. ShareGPT's human/gpt)"
    return "rename the role to one the chat template knows, or drop the message"


def _check_messages(value: list, key: str, source: str) -> None:
    if not value:
        raise DataError(source, f"{key!r} is an empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(source, f"{key}[{i}] is a {type(message).__name__}, expected a {{role, content}} dict")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise DataError(source, f"{key}[{i}] has no string {field!r}")
        if message["role"] not in ROLES:
            raise DataError(
                source,
                f"{key}[{i}] has role {message['role']!r}, not one of {list(ROLES)}",
                hint=_role_hint(message["role"]),
            )


def _check_value(value: Any, key: str, source: str, *, allow_empty: bool) -> None:
    if isinstance(value, str):
        if not allow_empty and (not value or value.isspace()):  # isspace: no copy of a long string
            raise DataError(source, f"{key!r} is empty")
    elif isinstance(value, list):
        _check_messages(value, key, source)
    else:
        raise DataError(source, f"{key!r} is a {type(value).__name__}, expected a string or a list of messages")


def _common_prefix_len(a: str | list, b: str | list) -> int:
    """Length of the longest common prefix of two strings (compared 4 KiB at a time) or two lists."""
    n, limit = 0, min(len(a), len(b))
    if isinstance(a, str):
        while n + 4096 <= limit and a[n : n + 4096] == b[n : n + 4096]:
            n += 4096
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """Split an implicit prompt off ``chosen``/``rejected`` (TRL's ``extract_prompt``).

    Conversational: the longest common message prefix. Standard: the longest common string prefix,
    moved back by one character when it ends just after a space (the space stays with the completions).
    """
    n = _common_prefix_len(chosen, rejected)
    limit = min(len(chosen), len(rejected))
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


def _require_records(path, kind: str, kept: int, skipped: Sequence[tuple[str, str]]) -> None:
    """Raise a :class:`DataError` naming ``path`` when none of its rows gave a record."""
    if kept:
        return
    if not skipped:
        raise DataError(
            str(path),
            "holds no records (it has no rows, or only blank lines)",
            hint="check that the path names the data you meant, or leave it out",
        )
    source, problem = skipped[0]
    raise DataError(
        str(path),
        f"holds no records: all {len(skipped)} row(s) are invalid and were skipped (the first, {source}: {problem})",
        hint=f"{kind} records need {_NEEDS[kind]}; fix the rows, or check that this is the right file",
    )


def load_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    kind: str = "preference",
    *,
    skip_invalid: bool = False,
    split: str | None = None,
) -> RecordSet:
    """Read and validate every row of one or more files/directories, in order.

    Raises the first :class:`DataError` unless ``skip_invalid``, in which case each bad row is logged
    and listed in :attr:`RecordSet.skipped`. Either way, each path must give at least one record: an
    empty file, or one whose every row was skipped, is a :class:`DataError` naming it.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = RecordSet([], [])
    for path in paths:
        kept, skipped = len(out.records), len(out.skipped)
        for source, row in raw_rows(path, split=split):
            try:
                if isinstance(row, DataError):
                    raise row
                out.records.append(validate(row, kind, source))
                out.sources.append(source)
            except DataError as err:
                if not skip_invalid:
                    raise
                log.warning("skipping %s: %s", err.source, err.problem)
                out.skipped.append((source, err.problem))
        _require_records(path, kind, len(out.records) - kept, out.skipped[skipped:])
    if out.skipped:
        log.warning("skipped %d invalid row(s) of %d", len(out.skipped), len(out.skipped) + len(out.records))
    return out


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write records as UTF-8 JSONL (one object per line); returns the path.

    The file is written whole or not at all: into a temporary sibling, then renamed over ``path``. A reader never sees
    half of it, and a kill (or a record that cannot be serialised) leaves the old file as it was."""
    import tempfile

    from cpo_jax.fileio import apply_umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
