"""Small datasets generated locally (this machine has no hub): verifiable arithmetic and a tiny chat set.

* ``arithmetic_preferences``: "What is 37 + 45?" with the correct answer chosen and a plausibly wrong
  one rejected (off by one or ten, swapped digits, the wrong operation). ``score_arithmetic`` checks
  any completion against the problem, so training can be measured by the accuracy of generations.
* ``arithmetic_prompts``: the same problems as prompt-only records (with the answer kept for scoring).
* ``tiny_chat``: a handful of multi-turn conversations (system prompts included) with a better and a
  worse final assistant turn, for chat-template tests.

Held-out questions by construction: :func:`question_split` assigns every question ("What is a op b?") to ``"train"``
or ``"eval"`` by a hash of its text (one question in four is ``"eval"``). A generator called with ``split=`` draws
only questions of that split, so a training set and an evaluation set never share a question, whatever their sizes
and seeds (the ``bundled:`` sources do this). ``split=None`` draws from every question.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import numpy as np

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_PROBLEM = re.compile(r"What is (-?\d+) ([+*-]) (-?\d+)\?")
_INTEGER = re.compile(r"-?\d+")


Split = Literal["train", "eval"]
EVAL_SHARE = 4  # one question in EVAL_SHARE is held out for evaluation


def question_split(a: int, op: str, b: int) -> Split:
    """``"eval"`` for one question in :data:`EVAL_SHARE` (by the SHA-256 of its text), else ``"train"``."""
    digest = hashlib.sha256(_prompt_text(a, op, b).encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") % EVAL_SHARE == 0 else "train"


def _problem(rng: np.random.RandomState, max_operand: int, split: Split | None = None) -> tuple[int, str, int]:
    """A random question ``(a, op, b)``; with ``split``, redrawn until :func:`question_split` says ``split``."""
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
    while True:
        op = "+-*"[rng.randint(3)]
        hi = max_operand if op != "*" else max(2, int(max_operand**0.5) * 2)
        a, b = int(rng.randint(0, hi + 1)), int(rng.randint(0, hi + 1))
        if split is None or question_split(a, op, b) == split:
            return a, op, b


def wrong_answers(a: int, op: str, b: int) -> list[int]:
    """Plausible wrong answers to ``a op b``: off by one or ten, swapped digits, the other operation.

    May repeat a value; never contains the right answer.
    """
    right = _OPS[op](a, b)
    candidates = [right + 1, right - 1, right + 10, right - 10]
    if abs(right) >= 10:
        digits = str(abs(right))
        swapped = int(digits[::-1]) * (1 if right >= 0 else -1)
        candidates.append(swapped)
    other = "+" if op != "+" else "-"
    candidates.append(_OPS[other](a, b))
    return [int(c) for c in candidates if c != right]


def _wrong_answer(rng: np.random.RandomState, a: int, op: str, b: int) -> int:
    wrong = wrong_answers(a, op, b)
    return wrong[rng.randint(len(wrong))]


def _answer(value: int) -> str:
    return f"The answer is {value}."


def _prompt_text(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def arithmetic_preferences(
    n: int, *, seed: int = 0, max_operand: int = 99, conversational: bool = True, split: Split | None = None
) -> list[dict]:
    """``n`` preference records; ``chosen`` is correct, ``rejected`` is wrong (explicit prompt). ``split``: draw only
    that split's questions (:func:`question_split`)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        a, op, b = _problem(rng, max_operand, split)
        chosen, rejected = _answer(_OPS[op](a, b)), _answer(_wrong_answer(rng, a, op, b))
        question = _prompt_text(a, op, b)
        if conversational:
            out.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            out.append({"prompt": question + " ", "chosen": chosen, "rejected": rejected})
    return out


