"""Rewards for on-policy RLHF: one interface, two kinds behind it.

A reward function maps prompt records and their decoded completions to float32 scores ``[N]``:

* :class:`VerifierReward`: a rule-based check in Python (the bundled arithmetic task is scored this way);
* :class:`LearnedReward`: a Bradley-Terry reward model (backbone + scalar head, as a ``loss.objective:
  reward`` run trains and exports it) that reads the prompt and completion as text, through its own
  tokenizer and chat template, so the policy and the reward model need not share a vocabulary.

:func:`make_reward` builds either from the config string ``verifier:<name>`` or a directory path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpo_jax.data.bundled import score_arithmetic
from cpo_jax.data.tokenize import RecordTokenizer, TokenizeConfig
from cpo_jax.errors import ConfigError, UserFileNotFoundError
from cpo_jax.parallel.multihost import global_to_host, host_value_to_global


class RewardFunction(Protocol):
    """``(records, completions) -> float32 [N]``: one score per (prompt record, completion text)."""

    def __call__(self, records: Sequence[dict], completions: Sequence[str]) -> np.ndarray: ...


def digit_fraction(prompt, completion) -> float:
    """Share of the completion's non-space characters that are digits (0 for an empty completion).

    A dense smoke-test verifier: a random-init model starts near 10 / vocabulary and can climb it within
    a few dozen RLOO steps, so CI can check that the loop raises a verifier's reward. It ignores the prompt.
    """
    del prompt
    text = completion if isinstance(completion, str) else " ".join(m["content"] for m in completion)
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


#: Rule-based verifiers by name: ``fn(prompt, completion_text) -> float``.
VERIFIERS: dict[str, Callable[[object, str], float]] = {
    "arithmetic": score_arithmetic,
    "digits": digit_fraction,
}


class VerifierReward:
    """Scores completions with a rule-based ``fn(prompt, completion) -> float`` (host Python)."""

    def __init__(self, fn: Callable[[object, str], float], name: str = "verifier"):
        self.fn, self.name = fn, name

    def __call__(self, records: Sequence[dict], completions: Sequence[str]) -> np.ndarray:
        """float32 ``[N]`` scores of ``completions[i]`` for ``records[i]["prompt"]``."""
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        return np.asarray([self.fn(r["prompt"], c) for r, c in zip(records, completions)], np.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _last_token_scores(graphdef, state, head, input_ids, attention_mask):
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)
    last = jnp.max(jnp.where(attention_mask > 0, jnp.arange(input_ids.shape[1]), 0), axis=1)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return h @ head.astype(jnp.float32)


class LearnedReward:
    """A reward model: ``score = h_last · head`` on prompt + completion, tokenised as reward training tokenised
    pairs (:class:`cpo_jax.data.RecordTokenizer`: the chat template for conversational prompts, else the text and EOS).

    Rows are right-padded to a power-of-two bucket (at least 64, at most ``max_length``) so that a few
    shapes cover all calls; text longer than ``max_length`` tokens keeps its first ``max_length`` tokens.
    """

    def __init__(self, model, head: jax.Array, tokenizer, *, max_length: int = 1024, batch_size: int = 16, mesh=None):
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh  # the mesh the model lives on; None: default device
        self.head = host_value_to_global(np.asarray(head), mesh, (None,))
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._record_tokenizer = RecordTokenizer(tokenizer, TokenizeConfig(max_length=max_length))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, mesh=None, **kwargs) -> LearnedReward:
        """Load an HF ``*ForSequenceClassification`` (``num_labels=1``) directory with its tokenizer."""
        from cpo_jax.hf.pretrained import load_reward_model
        from cpo_jax.hf.tokenizer import load_tokenizer

        model, head = load_reward_model(path, mesh=mesh)
        return cls(model, head, load_tokenizer(path), mesh=mesh, **kwargs)

    def _text_ids(self, prompt, completion: str) -> list[int]:
        """The ids reward training scored: chat template for conversational prompts, else prompt + text + EOS."""
        if isinstance(prompt, list):
            completion = [{"role": "assistant", "content": completion}]
        ids, _ = self._record_tokenizer.sequence(prompt, completion, "rollout")
        return list(ids)[: self.max_length]

    def __call__(self, records: Sequence[dict], completions: Sequence[str]) -> np.ndarray:
        """float32 ``[N]`` reward-model scores (on several processes: each must pass the same rows)."""
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        rows = [self._text_ids(r["prompt"], c) for r, c in zip(records, completions)]
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            length = 64
            while length < max(len(r) for r in chunk):
                length *= 2
            length = min(length, self.max_length)
            ids = np.full((self.batch_size, length), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for i, r in enumerate(chunk):
                ids[i, : len(r)], mask[i, : len(r)] = r, 1
            mask[len(chunk) :, 0] = 1  # filler rows: one real token, scores discarded
            # On a (possibly multi-host) mesh every process passes the same rows; each device takes its slice.
            scores = _last_token_scores(
                self.graphdef,
                self.state,
                self.head,
                host_value_to_global(ids, self.mesh),
                host_value_to_global(mask, self.mesh),
            )
            out.append(global_to_host(scores)[: len(chunk)])
        return np.concatenate(out).astype(np.float32)


def make_reward(spec: str, *, mesh=None) -> RewardFunction:
    """``verifier:<name>`` -> :class:`VerifierReward`; a directory -> :class:`LearnedReward`."""
    if spec.startswith("verifier:"):
        name = spec.split(":", 1)[1]
        if name not in VERIFIERS:
            raise ConfigError(
                f"no verifier {name!r}",
                where=f"config key rl.reward={spec!r}",
                hint=f"available: {['verifier:' + n for n in VERIFIERS]}",
            )
        return VerifierReward(VERIFIERS[name], name)
    if not (Path(spec) / "config.json").is_file():
        raise UserFileNotFoundError(
            "neither verifier:<name> nor a reward-model directory with a config.json",
            where=f"config key rl.reward={spec!r}",
            hint="give verifier:<name> or the hf/ folder of a reward run",
        )
    return LearnedReward.from_pretrained(spec, mesh=mesh)
