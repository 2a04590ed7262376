"""Bad user data (issue 15): every problem is a typed user error naming the file (and line) with a hint,
identical pairs are dropped and counted, and the work per record is bounded before tokenising."""

from __future__ import annotations

import json
import logging
import os
import random
import time
import tracemalloc

import numpy as np
import pytest

from cpo_jax.data import (
    DataError,
    Dropped,
    PipelineConfig,
    RecordTokenizer,
    TokenizeConfig,
    audit,
    byte_chat_tokenizer,
    load_records,
    tiny_chat,
    write_jsonl,
)
from cpo_jax.data import tokenize as tokenize_module
from cpo_jax.data.records import ROLES, extract_prompt, json_layout
from cpo_jax.data.tokenize import char_bound, clip_text, max_token_chars
from cpo_jax.data.tokenizers import CHATML_TEMPLATE, SPECIAL_TOKENS
from cpo_jax.errors import ConfigError, ModelError, UserError, UserFileNotFoundError

GOOD = {"prompt": "Q ", "chosen": "yes", "rejected": "no"}


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE with 800 learned entries and GPT-2's pre-tokenizer regex: merges cross characters, so
    cutting text could change ids near the cut (unlike the merge-free byte tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 9))) for _ in range(300)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator([" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE
    )


def _lines(path, *rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _message(role, content):
    return [{"role": role, "content": content}]


# ------------------------------------------------------------------------------------------------
# 1. chat roles


def test_unknown_role_names_file_line_message_and_allowed_roles(tmp_path):
    bad = {
        "prompt": _message("user", "Hi") + _message("human", "Hello?"),
        "chosen": _message("assistant", "Hey."),
        "rejected": _message("assistant", "Go away."),
    }
    path = _lines(
        tmp_path / "chat.jsonl",
        {
            "prompt": _message("user", "Hi"),
            "chosen": _message("assistant", "a"),
            "rejected": _message("assistant", "b"),
        },
        bad,
    )
    with pytest.raises(DataError) as err:
        load_records(path)
    assert err.value.source == f"{path}:2"
    assert "prompt[1] has role 'human'" in err.value.problem
    assert all(role in err.value.problem for role in ROLES)
    assert "'user'" in err.value.hint  # human -> user
    out = load_records(path, skip_invalid=True)
    assert len(out) == 1 and out.skipped == [(f"{path}:2", err.value.problem)]


@pytest.mark.parametrize("role", ROLES)
def test_every_known_role_is_accepted(role, tmp_path):
    path = _lines(
        tmp_path / "r.jsonl",
        {
            "prompt": _message(role, "x") + _message("user", "q"),
            "chosen": _message("assistant", "a"),
            "rejected": _message("assistant", "b"),
        },
    )
    assert len(load_records(path)) == 1


# ------------------------------------------------------------------------------------------------
# 2. chosen == rejected


def test_identical_pair_is_dropped_counted_and_warned_once(tok, caplog, monkeypatch):
    monkeypatch.setattr(tokenize_module, "_IDENTICAL_PAIRS", tokenize_module.collections.Counter())
    same = {"prompt": "Q ", "chosen": "same", "rejected": "same"}
    chat_same = {
        "prompt": _message("user", "Q"),
        "chosen": _message("assistant", "A"),
        "rejected": _message("assistant", "A"),
    }
    records = [GOOD, same, chat_same, same]
    with caplog.at_level(logging.WARNING, logger="cpo_jax.data.tokenize"):
        report = audit(
            records,
            tok,
            TokenizeConfig(max_length=64),
            PipelineConfig(shuffle=False),
            sources=[f"d.jsonl:{i + 1}" for i in range(4)],
        )
    assert (report.examples, report.kept, dict(report.dropped)) == (4, 1, {"identical_pair": 3})
    warnings = [r.message for r in caplog.records if "no preference" in r.message]
    assert len(warnings) == 1 and warnings[0].startswith("d.jsonl:2:") and "1 such pair(s) so far" in warnings[0]


def test_pairs_identical_only_after_truncation_are_dropped_by_the_kept_side(tok):
    # The completions differ only at the end: keep_start keeps identical starts, keep_end keeps the difference.
    record = {"prompt": "P ", "chosen": "x" * 40 + "good", "rejected": "x" * 40 + "bad"}
    start = RecordTokenizer(tok, TokenizeConfig(max_length=20, max_prompt_length=4))((0, "s:1", record))
    end = RecordTokenizer(tok, TokenizeConfig(max_length=20, max_prompt_length=4, truncation="keep_end"))(
        (0, "s:1", record)
    )
    assert isinstance(start, Dropped) and start.code == "identical_pair" and start.source == "s:1"
    assert not isinstance(end, Dropped) and tok.decode(end["rejected"]).endswith("bad<|im_end|>")


# ------------------------------------------------------------------------------------------------
# 3. empty inputs


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\r\n\t\r\n"])
def test_empty_file_is_named_with_a_hint(content, tmp_path):
    good = _lines(tmp_path / "good.jsonl", GOOD)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: holds no records") as err:
        load_records([good, empty])  # checked per file: a good file alongside does not hide it
    assert err.value.source == str(empty) and err.value.hint


def test_file_whose_every_row_was_skipped_is_an_error(tmp_path):
    path = _lines(
        tmp_path / "kto.jsonl",
        {"prompt": "q", "completion": "a", "label": True},
        {"prompt": "q", "completion": "b", "label": False},
    )
    with pytest.raises(DataError) as err:
        load_records([_lines(tmp_path / "ok.jsonl", GOOD), path], skip_invalid=True)
    assert err.value.source == path
    assert "all 2 row(s) are invalid" in err.value.problem and f"{path}:1: missing key(s)" in err.value.problem
    assert "'chosen' and 'rejected'" in err.value.hint


def test_empty_parquet_table_and_bundled_sizes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "none.parquet")
    with pytest.raises(DataError, match=r"none\.parquet: holds no records"):
        load_records(tmp_path / "none.parquet")
    for spec in ("bundled:arithmetic-train:0", "bundled:arithmetic-train:-3", "bundled:arithmetic-train:many"):
        with pytest.raises(DataError, match="not a positive integer") as err:
            load_records(spec)
        assert err.value.source == spec
    with pytest.raises(DataError, match="holds only 12 records, not 13"):
        load_records("bundled:tiny-chat:13")
    with pytest.raises(UserFileNotFoundError, match="no such bundled dataset") as err:
        load_records("bundled:arithmetic")
    assert "bundled:arithmetic-train" in err.value.hint and isinstance(err.value, FileNotFoundError)
    assert len(load_records("bundled:tiny-chat:3")) == 3


# ------------------------------------------------------------------------------------------------
# 4. files that are not what their name says


RECORDS = [GOOD, {"prompt": "Q2 ", "chosen": "a", "rejected": "b"}]


@pytest.mark.parametrize(
    "name,text,layout",
    [
        ("pretty.json", json.dumps(RECORDS, indent=2), "array"),
        ("one_line.jsonl", json.dumps(RECORDS), "array"),
        ("bom.json", "\ufeff\n\n  " + json.dumps(RECORDS), "array"),
        ("doc.json", json.dumps({"data": RECORDS}, indent=2), "document"),
        ("record.jsonl", json.dumps(GOOD, indent=1), "document"),
    ],
)
def test_json_array_or_document_is_one_clear_error(name, text, layout, tmp_path):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert json_layout(path.read_bytes()[: 1 << 16]) == layout
    with pytest.raises(DataError) as err:
        load_records(path, skip_invalid=True)  # a file-level problem: not skipped row by row
    assert err.value.source == str(path)
    assert f"one JSON {'array' if layout == 'array' else 'object spread over several lines'}" in err.value.problem
    assert "not JSON Lines" in err.value.problem and "jq -c" in err.value.hint


def test_converting_a_json_array_as_the_hint_says_gives_the_records(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    with pytest.raises(DataError) as err:
        load_records(path)
    command = err.value.hint.split("without jq: ")[1].replace(" > out.jsonl", "")
    assert command.startswith("python -c")
    converted = subprocess.run(
        command.replace("python", sys.executable, 1), shell=True, check=True, capture_output=True, text=True
    ).stdout
    (tmp_path / "out.jsonl").write_text(converted)
    assert load_records(tmp_path / "out.jsonl").records == RECORDS


@pytest.mark.parametrize(
    "head,want",
    [
        (b'{"prompt": "q", "chosen": "a", "rejected": \n{"prompt": "q", "chosen": "a", "rejected": "b"}\n', None),
        (b'{"prompt": "q", "chosen": "a" "rejected": "b"}\n{"a": 1}\n', None),  # broken inside the line
        (b'{"prompt": "q"}\n', None),
        (b'{"prompt": "q"}', None),
        (b"{\n", "document"),
        (b"   [\n", "array"),
        (b"", None),
        (b'{"prompt": "' + b"x" * 70000, None),  # first line longer than the bytes read: not judged
    ],
)
def test_json_layout_reads_only_the_first_lines(head, want):
    assert json_layout(head) == want


def test_a_truncated_first_jsonl_row_is_a_row_error_not_a_document(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": \n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: bad JSON"):
        load_records(path)
    assert len(load_records(path, skip_invalid=True)) == 1


def test_a_huge_json_array_is_rejected_without_reading_it(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "w") as f:
        f.write("[\n")
        for _ in range(200_000):
            f.write(json.dumps(GOOD) + ",\n")
        f.write(json.dumps(GOOD) + "\n]\n")
    assert path.stat().st_size > 8_000_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="one JSON array"):
            load_records(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


def test_corrupt_or_fake_parquet_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fake = tmp_path / "fake.parquet"
    fake.write_text("prompt,chosen,rejected\nq,a,b\n")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file: Parquet magic bytes") as err:
        load_records(fake)
    assert "\n" not in err.value.problem and err.value.hint
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS * 50), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable Parquet file"):
        load_records(cut)
    assert load_records(good).records == RECORDS * 50


def test_directories_missing_paths_and_unknown_formats(tmp_path):
    import datasets

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(DataError, match="not a saved Hugging Face dataset") as err:
        load_records(plain)
    assert ".parquet" in err.value.hint

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "state.json").unlink()
    with pytest.raises(DataError, match=r"saved: a saved Hugging Face dataset that does not load: ") as err:
        load_records(tmp_path / "saved")
    assert "save_to_disk" in err.value.hint

    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"split 'test' is not one of them") as err:
        load_records(tmp_path / "dict", split="test")
    assert "split" in err.value.hint

    with pytest.raises(UserFileNotFoundError, match="no such data file") as err:
        load_records(tmp_path / "nope.jsonl")
    assert err.value.where == str(tmp_path / "nope.jsonl") and isinstance(err.value, FileNotFoundError)

    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown data format '\.csv'; expected \.jsonl .*\.parquet.*bundled:"):
        load_records(tmp_path / "d.csv")


