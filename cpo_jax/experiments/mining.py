"""Mine preference pairs by the reference's own preferences: the LLM half of the paper's experiment.

For each arithmetic problem every plausible wrong answer is scored against the correct one by the frozen
reference (the training code's log-prob pass, :func:`cpo_jax.train.reference_cache.compute_reference_logps`).
A *violated* pair is one where the reference prefers the wrong answer, in summed and in per-token average
log-probs (``delta_ref < 0`` and ``delta_ref_norm < 0``): the paper's failure condition can only hold there.
A *contrast* pair is one where the reference prefers the correct answer in both units.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np


@dataclasses.dataclass(frozen=True)
class Mined:
    """Selected records (with ``delta_ref``/``delta_ref_norm`` added) and counts.

    ``violated``: per problem that has one, the wrong answer the reference likes most (lowest
    ``delta_ref_norm``). ``contrast``: from the *other* problems, the wrong answer closest to the correct
    one among those the reference ranks below it (lowest positive ``delta_ref_norm``).
    """

    violated: list[dict]
    contrast: list[dict]
    stats: dict


def select_pairs(records: list[dict], logps: np.ndarray, lengths: np.ndarray) -> Mined:
    """Picks the violated and contrast pairs from scored candidate records.

    Args:
      records: candidate preference records with a ``problem`` key (``data.arithmetic_candidates``).
      logps: ``[N, 2]`` summed reference log-probs (chosen, rejected); NaN for dropped records.
      lengths: ``[N, 2]`` scored completion token counts.
    """
    logps, lengths = np.asarray(logps, np.float64), np.asarray(lengths, np.float64)
    if logps.shape != (len(records), 2) or lengths.shape != logps.shape:
        raise ValueError(f"logps {logps.shape} and lengths {lengths.shape} must both be [{len(records)}, 2]")
    delta = logps[:, 0] - logps[:, 1]
    delta_norm = logps[:, 0] / lengths[:, 0] - logps[:, 1] / lengths[:, 1]
    scored = ~np.isnan(delta_norm)
    violated_mask = scored & (delta < 0) & (delta_norm < 0)
    contrast_mask = scored & (delta > 0) & (delta_norm > 0)

    by_problem: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        by_problem.setdefault(int(record["problem"]), []).append(i)

    def most_preferred(candidates: np.ndarray) -> dict:
        """The candidate with the lowest ``delta_ref_norm``, annotated with its margins."""
        pick = candidates[np.argmin(delta_norm[candidates])]
        return {**records[pick], "delta_ref": float(delta[pick]), "delta_ref_norm": float(delta_norm[pick])}

    violated, contrast = [], []
    for rows in by_problem.values():
        rows = np.asarray(rows)
        violated_rows, contrast_rows = rows[violated_mask[rows]], rows[contrast_mask[rows]]
        if violated_rows.size:
            violated.append(most_preferred(violated_rows))
        elif contrast_rows.size:
            contrast.append(most_preferred(contrast_rows))
    stats = {
        "problems": len(by_problem),
        "candidates": len(records),
        "candidates_scored": int(scored.sum()),
        "candidates_ref_prefers_wrong": int(violated_mask.sum()),
        "problems_with_a_preferred_wrong_answer": len(violated),
        "contrast_problems": len(contrast),
        "candidate_delta_ref_norm_mean": float(np.nanmean(delta_norm)) if scored.any() else None,
    }
    return Mined(violated=violated, contrast=contrast, stats=stats)


def prompt_records(pairs: list[dict]) -> list[dict]:
    """Prompt-only records (``prompt`` + ``answer``) for generation accuracy on the pairs' questions."""
    return [{"prompt": p["prompt"], "answer": p["answer"]} for p in pairs]


def distinct_questions(records: list[dict]) -> list[dict]:
    """The candidate records of each problem whose question no earlier problem asked (a generator may draw a
    question twice; mined pairs then hold each question once)."""
    first_problem: dict[str, int] = {}
    out = []
    for record in records:
        question = json.dumps(record["prompt"], sort_keys=True)
        if first_problem.setdefault(question, int(record["problem"])) == int(record["problem"]):
            out.append(record)
    return out
