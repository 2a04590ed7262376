"""Tokenisation (chat templates, truncation, drops), batch layout (padding and packing), grain pipeline
(determinism, host shards, exact resume with and without workers), and packed == padded log-probs."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.data import (
    BatchConfig,
    DataError,
    Dropped,
    PipelineConfig,
    RecordTokenizer,
    TokenizeConfig,
    arithmetic_preferences,
    arithmetic_prompts,
    audit,
    build_dataset,
    byte_chat_tokenizer,
    tiny_chat,
)


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def _tokenize(tok, record, kind="preference", **cfg):
    return RecordTokenizer(tok, TokenizeConfig(**{"max_length": 256, **cfg}))((7, "src:1", record), kind)


def test_chat_template_prompt_and_completion_ids(tok):
    record = tiny_chat()[1]
    out = _tokenize(tok, record)
    prompt_ids = tok.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(record["prompt"] + record["chosen"], tokenize=True, return_dict=False)
    assert out["chosen_prompt_len"] == len(prompt_ids)
    assert list(out["chosen"]) == list(full)
    assert tok.decode(out["chosen"][len(prompt_ids) :]) == "Rome.<|im_end|>\n"
    assert out["index"] == 7


def test_plain_text_gets_eos(tok):
    out = _tokenize(tok, {"prompt": "Q: 1+1? ", "chosen": "2", "rejected": "3"})
    assert tok.decode(out["chosen"]) == "Q: 1+1? 2<|im_end|>"
    assert out["chosen"][-1] == tok.eos_token_id and out["chosen_prompt_len"] == len("Q: 1+1? ")


def test_prefix_mismatch_is_a_warning_with_counts(tok, caplog):
    odd = byte_chat_tokenizer()
    # The generation prompt says "assistant\n" but a rendered assistant turn says "assistant:\n".
    odd.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + (':' if m['role'] == 'assistant' else '') + '\\n' "
        "+ m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer = RecordTokenizer(odd, TokenizeConfig(max_length=256))
    with caplog.at_level(logging.WARNING):
        for i, record in enumerate(tiny_chat()[:3]):
            out = tokenizer((i, f"f:{i + 1}", record))
    assert tokenizer.prefix_mismatches == 3  # once per record: chosen and rejected are cut at one point
    warnings = [r.message for r in caplog.records if "not a prefix" in r.message]
    assert len(warnings) == 1 and "f:1" in warnings[0] and "1 such record(s) so far" in warnings[0]
    assert odd.decode(out["chosen"][out["chosen_prompt_len"] :]).startswith(":\n")


def test_truncation_policies_and_prompt_drop(tok):
    record = {"prompt": "P" * 10, "chosen": "abcdefghij" * 3, "rejected": "xyz"}
    start = _tokenize(tok, record, max_length=20, max_prompt_length=12)
    end = _tokenize(tok, record, max_length=20, max_prompt_length=12, truncation="keep_end")
    assert len(start["chosen"]) == len(end["chosen"]) == 20
    assert tok.decode(start["chosen"][10:]) == "abcdefghij"
    assert tok.decode(end["chosen"][10:]) == "bcdefghij<|im_end|>"
    assert end["chosen"][-1] == tok.eos_token_id and start["chosen"][-1] != tok.eos_token_id
    assert tok.decode(start["rejected"]) == "P" * 10 + "xyz<|im_end|>"  # short completions untouched
    dropped = _tokenize(tok, record, max_length=20, max_prompt_length=9)
    assert isinstance(dropped, Dropped) and "exceeds max_prompt_length 9" in dropped.reason
    with pytest.raises(ValueError, match="leaves no room"):
        TokenizeConfig(max_length=20, max_prompt_length=20)


def test_token_id_beyond_vocab_is_named(tok):
    with pytest.raises(DataError, match=r"src:1: token id \d+ is not below the model's vocab_size 100"):
        _tokenize(tok, {"prompt": "hello ", "chosen": "a", "rejected": "b"}, vocab_size=100)


def test_audit_counts_drops(tok):
    records = [{"prompt": "x" * n, "chosen": "a", "rejected": "b"} for n in (5, 50, 8, 60)]
    report = audit(
        records,
        tok,
        TokenizeConfig(max_length=64, max_prompt_length=32),
        PipelineConfig(),
        sources=[f"f:{i}" for i in range(4)],
    )
    assert (report.examples, report.kept, dict(report.dropped)) == (4, 2, {"prompt_too_long": 2})


# ------------------------------------------------------------------------------------------------
def _batches(records, tok, *, pack, pairs=4, length=128, rows=None, kind="preference", **pipe):
    cfg = BatchConfig(
        pairs_per_batch=pairs, max_length=length, pack=pack, rows_per_batch=rows, buckets=(32, 64, length)
    )
    ds = build_dataset(
        records,
        tok,
        TokenizeConfig(max_length=length),
        cfg,
        PipelineConfig(kind=kind, **pipe),
        sources=[f"r:{i}" for i in range(len(records))],
    )
    return list(ds)


def _sequences_from_batch(batch):
    """{sequence slot: (all token ids, completion token ids)} reconstructed from the layout."""
    out = {}
    for r in range(batch["input_ids"].shape[0]):
        for seg in set(batch["segment_ids"][r]) - {0}:
            where = batch["segment_ids"][r] == seg
            slot = set(batch["sequence_ids"][r][where])
            assert len(slot) == 1
            completion = batch["targets"][r][where & (batch["loss_mask"][r] > 0)]
            out[int(slot.pop())] = (batch["input_ids"][r][where], completion)
            assert list(batch["positions"][r][where]) == list(range(where.sum()))
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_batch_layout_reconstructs_every_sequence(pack, tok):
    records = arithmetic_preferences(10, seed=2)
    tokenizer = RecordTokenizer(tok, TokenizeConfig(max_length=128))
    batches = _batches(records, tok, pack=pack, rows=4, shuffle=False)
    seen = []
    for batch in batches:
        sequences = _sequences_from_batch(batch)
        for slot in np.nonzero(batch["pair_mask"])[0]:
            index = int(batch["index"][slot])
            want = tokenizer((index, "", records[index]))
            for k, name in enumerate(("chosen", "rejected")):
                ids, completion = sequences[2 * slot + k]
                np.testing.assert_array_equal(ids, want[name])
                np.testing.assert_array_equal(completion, want[name][want[f"{name}_prompt_len"] :])
            seen.append(index)
        if not pack:
            assert batch["input_ids"].shape[1] in (32, 64, 128)
        else:
            assert batch["input_ids"].shape == (4, 128)
    assert sorted(seen) == list(range(10))


def test_bucketed_padding_uses_few_shapes(tok):
    records = arithmetic_preferences(40, seed=5) + tiny_chat()
    shapes = {b["input_ids"].shape for b in _batches(records, tok, pack=False, seed=1)}
    assert shapes <= {(8, 32), (8, 64), (8, 128)}


def test_unpaired_and_prompt_only_batches(tok):
    unpaired = [{"prompt": "Q ", "completion": "A" * (i + 1), "label": i % 2 == 0} for i in range(6)]
    (b1, b2) = _batches(unpaired, tok, pack=False, kind="unpaired", shuffle=False)
    assert b1["input_ids"].shape[0] == 4 and list(b1["labels"]) == [True, False, True, False]
    assert list(b2["pair_mask"]) == [True, True, False, False] and list(b2["index"][2:]) == [-1, -1]
    prompts = _batches(arithmetic_prompts(4), tok, pack=False, kind="prompt_only", shuffle=False)[0]
    mask = prompts["attention_mask"]
    assert (mask[:, -1] == 1).all()  # left padded: every row ends with a real token
    row = prompts["input_ids"][0][mask[0] == 1]
    assert tok.decode(row).endswith("<|im_start|>assistant\n")


def test_same_seed_same_batches_other_seed_other_order_and_epochs_reshuffle(tok):
    records = arithmetic_preferences(24, seed=0)
    a = _batches(records, tok, pack=True, seed=5, num_epochs=2)
    b = _batches(records, tok, pack=True, seed=5, num_epochs=2)
    c = _batches(records, tok, pack=True, seed=6, num_epochs=2)
    order = lambda bs: [int(i) for b in bs for i in b["index"] if i >= 0]  # noqa: E731
    assert order(a) == order(b) and order(a) != order(c)
    first, second = order(a)[:24], order(a)[24:]
    assert sorted(first) == sorted(second) == list(range(24)) and first != second


def test_host_shards_are_disjoint_and_cover_the_data(tok):
    records = arithmetic_preferences(21, seed=0)
    seen = []
    for host in range(3):
        batches = _batches(records, tok, pack=False, shard_index=host, shard_count=3)
        seen.append({int(i) for b in batches for i in b["index"] if i >= 0})
    assert set.union(*seen) == set(range(21)) and sum(map(len, seen)) == 21


def _assert_resume_exact(ds, stops):
    reference = iter(ds)
    batches = [next(reference) for _ in range(max(stops) + 2)]
    for stop in stops:
        it = iter(ds)
        for _ in range(stop):
            next(it)
        state = it.get_state()
        restored = iter(ds)
        restored.set_state(state)
        for want in batches[stop : stop + 2]:
            got = next(restored)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} after resuming at {stop}")


@pytest.mark.parametrize("pack", [False, True])
def test_resume_is_exact(pack, tok):
    records = arithmetic_preferences(30, seed=1) + tiny_chat()
    cfg = BatchConfig(pairs_per_batch=3, max_length=128, pack=pack, rows_per_batch=3)
    ds = build_dataset(
        records,
        tok,
        TokenizeConfig(max_length=128),
        cfg,
        PipelineConfig(seed=3, num_epochs=None),
        sources=[str(i) for i in range(len(records))],
    )
    _assert_resume_exact(ds, stops=[0, 1, 5, 17])


def test_worker_processes_are_deterministic_cover_an_epoch_and_resume_exactly(tok):
    records = arithmetic_preferences(40, seed=1)
    cfg = BatchConfig(pairs_per_batch=4, max_length=128, pack=True, rows_per_batch=4)
    sources = [str(i) for i in range(len(records))]

    def dataset(epochs):
        return build_dataset(
            records,
            tok,
            TokenizeConfig(max_length=128),
            cfg,
            PipelineConfig(seed=3, num_epochs=epochs, num_workers=2),
            sources=sources,
        )

    one_epoch = list(dataset(1))
    assert sorted(int(i) for b in one_epoch for i in b["index"] if i >= 0) == list(range(40))
    again = list(dataset(1))
    for a, b in zip(one_epoch, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    ds = dataset(None)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    restored = iter(ds)
    restored.set_state(state)
    for w in want:
        got = next(restored)
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])
    for iterator in (it, restored):
        iterator.close()


def test_packed_and_padded_batches_give_the_same_sequence_logps(tok):
    """The model honours segment ids: packing must not change any sequence's log-prob."""
    from flax import nnx

    from cpo_jax.models import Transformer, TransformerConfig
    from cpo_jax.ops.logprobs import token_logps

    cfg = TransformerConfig(
        family="llama",
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    records = arithmetic_preferences(6, seed=9) + tiny_chat()[:2]

    def logps(batch):
        logits = model(
            jnp.asarray(batch["input_ids"]),
            attention_mask=jnp.asarray(batch["segment_ids"] > 0),
            positions=jnp.asarray(batch["positions"]),
            segment_ids=jnp.asarray(batch["segment_ids"]),
        )
        per_token = token_logps(logits, jnp.asarray(batch["targets"])) * batch["loss_mask"]
        sums = jax.ops.segment_sum(
            per_token.ravel(),
            jnp.asarray(np.maximum(batch["sequence_ids"], 0)).ravel(),
            num_segments=2 * len(batch["pair_mask"]),
        )
        return {int(batch["index"][s]): np.asarray(sums[2 * s : 2 * s + 2]) for s in np.nonzero(batch["pair_mask"])[0]}

    padded, packed = {}, {}
    for batch in _batches(records, tok, pack=False, pairs=8, length=256, shuffle=False):
        padded.update(logps(batch))
    for batch in _batches(records, tok, pack=True, pairs=8, rows=4, length=256, shuffle=False):
        assert batch["input_ids"].shape[0] == 4
        packed.update(logps(batch))
    assert padded.keys() == packed.keys() == set(range(8))
    for index in padded:
        np.testing.assert_allclose(packed[index], padded[index], rtol=1e-5, atol=1e-4)


def test_tfds_array_record_source_feeds_the_same_pipeline(tok, tmp_path):
    from cpo_jax.data import build_tfds_from_files, load_records, tfds_records, write_jsonl

    train = write_jsonl(arithmetic_preferences(12, seed=4), tmp_path / "train.jsonl")
    test = write_jsonl(tiny_chat(implicit_prompt=True), tmp_path / "test.jsonl")
    build_tfds_from_files({"train": train, "test": test}, tmp_path / "tfds")
    source = tfds_records(tmp_path / "tfds", split="test")
    assert [record for _, record in source] == tiny_chat()  # stored normalised: prompts made explicit
    assert source[2][0] == f"{test}:3"

    cfg = BatchConfig(pairs_per_batch=4, max_length=128, pack=True, rows_per_batch=4)
    from_tfds = list(
        build_dataset(
            tfds_records(tmp_path / "tfds", split="train"),
            tok,
            TokenizeConfig(max_length=128),
            cfg,
            PipelineConfig(seed=2),
        )
    )
    loaded = load_records(train)
    from_jsonl = list(
        build_dataset(
            loaded.records, tok, TokenizeConfig(max_length=128), cfg, PipelineConfig(seed=2), sources=loaded.sources
        )
    )
    assert len(from_tfds) == len(from_jsonl)
    for a, b in zip(from_tfds, from_jsonl):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