def test_every_file_error_is_a_user_error_with_where_and_hint(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "c.parquet").write_text("nope")
    (tmp_path / "dir").mkdir()
    for path in ("a.json", "b.jsonl", "c.parquet", "nothing.jsonl", "dir"):
        with pytest.raises(UserError) as err:
            load_records(tmp_path / path)
        assert err.value.where.startswith(str(tmp_path / path)) and err.value.hint, path


# ------------------------------------------------------------------------------------------------
# 5. bounded work per record


class CountingTokenizer:
    """Wraps a tokenizer and records the characters of text each tokenising call received."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        self.calls.append(len(text))
        return self.inner(text, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append(sum(len(m["content"]) for m in messages))
        return self.inner.apply_chat_template(messages, **kwargs)


def test_max_token_chars_bounds_the_text_of_every_token(bpe):
    per_token = max_token_chars(bpe)
    assert per_token == max(len(t) for t in bpe.get_vocab()) == len("<|endoftext|>")
    text = " ".join(["abc", "<|im_end|>", "ponm" * 30, "é"] * 50)
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert max(len(bpe.decode([i])) for i in ids) <= per_token
    assert len(ids) >= len(text) / per_token
    assert char_bound(10, per_token) == 10 * per_token * tokenize_module.CHAR_SAFETY
    assert max_token_chars(object()) is None and char_bound(10, None) is None


def test_prompt_over_the_bound_is_dropped_without_tokenising(tok):
    counting = CountingTokenizer(tok)
    rt = RecordTokenizer(counting, TokenizeConfig(max_length=64, max_prompt_length=32))
    bound = char_bound(32, max_token_chars(tok))
    for prompt in ("p" * (bound + 1), _message("system", "s" * bound) + _message("user", "u")):
        out = rt((0, "f:9", {"prompt": prompt, "chosen": "a", "rejected": "b"}))
        assert isinstance(out, Dropped) and out.code == "prompt_too_long" and out.source == "f:9"
        out = rt((0, "f:9", {"prompt": prompt}), "prompt_only")
        assert isinstance(out, Dropped) and out.code == "prompt_too_long"
    assert counting.calls == []
    # At the bound it is tokenised, and the token count decides (the same decision: dropped).
    out = rt((0, "f:9", {"prompt": "p" * bound, "chosen": "a", "rejected": "b"}))
    assert isinstance(out, Dropped) and "tokens exceeds max_prompt_length 32" in out.reason
    eos = len(tok.eos_token)  # plain-text completions are tokenised with the prompt and the eos text (TRL)
    assert counting.calls == [bound, bound + 1 + eos, bound + 1 + eos]  # prompt, prompt + chosen, prompt + rejected


def test_each_record_is_tokenised_once(tok):
    counting = CountingTokenizer(tok)
    rt = RecordTokenizer(counting, TokenizeConfig(max_length=64))
    eos = len(tok.eos_token)
    rt((0, "f:1", {"prompt": "Q: 2+2? ", "chosen": "4!", "rejected": "five"}))
    assert counting.calls == [8, 8 + 2 + eos, 8 + 4 + eos]  # the prompt once, then each completion with it
    rt((0, "f:1", {"prompt": "Q ", "completion": "yes", "label": True}), "unpaired")
    assert counting.calls[3:] == [2, 2 + 3 + eos]
    # One pass of the grain pipeline tokenises each record once too (the filter and batching re-read nothing).
    from cpo_jax.data import BatchConfig, build_dataset

    counting.calls.clear()
    records = [{"prompt": "Q" * (i + 1) + " ", "chosen": "a" * (i + 1), "rejected": "b"} for i in range(10)]
    batches = list(
        build_dataset(
            records,
            counting,
            TokenizeConfig(max_length=64),
            BatchConfig(4, 64),
            PipelineConfig(seed=1),
            sources=[f"f:{i}" for i in range(10)],
        )
    )
    assert sum(int(b["pair_mask"].sum()) for b in batches) == 10
    assert sorted(counting.calls) == sorted(
        [i + 2 for i in range(10)] + [2 * i + 3 + eos for i in range(10)] + [i + 3 + eos for i in range(10)]
    )


def _words(n_chars: int, seed: int, space: bool = True) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        word = "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 9)))
        out.append(word)
        size += len(word) + space
    return (" " if space else "").join(out)[:n_chars]


def _reference(tokenizer, prompt, chosen, rejected, cfg: TokenizeConfig):
    """TRL 1.x's ids of the whole texts (no character bound): prompt ids, prompt + completion ids, one cut point for
    both completions (the shortest common prefix), then the truncation policy; ``(chosen ids, rejected ids)``."""
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = [tokenizer(prompt + c + tokenizer.eos_token)["input_ids"] for c in (chosen, rejected)]
    else:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = [
            list(tokenizer.apply_chat_template(prompt + c, tokenize=True, return_dict=False))
            for c in (chosen, rejected)
        ]
    n = min(len(os.path.commonprefix([list(prompt_ids), list(ids)])) for ids in full)
    room = cfg.max_length - n
    kept = [ids[n:][:room] if cfg.truncation == "keep_start" else ids[n:][-room:] for ids in full]
    return [list(prompt_ids[:n]) + k for k in kept]


@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
@pytest.mark.parametrize("form", ["string", "string_no_spaces", "messages"])
@pytest.mark.parametrize("which", ["tok", "bpe"])
def test_cutting_long_completions_before_tokenising_keeps_the_same_ids(truncation, form, which, request):
    tokenizer = request.getfixturevalue(which)
    cfg = TokenizeConfig(max_length=96, max_prompt_length=48, truncation=truncation)
    rt = RecordTokenizer(tokenizer, cfg)
    bound = char_bound(cfg.max_length, max_token_chars(tokenizer))
    long_a, long_b = _words(10 * bound, 1, form != "string_no_spaces"), _words(3 * bound, 2)
    if form == "messages":
        prompt = _message("user", "Tell me a story.")
        chosen = _message("assistant", long_a[:bound]) + _message("user", "go on") + _message("assistant", long_a)
        rejected = _message("assistant", long_b)
    else:
        prompt, chosen, rejected = "Tell me a story. ", long_a, long_b
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    bounded = rt.bound(record, "preference", "s:1")
    assert tokenize_module.text_chars(bounded["chosen"]) == bound < tokenize_module.text_chars(chosen)
    out = rt((0, "s:1", record))
    for name, want in zip(("chosen", "rejected"), _reference(tokenizer, prompt, chosen, rejected, cfg)):
        np.testing.assert_array_equal(out[name], want, err_msg=name)
        assert len(out[name]) == 96


def test_clip_text_keeps_the_start_or_the_end_of_message_contents():
    messages = [
        {"role": "assistant", "content": "abc"},
        {"role": "user", "content": "de", "name": "x"},
        {"role": "assistant", "content": "fghi"},
    ]
    start, end = clip_text(messages, 4, "keep_start"), clip_text(messages, 5, "keep_end")
    assert [m["content"] for m in start] == ["abc", "d", ""]
    assert [m["content"] for m in end] == ["", "e", "fghi"]
    assert [m["role"] for m in end] == ["assistant", "user", "assistant"] and end[1]["name"] == "x"
    assert messages[0]["content"] == "abc"  # not modified in place
    assert clip_text("abcdef", 2, "keep_start") == "ab" and clip_text("abcdef", 2, "keep_end") == "ef"
    assert clip_text("abc", 0, "keep_end") == ""


def test_common_prefix_of_long_strings_matches_a_simple_reference():
    base = _words(20_000, 3)
    for cut in (0, 1, 4095, 4096, 4097, 12_288, 19_999):
        chosen, rejected = base[:cut] + " X" + base[cut:], base[:cut] + " Y" + base[cut:]
        n = len(os.path.commonprefix([chosen, rejected]))
        n -= chosen[n - 1] == " "  # TRL's rule: a trailing space stays with the completions
        assert extract_prompt(chosen, rejected) == (chosen[:n], chosen[n:], rejected[n:])
        assert n in (cut, cut + 1)


@pytest.mark.parametrize("where", ["prompt", "completion", "chat_completion", "implicit_prompt"])
def test_a_20mb_line_is_handled_quickly_in_little_memory(where, tok, tmp_path):
    big = "lorem ipsum dolor " * (20_000_000 // 18)
    record = {
        "prompt": {"prompt": big, "chosen": "a", "rejected": "b"},
        "completion": {"prompt": "Q ", "chosen": big, "rejected": "b"},
        "chat_completion": {
            "prompt": _message("user", "Q"),
            "chosen": _message("assistant", big),
            "rejected": _message("assistant", "b"),
        },
        "implicit_prompt": {"chosen": big + "yes", "rejected": big + "no"},
    }[where]
    path = write_jsonl([GOOD, record], tmp_path / "big.jsonl")
    del big, record
    assert path.stat().st_size > 20_000_000
    rt = RecordTokenizer(tok, TokenizeConfig(max_length=512))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        loaded = load_records(path)
        out = [rt((i, s, r)) for i, (s, r) in enumerate(zip(loaded.sources, loaded.records))]
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dropped = where in ("prompt", "implicit_prompt")
    assert isinstance(out[1], Dropped) == dropped and (not dropped or out[1].code == "prompt_too_long")
    if not dropped:
        assert len(out[1]["chosen"]) == 512
    assert seconds < 20, seconds  # about 0.1 s; before the bound: 25-30 s and 4 GB
    assert peak < 250_000_000, peak  # the line, its decoded text and the parsed string: about 60 MB


# ------------------------------------------------------------------------------------------------
# 6. config and tokenizer errors


@pytest.mark.parametrize(
    "kwargs,key,text",
    [
        (dict(max_length=20, max_prompt_length=20), "data.max_prompt_length", "leaves no room"),
        (dict(max_length=20, max_prompt_length=0), "data.max_prompt_length", "below 1"),
        (dict(max_length=1), "data.max_length", "leaves no room"),
        (dict(truncation="middle"), "data.truncation", "'middle'"),
    ],
)
def test_tokenize_config_errors_name_the_config_key(kwargs, key, text):
    with pytest.raises(ConfigError, match=text) as err:
        TokenizeConfig(**kwargs)
    assert err.value.where == key and err.value.hint and isinstance(err.value, ValueError)


def test_tokenizer_without_eos_is_a_model_error():
    tokenizer = byte_chat_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ModelError, match="no eos token") as err:
        RecordTokenizer(tokenizer, TokenizeConfig(max_length=64))
    assert type(tokenizer).__name__ in err.value.where and "eos_token" in err.value.hint


def test_chat_records_still_tokenise_as_before(tok):
    """The bound is a no-op for ordinary records: the bundled chats give the chat template's ids."""
    rt = RecordTokenizer(tok, TokenizeConfig(max_length=256))
    for i, record in enumerate(tiny_chat()):
        out = rt((i, f"c:{i}", record))
        full = tok.apply_chat_template(record["prompt"] + record["chosen"], tokenize=True, return_dict=False)
        assert list(out["chosen"]) == list(full)


def test_batch_and_pipeline_config_errors_name_the_config_key():
    from cpo_jax.data import BatchConfig

    with pytest.raises(ConfigError, match="at least 2 rows") as err:
        BatchConfig(pairs_per_batch=1, max_length=64, pack=True)
    assert err.value.where == "data.rows_per_batch" and "data.pack=false" in err.value.hint
    with pytest.raises(ConfigError) as err:
        BatchConfig(pairs_per_batch=0, max_length=64)
    assert err.value.where == "data.pairs_per_batch"
    with pytest.raises(ConfigError) as err:
        PipelineConfig(num_workers=-1)
    assert err.value.where == "data.num_workers"
