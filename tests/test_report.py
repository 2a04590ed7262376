"""Run reports (``cpo_jax/report.py``): the smoothed curves, the kept "before" column and the list of outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpo_jax.report import describe_outputs, ema, plot_curves, read_before, write_before


def test_ema_is_tensorboards_debiased_smoothing():
    xs = [4.0, 0.0, 2.0, 1.0]
    w = 0.9
    expected, acc = [], 0.0
    for t, x in enumerate(xs, start=1):  # written out: s_t = (w s_{t-1} + (1 - w) x_t), debiased by 1 - w^t
        acc = w * acc + (1 - w) * x
        expected.append(acc / (1 - w**t))
    np.testing.assert_allclose(ema(xs, w), expected, rtol=1e-12)
    assert ema(xs, w)[0] == 4.0  # the first point is the first value
    np.testing.assert_allclose(ema([3.0] * 50, w), 3.0)  # a constant stays constant
    np.testing.assert_allclose(ema(xs, 0.0), xs)


def test_curves_show_only_logged_panels_with_labels(tmp_path):
    lines = [{"step": 0, "eval/loss": 0.7, "eval/generation/accuracy": 0.2}]
    lines += [{"step": s, "loss": 0.7 - 0.01 * s, "diagnostics/frac_in_U": 0.1} for s in range(1, 9)]
    lines += [{"step": 8, "eval/generation/accuracy": 0.3}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    import matplotlib.pyplot as plt

    seen = {}
    original = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["ylabels"] = [ax.get_ylabel() for ax in fig.axes]
        seen["texts"] = [t.get_text() for t in fig.texts]
        return original(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", capture)
        out = plot_curves(path, tmp_path / "curves.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert seen["titles"] == ["loss", "share of pairs in U", "generation accuracy (greedy)"]
    assert all(seen["ylabels"])
    assert any("delta_ref < delta_theta < 0" in t for t in seen["texts"])


def test_before_is_kept_and_read_back(tmp_path):
    assert read_before(tmp_path) == {}
    (tmp_path / "summary.json").write_text(json.dumps({"before": {"loss": 0.5}, "after": {}}))
    assert read_before(tmp_path) == {"loss": 0.5}  # an older run: its summary's column
    write_before(tmp_path, {"loss": np.float32(0.25)})
    assert read_before(tmp_path) == {"loss": 0.25}  # the file written at the start wins
    (tmp_path / "eval_before.json").write_text("{torn")
    assert read_before(tmp_path) == {"loss": 0.5}


def test_outputs_are_listed_when_present(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "checkpoints" / "20").mkdir()
    (tmp_path / "summary.json").write_text("{}")
    text = describe_outputs(tmp_path)
    assert text.splitlines()[0] == f"outputs in {tmp_path}:"
    assert "  hf/" in text and "(steps 10, 20)" in text and "summary.json" in text
    assert "curves.png" not in text and "tensorboard" not in text


BEGIN, END = "<!-- t:begin -->", "<!-- t:end -->"


def test_replace_marked_rewrites_only_between_the_markers(tmp_path):
    from cpo_jax.report import replace_marked

    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\nbefore\n{BEGIN}\nold | table\n{END}\nafter \\1 $x$\n")
    body = "| a | b |\n|---|---|\n| \\1 | \\g<0> |"  # backslashes are text, not regex group references
    replace_marked(doc, BEGIN, END, body)
    assert doc.read_text() == f"# title\n\nbefore\n{BEGIN}\n{body}\n{END}\nafter \\1 $x$\n"
    replace_marked(doc, BEGIN, END, "new")  # idempotent structure: the markers stay, once each
    assert doc.read_text() == f"# title\n\nbefore\n{BEGIN}\nnew\n{END}\nafter \\1 $x$\n"


@pytest.mark.parametrize(
    "text, found",
    [
        ("no markers at all\n", "0 and 0"),
        (f"{BEGIN}\nonly the first\n", "1 and 0"),
        (f"{BEGIN}\nx\n{END}\n{BEGIN}\ny\n{END}\n", "2 and 2"),
        (f"{END}\nreversed\n{BEGIN}\n", "1 and 1"),
    ],
)
def test_replace_marked_refuses_a_doc_without_one_pair_of_markers(tmp_path, text, found):
    from cpo_jax.errors import DataError
    from cpo_jax.report import replace_marked

    doc = tmp_path / "doc.md"
    doc.write_text(text)
    with pytest.raises(DataError, match=found) as err:
        replace_marked(doc, BEGIN, END, "table")
    assert str(doc) in str(err.value) and "restore the two marker lines" in str(err.value)
    assert doc.read_text() == text  # nothing written


def test_greedy_answers_match_transformers_greedy_generate_in_file_order(tmp_path):
    """Each answer is HF's greedy continuation of the same prompt tokens, decoded; the order is the file's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpo_jax.data import (
        BatchConfig,
        PipelineConfig,
        RecordSet,
        TokenizeConfig,
        arithmetic_prompts,
        build_dataset,
        score_arithmetic,
    )
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.report import generation_correct, greedy_answers
    from tests.train_fixtures import tiny_policy

    path = tiny_policy(tmp_path / "policy", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = arithmetic_prompts(5, seed=2)
    prompts = RecordSet(records, [f"mem:{i}" for i in range(len(records))])
    model = from_pretrained(path)
    kept, answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch=2, max_prompt_length=64)
    assert [r["prompt"] for r in kept] == [r["prompt"] for r in records]

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tok_cfg = TokenizeConfig(max_length=128, max_prompt_length=64)
    pipe = PipelineConfig(kind="prompt_only", shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    batches = build_dataset(records, tokenizer, tok_cfg, BatchConfig(1, 128, pad_id=0), pipe, sources=prompts.sources)
    for b in batches:
        index = int(b["index"][0])
        ids = torch.tensor(np.asarray(b["input_ids"])[0][np.asarray(b["attention_mask"])[0] > 0])[None]
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=3, pad_token_id=0)
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert answers[index] == expected
    correct = generation_correct(model, tokenizer, prompts, max_new_tokens=6, batch=2, max_prompt_length=64)
    assert list(correct) == [bool(score_arithmetic(r["prompt"], a)) for r, a in zip(records, answers, strict=True)]
