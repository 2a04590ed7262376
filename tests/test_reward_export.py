"""Reward models: our last-token scalar head against HF's ``*ForSequenceClassification`` after export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.hf.pretrained import from_pretrained, save_pretrained
from cpo_jax.train.objectives import sequence_rewards
from tests.hf_tiny import tiny_model

LENGTHS = [9, 14, 5, 12]  # four sequences: pairs (0, 1) and (2, 3)
L = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reward_hf")


def _tokens(seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 200, size=n).astype(np.int32) for n in LENGTHS]


def padded_batch(tokens, pad_id):
    """One sequence per row, right-padded: the training batch layout."""
    rows = len(tokens)
    batch = {
        "input_ids": np.full((rows, L), pad_id, np.int32),
        "positions": np.zeros((rows, L), np.int32),
        "segment_ids": np.zeros((rows, L), np.int32),
        "sequence_ids": np.full((rows, L), -1, np.int32),
        "pair_mask": np.ones(rows // 2, bool),
    }
    for r, t in enumerate(tokens):
        batch["input_ids"][r, : len(t)] = t
        batch["positions"][r, : len(t)] = np.arange(len(t))
        batch["segment_ids"][r, : len(t)] = 1
        batch["sequence_ids"][r, : len(t)] = r
    return batch


def packed_batch(tokens, pad_id):
    """Sequences 0+1 packed in row 0 and 2+3 in row 1 (row length 32)."""
    batch = {k: np.zeros((2, 2 * L), np.int32) for k in ("input_ids", "positions", "segment_ids")}
    batch["input_ids"][:] = pad_id
    batch["sequence_ids"] = np.full((2, 2 * L), -1, np.int32)
    batch["pair_mask"] = np.ones(2, bool)
    for row in range(2):
        start = 0
        for k in range(2):
            s, t = 2 * row + k, tokens[2 * row + k]
            sl = slice(start, start + len(t))
            batch["input_ids"][row, sl], batch["positions"][row, sl] = t, np.arange(len(t))
            batch["segment_ids"][row, sl], batch["sequence_ids"][row, sl] = k + 1, s
            start += len(t)
    return batch


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "gpt2"])
def test_exported_reward_model_matches_hf_sequence_classification(name, root, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    _, path = tiny_model(name, root)
    model = from_pretrained(path)
    head = jax.random.normal(jax.random.key(0), (model.config.hidden_size,)) * 0.5
    tokens = _tokens()
    ours = np.asarray(sequence_rewards(model, head, {k: jnp.asarray(v) for k, v in padded_batch(tokens, 0).items()}))

    class PadTokenizer:  # GPT-2's tiny config has no pad id: the tokenizer supplies it
        pad_token_id = 0

        def save_pretrained(self, directory):
            pass

    out = save_pretrained(model, tmp_path / "rm", score_head=head, tokenizer=PadTokenizer())
    hf = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.num_labels == 1 and hf.config.architectures[0].endswith("ForSequenceClassification")
    ids = torch.tensor(padded_batch(tokens, 0)["input_ids"], dtype=torch.long)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_packed_and_padded_batches_give_the_same_rewards(root):
    _, path = tiny_model("llama", root)
    model = from_pretrained(path)
    head = jax.random.normal(jax.random.key(1), (model.config.hidden_size,))
    tokens = _tokens(1)
    padded = sequence_rewards(model, head, {k: jnp.asarray(v) for k, v in padded_batch(tokens, 0).items()})
    packed = sequence_rewards(model, head, {k: jnp.asarray(v) for k, v in packed_batch(tokens, 0).items()})
    np.testing.assert_allclose(np.asarray(packed), np.asarray(padded), atol=1e-5)


def test_reward_export_refuses_a_wrong_head_and_a_missing_pad_id(root, tmp_path):
    _, path = tiny_model("gpt2", root)
    model = from_pretrained(path)
    with pytest.raises(ValueError, match="hidden size is 64"):
        save_pretrained(model, tmp_path / "a", score_head=np.zeros(63, np.float32))
    with pytest.raises(ValueError, match="needs pad_token_id"):
        save_pretrained(model, tmp_path / "b", score_head=np.zeros(64, np.float32))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
