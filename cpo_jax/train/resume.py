"""Is a rerun on an existing ``output_dir`` the same run? Compare the config stored with the checkpoint.

Rerunning ``cpo-jax train`` resumes from the newest checkpoint of ``output_dir``. If the config changed in a
way that changes what the run *means* (another model, loss, hyperparameter, optimiser setting, data file,
tokenisation or batch layout), resuming would silently mix two runs, so it is refused with the list of
changed keys unless ``resume.allow_config_change=true``. Keys in :data:`HARMLESS` only change how long the
run goes on, what is logged or evaluated, how often it saves, or how it is laid out on devices; a change
there is accepted and logged. A key that is in neither list counts as meaningful, so new settings are safe
by default.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from cpo_jax.errors import ConfigError
from cpo_jax.train.config import RLConfig, TrainConfig, to_dict

log = logging.getLogger(__name__)

#: Keys that choose how the same numbers are computed, not which: the attention kernel, the remat policy, the
#: log-prob chunk size. A resume may change them, and the Part D tool keeps a finished cell across them.
EXECUTION_ONLY = ("model.remat", "model.attention_impl", "model.logprob_chunk_size")

#: Dotted keys (or prefixes ending in ".") whose change does not change what a run means.
HARMLESS = (
    "output_dir",
    "steps",
    "epochs",
    "log_every",
    "eval_every",
    "eval_batches",
    "save_every",
    "keep_checkpoints",
    "async_checkpoints",
    "max_nonfinite_steps",
    "max_update_ratio",
    "peak_tflops_per_device",
    "tensorboard",
    "wandb_project",
    "progress_bar",
    "export_hf",
    "eval_generation_prompts",
    "eval_generation_tokens",
    "data.eval_files",
    "rl.eval_max_new_tokens",
    "mesh.",
    "mesh_rules",
    "mesh_rules.",
    *EXECUTION_ONLY,
    "resume.",
)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; an empty mapping and lists stay values."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(cfg: TrainConfig | Mapping) -> dict:
    """JSON-normalised config with the optimiser's effective settings (an unset ``b2`` equals its default)."""
    from cpo_jax.train.optim import effective_settings

    tree = json.loads(json.dumps(cfg if isinstance(cfg, Mapping) else to_dict(cfg), default=str))
    if isinstance(tree.get("optim"), dict):
        tree["optim"] = effective_settings(tree["optim"])
    if (tree.get("loss") or {}).get("objective", "preference") != "rlhf":
        tree["rl"] = None  # written with RLConfig's defaults before the rl: section was the RL run's own
    return tree


def is_harmless(key: str) -> bool:
    """True when changing ``key`` between a checkpoint and its resume leaves the run's meaning alone."""
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def config_changes(saved: Mapping, current: TrainConfig | Mapping) -> dict[str, tuple[object, object]]:
    """``{dotted key: (saved value, current value)}`` for every key that differs.

    A key the saved config lacks (written before the key existed) is compared with its default."""
    defaults = {**flatten(_plain(TrainConfig())), **flatten({"rl": json.loads(json.dumps(to_dict(RLConfig())))})}
    old, new = flatten(_plain(saved)), flatten(_plain(current))
    changes = {}
    for key in sorted(set(old) | set(new)):
        before = old.get(key, defaults.get(key, "<absent>"))
        after = new.get(key, defaults.get(key, "<absent>"))
        if before != after:
            changes[key] = (before, after)
    return changes


def check_resume(saved: Mapping, current: TrainConfig, *, step: int, where: str) -> None:
    """Refuse to resume checkpoint ``step`` (stored in ``where``) under a config that changes the run's meaning.

    Raises :class:`ConfigError` with a diff of the meaningful keys and the ways forward; logs harmless changes."""
    changes = config_changes(saved, current)
    meaningful = {k: v for k, v in changes.items() if not is_harmless(k)}
    harmless = {k: v for k, v in changes.items() if is_harmless(k)}
    for key, (before, after) in harmless.items():
        log.warning("resuming step %d of %s with %s changed: %r -> %r", step, where, key, before, after)
    if "steps" in harmless and current.optim.schedule != "constant":
        log.warning(
            "steps changed: the %s learning-rate schedule is recomputed over %d steps from step %d on",
            current.optim.schedule,
            current.steps,
            step,
        )
    if not meaningful:
        return
    diff = "\n".join(f"    {k}: {before!r} -> {after!r}" for k, (before, after) in meaningful.items())
    if current.resume.allow_config_change:
        log.warning(
            "resuming step %d of %s with a changed config (resume.allow_config_change=true):\n%s", step, where, diff
        )
        return
    raise ConfigError(
        f"the checkpoint at step {step} was trained with another config; resuming would mix two runs. Changed:\n{diff}",
        where=where,
        hint="use a new output_dir for a new run, restore the old values to continue this one, or set "
        "resume.allow_config_change=true to continue it under the new config on purpose",
    )