def arithmetic_prompts(
    n: int, *, seed: int = 1, max_operand: int = 99, conversational: bool = True, split: Split | None = None
) -> list[dict]:
    """``n`` prompt-only records with the correct ``answer`` kept for scoring; ``split`` as
    :func:`arithmetic_preferences`."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        a, op, b = _problem(rng, max_operand, split)
        question = _prompt_text(a, op, b)
        prompt = [{"role": "user", "content": question}] if conversational else question + " "
        out.append({"prompt": prompt, "answer": _OPS[op](a, b)})
    return out


def arithmetic_candidates(n: int, *, seed: int, max_operand: int = 99, split: Split | None = None) -> list[dict]:
    """``n`` problems, each with every distinct plausible wrong answer as a preference record.

    Returns one record per (problem, wrong answer): conversational ``prompt``, the correct answer as
    ``chosen``, the wrong one as ``rejected``, plus ``problem`` (its index) and ``answer`` (the right
    value), for mining pairs by the reference's own preferences. ``split`` as :func:`arithmetic_preferences`.
    """
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        a, op, b = _problem(rng, max_operand, split)
        right = _OPS[op](a, b)
        prompt = [{"role": "user", "content": _prompt_text(a, op, b)}]
        for wrong in dict.fromkeys(wrong_answers(a, op, b)):
            out.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": _answer(right)}],
                    "rejected": [{"role": "assistant", "content": _answer(wrong)}],
                    "problem": i,
                    "answer": right,
                }
            )
    return out


def score_arithmetic(prompt, completion) -> float:
    """1.0 when the last integer in ``completion`` solves the problem in ``prompt``, else 0.0.

    ``prompt`` may be a string or a list of messages (the last user message holds the problem);
    ``completion`` a string or a list of messages.
    """
    if isinstance(prompt, list):
        prompt = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    if isinstance(completion, list):
        completion = " ".join(m["content"] for m in completion)
    match = _PROBLEM.search(prompt)
    if match is None:
        raise ValueError(f"no arithmetic problem in prompt {prompt!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    numbers = _INTEGER.findall(completion)
    return float(bool(numbers) and int(numbers[-1]) == _OPS[op](a, b))


_CHATS = [
    ("You are a concise assistant.", ["Name a primary colour."], "Red.", "Colours are nice."),
    (None, ["Hi!", "Hello! How can I help?", "What is the capital of Italy?"], "Rome.", "Milan."),
    (None, ["Translate 'merci' to English."], "Thank you.", "Please."),
    ("Answer in one word.", ["What freezes at 0 °C?"], "Water.", "Everything freezes at some point, really."),
    (None, ["Is 7 prime?"], "Yes, 7 is prime.", "No, 7 is even."),
    (None, ["Give me a synonym for 'happy'.", "Joyful.", "Another one?"], "Cheerful.", "Sad."),
    ("You are a helpful assistant.", ["How many days are in a leap year?"], "366.", "365."),
    (None, ["Spell 'cat' backwards."], "tac", "cat"),
    (None, ["¿Cómo estás?"], "Estoy bien, gracias.", "I do not understand."),
    (None, ["What is 2 + 2?", "4.", "And times 3?"], "12.", "7."),
    ("Be polite.", ["Can you help me?"], "Of course. What do you need?", "No."),
    (None, ["Which is larger, 0.5 or 0.45?"], "0.5 is larger.", "0.45 is larger."),
]


def tiny_chat(*, implicit_prompt: bool = False) -> list[dict]:
    """Twelve conversational preference records (some with system prompts, some multi-turn).

    With ``implicit_prompt`` the records carry the whole conversation in ``chosen``/``rejected`` and no
    ``prompt`` key, as in datasets that leave the prompt implicit.
    """
    out = []
    for system, turns, better, worse in _CHATS:
        prompt = [{"role": "system", "content": system}] if system else []
        for i, text in enumerate(turns):
            prompt.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        chosen = [{"role": "assistant", "content": better}]
        rejected = [{"role": "assistant", "content": worse}]
        if implicit_prompt:
            out.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out
