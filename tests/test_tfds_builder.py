"""Round trip of preference records through a TFDS ArrayRecord dataset, built and read without TensorFlow."""

import collections.abc
import json
import pickle

import grain
import pytest

from cpo_jax.data.tfds_builder import build_tfds_dataset, build_tfds_splits, tfds_records
from cpo_jax.errors import DataError

TRAIN = [
    ("/data/a.jsonl:1", {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}),
    (
        "/data/b.jsonl:7",
        {
            "prompt": [{"role": "user", "content": 'Grüße, 日本語, emoji 😀, quote " and \\ and \x00'}],
            "chosen": [{"role": "assistant", "content": "héllo ✓\nline two"}],
            "rejected": [{"role": "assistant", "content": ""}],
        },
    ),
    ("/data/c.jsonl:3", {"prompt": "p", "nested": [[1, 2], [3, [4.5, None, True]]], "meta": {"k": []}}),
    ("/data/d.jsonl:1", {"prompt": "prompt-only record"}),
]
TEST = [("/data/test.jsonl:1", {"prompt": "unpaired", "completion": "x", "label": False})]


def _canonical(example):
    source, record = example
    return source, json.dumps(record, sort_keys=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    version_dir = build_tfds_splits({"train": iter(TRAIN), "test": TEST}, root)
    assert version_dir == root / "local_preferences" / "1.0.0"
    assert sorted(p.name for p in version_dir.iterdir() if "array_record" in p.name) == [
        "local_preferences-test.array_record-00000-of-00001",
        "local_preferences-train.array_record-00000-of-00001",
    ]
    return root


def test_round_trip_keeps_order_and_len(data_dir):
    records = tfds_records(data_dir)
    assert isinstance(records, collections.abc.Sequence)
    assert len(records) == len(TRAIN)
    assert list(records) == TRAIN
    assert tfds_records(data_dir, split="test")[:] == TEST


def test_random_access(data_dir):
    records = tfds_records(data_dir)
    assert records[2] == TRAIN[2]
    assert records[1] == TRAIN[1]
    assert records[-1] == TRAIN[-1]
    assert records[1:3] == TRAIN[1:3]
    with pytest.raises(IndexError):
        records[len(TRAIN)]


def test_split_slicing_syntax(data_dir):
    assert list(tfds_records(data_dir, split="train[1:3]")) == TRAIN[1:3]
    assert list(tfds_records(data_dir, split="train+test")) == TRAIN + TEST


def test_missing_split_names_path_and_available(data_dir):
    with pytest.raises(DataError, match=r"local_preferences/1\.0\.0.*'validation'.*\['test', 'train'\]"):
        tfds_records(data_dir, split="validation")


def test_missing_dataset_and_version(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"other_name.*\['local_preferences'\]"):
        tfds_records(data_dir, name="other_name")
    with pytest.raises(FileNotFoundError, match=r"2\.0\.0.*\['1\.0\.0'\]"):
        tfds_records(data_dir, version="2.0.0")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        tfds_records(tmp_path / "missing")


def test_single_split_builder_and_no_silent_reuse(tmp_path):
    version_dir = build_tfds_dataset(TEST, tmp_path, name="prefs", split="validation", version="0.1.0")
    assert list(tfds_records(tmp_path, name="prefs", split="validation")) == TEST
    with pytest.raises(FileExistsError, match=r"0\.1\.0.*\['validation'\]"):
        build_tfds_dataset(TRAIN, tmp_path, name="prefs", split="train", version="0.1.0")
    assert version_dir.is_dir()


def test_failed_build_leaves_no_dataset(tmp_path):
    def broken():
        yield TRAIN[0]
        raise RuntimeError("source file vanished")

    with pytest.raises(RuntimeError, match="vanished"):
        build_tfds_dataset(broken(), tmp_path)
    assert not (tmp_path / "local_preferences" / "1.0.0").exists()
    with pytest.raises(FileNotFoundError):
        tfds_records(tmp_path)


def test_rejects_non_json_records(tmp_path):
    with pytest.raises(ValueError, match="x.jsonl:1"):
        build_tfds_dataset([("x.jsonl:1", {"score": float("nan")})], tmp_path)


def test_pickles_for_grain_workers(data_dir):
    restored = pickle.loads(pickle.dumps(tfds_records(data_dir)))
    assert list(restored) == TRAIN


def test_grain_source_and_shuffle(data_dir):
    dataset = grain.MapDataset.source(tfds_records(data_dir))
    assert dataset[1] == TRAIN[1]
    shuffled = list(dataset.shuffle(seed=0))
    assert sorted(map(_canonical, shuffled)) == sorted(map(_canonical, TRAIN))
