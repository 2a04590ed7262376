"""The delta_ref audit against an independent float64 recomputation from the reference log-probs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpo_jax.audit import QUANTILES, audit_preferences, format_audit, preview, write_audit
from cpo_jax.data import BatchConfig, PipelineConfig, RecordTokenizer, TokenizeConfig, build_dataset, load_records
from tests.train_fixtures import arithmetic_files, tiny_policy

pytest.importorskip("torch")

# Arithmetic prompts tokenise to 33-35 tokens and completions to 18-19: a prompt limit of 34 drops some
# pairs, and max_length 52 truncates some completions, so both paths of the length policy are exercised.
MAX_LENGTH, MAX_PROMPT, PAIRS, TOP_K = 52, 34, 8, 5


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    policy = tiny_policy(root / "policy")
    train, evaluation = arithmetic_files(root, train=48, eval=16)
    report = audit_preferences(
        policy,
        [train, evaluation],
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT,
        pairs_per_batch=PAIRS,
        top_k=TOP_K,
    )
    return {"policy": policy, "paths": [train, evaluation], "report": report}


@pytest.fixture(scope="module")
def expected(audited):
    """Margins recomputed from ``compute_reference_logps`` and the batches' own loss masks, in float64."""
    from transformers import AutoTokenizer

    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.train.reference_cache import compute_reference_logps

    tokenizer = AutoTokenizer.from_pretrained(audited["policy"])
    model = from_pretrained(audited["policy"])
    data = load_records(audited["paths"], "preference")
    tok_cfg = TokenizeConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, vocab_size=model.config.vocab_size)
    batch_cfg = BatchConfig(pairs_per_batch=PAIRS, max_length=MAX_LENGTH)
    logps = compute_reference_logps(model, data.records, data.sources, tokenizer, tok_cfg, batch_cfg).astype(np.float64)

    # Scored tokens per sequence = the loss mask's sum over that sequence's slot in the batch.
    lengths = np.full((len(data), 2), np.nan)
    one_pass = PipelineConfig(kind="preference", shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    for b in build_dataset(data.records, tokenizer, tok_cfg, batch_cfg, one_pass, sources=data.sources):
        ids, mask = b["sequence_ids"].ravel(), b["loss_mask"].ravel()
        per_slot = np.bincount(ids[ids >= 0], weights=mask[ids >= 0], minlength=2 * PAIRS).reshape(PAIRS, 2)
        lengths[b["index"][b["pair_mask"]]] = per_slot[b["pair_mask"]]
    # ... which is len(ids) - prompt_len, as the tokeniser reports it.
    rt = RecordTokenizer(tokenizer, tok_cfg)
    truncated = 0
    for i, item in enumerate(zip(data.sources, data.records)):
        ex = rt((i, *item), "preference")
        if isinstance(ex, dict):
            np.testing.assert_array_equal(
                lengths[i],
                [len(ex["chosen"]) - ex["chosen_prompt_len"], len(ex["rejected"]) - ex["rejected_prompt_len"]],
            )
            full = [len(rt.sequence(item[1]["prompt"], item[1][k], item[0])[0]) for k in ("chosen", "rejected")]
            truncated += max(full) > MAX_LENGTH

    kept = ~np.isnan(logps).any(axis=1)
    np.testing.assert_array_equal(kept, ~np.isnan(lengths).any(axis=1))
    delta = logps[kept, 0] - logps[kept, 1]
    norm = logps[kept, 0] / lengths[kept, 0] - logps[kept, 1] / lengths[kept, 1]
    return {
        "n": len(data),
        "kept": kept,
        "delta": delta,
        "norm": norm,
        "index": np.flatnonzero(kept),
        "truncated": truncated,
        "records": data.records,
        "sources": data.sources,
    }


def test_the_fixture_exercises_drops_truncation_and_both_signs(expected):
    assert 0 < expected["kept"].sum() < expected["n"]
    assert expected["truncated"] > 0
    assert (expected["delta"] < 0).any() and (expected["delta"] > 0).any()


def test_counts_and_shares_match_the_recomputation(audited, expected):
    r = audited["report"]
    delta, norm = expected["delta"], expected["norm"]
    assert r["num_pairs"] == expected["n"]
    assert r["num_scored"] == delta.size
    assert r["num_dropped"] == expected["n"] - delta.size == r["dropped_reasons"]["prompt_too_long"]
    assert r["frac_ref_prefers_rejected"] == np.mean(delta < 0)
    assert r["frac_ref_prefers_rejected_norm"] == np.mean(norm < 0)
    assert r["frac_ref_prefers_rejected_both"] == np.mean((delta < 0) & (norm < 0))
    assert r["num_ref_prefers_rejected"] == int((delta < 0).sum())
    assert r["num_ref_prefers_rejected_both"] <= min(r["num_ref_prefers_rejected"], r["num_ref_prefers_rejected_norm"])


@pytest.mark.parametrize("key, values", [("delta_ref", "delta"), ("delta_ref_norm", "norm")])
def test_statistics_match_numpy(audited, expected, key, values):
    stats, x = audited["report"][key], expected[values]
    np.testing.assert_allclose(
        [stats[f"q{round(q * 100):02d}"] for q in QUANTILES], np.quantile(x, QUANTILES), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        [stats["mean"], stats["std"], stats["min"], stats["max"]],
        [x.mean(), x.std(), x.min(), x.max()],
        rtol=1e-12,
        atol=1e-12,
    )


def test_histograms_count_every_scored_pair_and_span_zero(audited, expected):
    for name in ("summed", "normalised"):
        hist = audited["report"]["histogram"][name]
        assert len(hist["bins"]) == len(hist["counts"]) + 1
        assert sum(hist["counts"]) == expected["delta"].size
        assert hist["bins"][0] <= 0 <= hist["bins"][-1]


def test_top_at_risk_is_the_most_negative_normalised_margins(audited, expected):
    top = audited["report"]["top_at_risk"]
    norms = [t["delta_ref_norm"] for t in top]
    assert len(top) == TOP_K
    assert norms == sorted(norms)
    np.testing.assert_allclose(norms, np.sort(expected["norm"])[:TOP_K], rtol=1e-12, atol=1e-12)
    by_index = dict(zip(expected["index"].tolist(), zip(expected["delta"], expected["norm"])))
    negatives = int((expected["norm"] < 0).sum())
    assert sum(t["at_risk"] for t in top) == min(TOP_K, negatives)
    for t in top:
        assert t["at_risk"] == (t["delta_ref_norm"] < 0)
        np.testing.assert_allclose((t["delta_ref"], t["delta_ref_norm"]), by_index[t["index"]], rtol=1e-12)
        assert t["source"] == expected["sources"][t["index"]]
        record = expected["records"][t["index"]]
        assert t["prompt"] == "user: " + record["prompt"][0]["content"]
        assert t["chosen"] == "assistant: " + record["chosen"][0]["content"]


def test_report_names_its_inputs_and_settings(audited):
    r = audited["report"]
    assert r["model_path"] == str(audited["policy"])
    assert r["data_paths"] == [str(p) for p in audited["paths"]]
    assert r["settings"] == {
        "max_length": MAX_LENGTH,
        "max_prompt_length": MAX_PROMPT,
        "truncation": "keep_start",
        "pairs_per_batch": PAIRS,
        "top_k": TOP_K,
    }


def test_write_audit_writes_json_and_png(audited, tmp_path):
    paths = write_audit(audited["report"], tmp_path / "out")
    assert paths == {"json": tmp_path / "out" / "audit.json", "png": tmp_path / "out" / "delta_ref_hist.png"}
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == audited["report"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in paths["json"].parent.iterdir()) == ["audit.json", "delta_ref_hist.png"]  # no .tmp
    text = format_audit(audited["report"])
    assert f"{100 * audited['report']['frac_ref_prefers_rejected']:.1f}%" in text
    assert audited["report"]["top_at_risk"][0]["source"] in text
    assert len(text.splitlines()) <= 8


def test_all_pairs_dropped_gives_empty_statistics(audited, tmp_path):
    r = audit_preferences(audited["policy"], audited["paths"][1], max_length=MAX_LENGTH, max_prompt_length=8)
    assert r["num_scored"] == 0 and r["num_dropped"] == r["num_pairs"] == 16
    assert r["frac_ref_prefers_rejected"] is None and r["delta_ref"]["q50"] is None and r["top_at_risk"] == []
    paths = write_audit(r, tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "n/a" in format_audit(r)


def test_missing_data_file_names_the_path(audited, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        audit_preferences(audited["policy"], [audited["paths"][0], missing])


def test_preview_flattens_messages_and_cuts_at_120_characters():
    assert (
        preview([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        == "user: hi\nassistant: yo"
    )
    assert preview("x" * 200) == "x" * 120 + "…"
    assert preview("x" * 120) == "x" * 120
