"""Local preference records <-> a TFDS dataset stored as ArrayRecord, without TensorFlow.

Each example has two `tfds.features.Text` features: `record` (the record as a JSON string) and `source`
(provenance such as `"/path/file.jsonl:12"`). Both serialise through TFDS's NumPy path, so writing
(`GeneratorBasedBuilder.download_and_prepare` with `file_format="array_record"`) and reading
(`tfds.data_source`) work with TensorFlow absent.

Layout: `data_dir/name/version/{name}-{split}.array_record-XXXXX-of-YYYYY, dataset_info.json, features.json}`.
TFDS writes a whole version into `data_dir/name/incomplete.XXXXXX_version/` and renames it on success, so an
interrupted build never leaves a complete-looking version behind. Splits are stored in generation order
(`disable_shuffling=True`), so index `i` of a split is the `i`-th example given for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from cpo_jax.errors import DataError, UserFileNotFoundError

Example = tuple[str, dict]

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+")


def _check_name_and_version(name: str, version: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(f"version must look like '1.0.0', got {version!r}")


def _encode(example: Example) -> dict[str, str]:
    """(source, record) -> the stored feature dict; the record becomes strict JSON (UTF-8, no NaN)."""
    source, record = example
    if not isinstance(source, str) or not isinstance(record, Mapping):
        raise TypeError(f"expected (str, dict) examples, got ({type(source).__name__}, {type(record).__name__})")
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: record is not JSON-serialisable: {err}") from err
    return {"record": text, "source": source}


def _keyed(examples: Iterable[Example]) -> Iterator[tuple[int, dict[str, str]]]:
    """Integer keys in input order: with `disable_shuffling`, TFDS stores examples sorted by key."""
    for index, example in enumerate(examples):
        yield index, _encode(example)


def _builder_class(name: str, version: str, splits: Mapping[str, Iterable[Example]]) -> type:
    """An unregistered GeneratorBasedBuilder named `name` that writes `splits`."""

    class _LocalPreferences(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        # No source dir: no checksums/metadata files to look up. Also avoids tfds 4.9.10's unconditional
        # `importlib_resources` import for builders defined in a package (tensorflow/datasets#11212).
        code_path = None

        def _info(self) -> tfds.core.DatasetInfo:
            features = tfds.features.FeaturesDict({"record": tfds.features.Text(), "source": tfds.features.Text()})
            return tfds.core.DatasetInfo(
                builder=self,
                description="Local preference records (JSON strings) with their provenance.",
                features=features,
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
            return {split: self._generate_examples(examples) for split, examples in splits.items()}

        def _generate_examples(self, examples: Iterable[Example]) -> Iterator:
            return _keyed(examples)

    _LocalPreferences.name = name
    return _LocalPreferences


def _complete_versions(dataset_dir: pathlib.Path) -> list[str]:
    """Version dirs under `dataset_dir` that hold a finished build, oldest first."""
    if not dataset_dir.is_dir():
        return []
    found = [
        p.name for p in dataset_dir.iterdir() if _VERSION_RE.fullmatch(p.name) and (p / "dataset_info.json").is_file()
    ]
    return sorted(found, key=lambda v: tuple(map(int, v.split("."))))


def _split_names(version_dir: pathlib.Path) -> list[str]:
    return sorted(tfds.builder_from_directory(version_dir).info.splits)


def build_tfds_splits(
    splits: Mapping[str, Iterable[Example]],
    data_dir: str | os.PathLike,
    *,
    name: str = "local_preferences",
    version: str = "1.0.0",
) -> pathlib.Path:
    """Writes several splits (split name -> `(source, record)` examples) as one ArrayRecord TFDS dataset.

    All splits of a version are written in one atomic build; an existing version is never modified or
    silently reused (FileExistsError). Returns the version directory `data_dir/name/version`.
    """
    _check_name_and_version(name, version)
    if not splits:
        raise ValueError("no splits given")
    version_dir = pathlib.Path(data_dir) / name / version
    if version_dir.exists():
        existing = _split_names(version_dir) if (version_dir / "dataset_info.json").is_file() else []
        raise FileExistsError(
            f"{version_dir} already exists (splits {existing}); all splits of a version are built together "
            "in one build_tfds_splits call -- delete it or use a new version"
        )
    builder = _builder_class(name, version, splits)(data_dir=os.fspath(data_dir), file_format="array_record")
    with tempfile.TemporaryDirectory(prefix="tfds_downloads_") as download_dir:  # keeps data_dir free of downloads/
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return version_dir


def build_tfds_dataset(
    examples: Iterable[Example],
    data_dir: str | os.PathLike,
    *,
    name: str = "local_preferences",
    split: str = "train",
    version: str = "1.0.0",
) -> pathlib.Path:
    """Writes one split of `(source, record)` examples as an ArrayRecord TFDS dataset; see `build_tfds_splits`.

    For several splits in one dataset dir, call `build_tfds_splits` (a version is written once, atomically).
    """
    return build_tfds_splits({split: examples}, data_dir, name=name, version=version)


@dataclasses.dataclass(frozen=True)
class TfdsRecords(Sequence[Example]):
    """Random-access `(source, record)` view of a TFDS ArrayRecord data source; picklable, grain-ready."""

    source: Sequence[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self)
        position = index + size if index < 0 else index
        if not 0 <= position < size:
            raise IndexError(f"index {index} out of range for {size} records")
        example = self.source[position]
        return example["source"].decode("utf-8"), json.loads(example["record"])


def tfds_records(
    data_dir: str | os.PathLike,
    *,
    name: str = "local_preferences",
    split: str = "train",
    version: str | None = None,
) -> TfdsRecords:
    """Opens a split (TFDS split syntax such as `"train[:90%]"` allowed) via `tfds.data_source`.

    `version=None` picks the newest complete version on disk. Missing dataset, version or split raise
    UserFileNotFoundError / DataError naming the path and what is available there.
    """
    root = pathlib.Path(data_dir)
    versions = _complete_versions(root / name)
    if not versions:
        present = sorted(p.name for p in root.iterdir() if _complete_versions(p)) if root.is_dir() else []
        raise UserFileNotFoundError(
            f"no built TFDS dataset {name!r} here (datasets in {root}: {present})",
            where=str(root / name),
            hint="build it with cpo_jax.data.build_tfds_from_files",
        )
    version = version or versions[-1]
    if version not in versions:
        raise UserFileNotFoundError(f"no version {version} (available: {versions})", where=str(root / name))
    version_dir = root / name / version
    available = _split_names(version_dir)
    missing = sorted({part.split("[")[0].strip() for part in split.split("+")} - set(available))
    if missing:
        raise DataError(
            str(version_dir),
            f"no split {missing} (available splits: {available})",
            hint="choose one of the available splits",
        )
    source = tfds.data_source(f"{name}:{version}", data_dir=os.fspath(root), split=split, download=False)
    return TfdsRecords(source)


def build_tfds_from_files(
    splits: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    data_dir: str | os.PathLike,
    *,
    kind: str = "preference",
    skip_invalid: bool = False,
    name: str = "local_preferences",
    version: str = "1.0.0",
) -> pathlib.Path:
    """Validate local JSONL/Parquet/``datasets`` files (:func:`cpo_jax.data.load_records`) and store them as
    one TFDS dataset, ``{split: files}``. Records are stored normalised (explicit prompts), with provenance.
    """
    from cpo_jax.data.records import load_records

    loaded = {split: load_records(paths, kind, skip_invalid=skip_invalid) for split, paths in splits.items()}
    return build_tfds_splits(
        {split: list(zip(rs.sources, rs.records)) for split, rs in loaded.items()}, data_dir, name=name, version=version
    )
