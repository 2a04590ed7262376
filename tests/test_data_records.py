"""Record reading and validation: formats, implicit prompts, kinds, and errors that name file and line."""

from __future__ import annotations

import json
import logging

import pytest

from cpo_jax.data import (
    DataError,
    arithmetic_preferences,
    arithmetic_prompts,
    extract_prompt,
    load_records,
    score_arithmetic,
    tiny_chat,
    write_jsonl,
)

STANDARD = [
    {"prompt": "Q1 ", "chosen": "good", "rejected": "bad"},
    {"prompt": "Q2 ", "chosen": "yes", "rejected": "no"},
]


def test_jsonl_parquet_and_hf_datasets_read_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = tiny_chat()
    jsonl = write_jsonl(records, tmp_path / "d.jsonl")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "hfdict"))

    from_jsonl = load_records(jsonl)
    assert from_jsonl.records == records
    assert from_jsonl.sources[3] == f"{jsonl}:4"
    assert load_records(tmp_path / "d.parquet").records == records
    assert load_records(tmp_path / "hf").records == records
    assert load_records(tmp_path / "hfdict", split="train").records == records
    with pytest.raises(DataError, match=r"splits \['train'\]"):
        load_records(tmp_path / "hfdict")


def test_several_files_are_read_in_order(tmp_path):
    a = write_jsonl(STANDARD[:1], tmp_path / "a.jsonl")
    b = write_jsonl(STANDARD[1:], tmp_path / "b.jsonl")
    out = load_records([a, b])
    assert out.records == STANDARD and out.sources == [f"{a}:1", f"{b}:1"]


def test_implicit_prompt_conversational_is_the_longest_common_message_prefix():
    explicit = tiny_chat()
    implicit = tiny_chat(implicit_prompt=True)
    for want, row in zip(explicit, implicit):
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
        assert (prompt, chosen, rejected) == (want["prompt"], want["chosen"], want["rejected"])


def test_implicit_prompt_standard_keeps_the_space_with_the_completion(tmp_path):
    path = write_jsonl([{"chosen": "The sky is blue.", "rejected": "The sky is green."}], tmp_path / "s.jsonl")
    (record,) = load_records(path).records
    assert record == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


def test_unpaired_and_prompt_only_kinds(tmp_path):
    unpaired = write_jsonl(
        [
            {"prompt": "Q", "completion": "A", "label": True},
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "completion": [{"role": "assistant", "content": "A"}],
                "label": False,
            },
        ],
        tmp_path / "u.jsonl",
    )
    assert [r["label"] for r in load_records(unpaired, "unpaired").records] == [True, False]
    prompts = write_jsonl(arithmetic_prompts(3), tmp_path / "p.jsonl")
    got = load_records(prompts, "prompt_only").records
    assert len(got) == 3 and all("answer" in r for r in got)
    bad = write_jsonl([{"prompt": "Q", "completion": "A", "label": "yes"}], tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'label' is a str"):
        load_records(bad, "unpaired")


BAD_LINES = [
    (b'{"prompt": "q", "chosen": "a", "rejected": ', "bad JSON"),
    (b'{"prompt": "q", "chosen": "a"}', r"missing key\(s\) \['rejected'\]"),
    (b'{"prompt": "q", "chosen": 3, "rejected": "b"}', "'chosen' is a int"),
    (b'{"prompt": "q", "chosen": "  ", "rejected": "b"}', "'chosen' is empty"),
    (b'{"prompt": "q", "chosen": "a\xff", "rejected": "b"}', "invalid UTF-8"),
    (
        b'{"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "b"}]}',
        r"chosen\[0\] has no string 'content'",
    ),
    (b'{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}', "mix strings"),
    (b'["not", "an", "object"]', "expected a JSON object"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_bad_line_names_file_line_and_problem(line, problem, tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps(STANDARD[0]).encode()
    path.write_bytes(good + b"\n\n" + good + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=rf"data.jsonl:4: .*{problem}"):
        load_records(path)


def test_skip_invalid_counts_and_logs_each_line(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    good = json.dumps(STANDARD[0]).encode()
    path.write_bytes(b"\n".join([good, BAD_LINES[0][0], good, BAD_LINES[3][0], good]) + b"\n")
    with caplog.at_level(logging.WARNING):
        out = load_records(path, skip_invalid=True)
    assert len(out) == 3
    assert [s for s, _ in out.skipped] == [f"{path}:2", f"{path}:4"]
    assert sum("skipping" in r.message for r in caplog.records) == 2
    assert any("skipped 2 invalid row(s) of 5" in r.message for r in caplog.records)


def test_unknown_format_and_missing_file_are_named(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x.csv: unknown data format '.csv'"):
        load_records(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_arithmetic_records_are_verifiable_and_deterministic():
    records = arithmetic_preferences(200, seed=3)
    assert records == arithmetic_preferences(200, seed=3)
    assert records != arithmetic_preferences(200, seed=4)
    assert all(score_arithmetic(r["prompt"], r["chosen"]) == 1.0 for r in records)
    assert all(score_arithmetic(r["prompt"], r["rejected"]) == 0.0 for r in records)
    plain = arithmetic_preferences(50, seed=3, conversational=False)
    assert all(score_arithmetic(r["prompt"], r["chosen"]) == 1.0 for r in plain)
    assert score_arithmetic("What is 12 * 3?", "I think 35, no wait, 36") == 1.0
    assert score_arithmetic("What is 12 - 30?", "It is -18.") == 1.0
    assert score_arithmetic("What is 1 + 1?", "no idea") == 0.0


def test_write_jsonl_is_whole_or_not_at_all(tmp_path):
    """A record that cannot be written (or a kill) leaves the old file, and no temporary file beside it."""
    import os

    path = write_jsonl([{"a": 1}], tmp_path / "d.jsonl")
    with pytest.raises(TypeError):
        write_jsonl([{"a": 2}, {"b": object()}], path)
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # the umask's mode, not mkstemp's 0600
