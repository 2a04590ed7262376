"""A config file plus command-line overrides -> one config dict, knowing which values the user typed.

The command line's ``key=value`` overrides (OmegaConf dot-lists, YAML values) go over the file, with these rules:

* **A mapping replaces a mapping-valued key** (``loss.hparams``, ``mesh``, ``mesh_rules``):
  ``loss.hparams={beta: 0.1}`` leaves exactly ``beta``. Hydra's ``{beta:0.1}`` (no space) reads the same.
  A mapping given to a section (``model={path: x}``) is merged into it.
* **Unsetting.** ``~key`` deletes a key the config sets (its default applies), and ``loss.hparams.NAME=null``
  unsets one hyperparameter (the loss's default applies).
* **Switching in one override.** Typing ``loss.name``, ``loss.type`` or ``loss.objective`` switches the loss: the
  file's ``loss.type``/``loss.weights`` (or ``loss.name``) give way, and the file's hyperparameters that the new
  loss does not take are dropped with a logged note. A hyperparameter the user *typed* that the loss does not take
  is refused, naming it. Likewise typing ``epochs`` sets the file's ``steps`` aside, and typing ``steps`` the file's
  ``epochs``; typing both (or a file with both) is refused.
* **TRL's names are refused with the right key:** ``max_steps`` (``steps``), ``num_train_epochs`` (``epochs``),
  ``loss_type`` (``loss.type``), ``loss_weights`` (``loss.weights``).

Every problem is a :class:`~cpo_jax.errors.ConfigError` that names the override or the file.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import typing
from typing import Any

from cpo_jax.errors import ConfigError
from cpo_jax.train.config import DEFAULT_LOSS, TrainConfig, combined_loss_name

log = logging.getLogger("cpo_jax.config")

#: TRL's (and HF's) names for keys that have another name here: refused, with the key to use.
REFUSED = {
    "max_steps": "steps=N (or epochs=E); the step count is called steps everywhere in cpo_jax",
    "num_train_epochs": "epochs=E",
    "loss_type": "loss.type=[...] (TRL's loss_type list)",
    "loss_weights": "loss.weights=[...] (TRL's loss_weights)",
}
_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")
_HYDRA_MAPPING_KEY = re.compile(r"([{,]\s*)([A-Za-z_][\w.-]*):(?=\S)")
COMMAND_LINE = "command line"


@dataclasses.dataclass(frozen=True)
class Override:
    """One parsed command-line item: ``key=value`` or ``~key`` (``delete``)."""

    key: str
    value: Any = None
    delete: bool = False


def parse_override(item: str) -> Override:
    """``key=value`` (the value read as YAML, as OmegaConf does) or ``~key``; :class:`ConfigError` otherwise."""
    from omegaconf import OmegaConf

    if item.startswith("~"):
        key = item[1:].split("=", 1)[0].strip()
        _check_key(key, item)
        return Override(key, delete=True)
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not key=value",
            where=COMMAND_LINE,
            hint="write overrides as key=value, e.g. optim.learning_rate=1e-6 (or ~key to unset one)",
        )
    key, text = item.split("=", 1)
    key = key.strip()
    _check_key(key, item)
    if text.strip().startswith("{") and text.strip().endswith("}"):
        text = _HYDRA_MAPPING_KEY.sub(r"\1\2: ", text)  # Hydra's {beta:0.1} is YAML's {beta: 0.1}
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)["value"]
    except Exception as err:  # noqa: BLE001 - OmegaConf/YAML raise several types for a bad value
        raise ConfigError(f"the value of {item!r} cannot be read: {err}", where=COMMAND_LINE) from None
    return Override(key, value)


def _check_key(key: str, item: str) -> None:
    top = key.split(".", 1)[0]
    if key in REFUSED or top in REFUSED:
        raise ConfigError(
            f"{top!r} is TRL's name; cpo_jax has no such key",
            where=f"{COMMAND_LINE}: {item}",
            hint=f"write {REFUSED[top]}",
        )
    if not _KEY.match(key):
        raise ConfigError(f"{key!r} is not a config key", where=f"{COMMAND_LINE}: {item}")


def is_mapping_key(key: str) -> bool:
    """Whether ``key`` names a free mapping (``loss.hparams``, ``mesh``, ``mesh_rules``), not a section."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        annotation = hints[part]
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):  # an optional section (rl:, model.lora:)
            annotation = options[0]
        if i == len(parts) - 1:
            return annotation is dict or typing.get_origin(annotation) is dict
        cls = annotation
    return False


def _node(tree: dict, parts: list[str], item: str, *, create: bool) -> dict | None:
    """The mapping that holds ``parts[-1]``; None when absent (and not ``create``)."""
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None and create:
            child = node[part] = {}
        if child is None:
            return None
        if not isinstance(child, dict):
            raise ConfigError(
                f"{'.'.join(parts[: i + 1])} is {child!r}, not a section with keys",
                where=f"{COMMAND_LINE}: {item}",
            )
        node = child
    return node


def _has(tree: dict, key: str) -> bool:
    node = _node(tree, key.split("."), key, create=False)
    return node is not None and key.split(".")[-1] in node


def _get(tree: dict, key: str, default=None):
    node = _node(tree, key.split("."), key, create=False)
    return default if node is None else node.get(key.split(".")[-1], default)


def _delete(tree: dict, key: str) -> None:
    node = _node(tree, key.split("."), key, create=False)
    if node is not None:
        node.pop(key.split(".")[-1], None)


def _merge(node: dict, key: str, value) -> None:
    """``node[key] = value``, a mapping merged into an existing section."""
    old = node.get(key)
    if isinstance(value, dict) and isinstance(old, dict):
        for k, v in value.items():
            _merge(old, k, v)
    else:
        node[key] = value


def _leaves(key: str, value) -> set[str]:
    if isinstance(value, dict) and value:
        return {leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)}
    return {key}


def _note(source: str, key: str, value, why: str) -> None:
    log.warning("%s=%r from %s %s: dropped", key, value, source, why)


def apply_overrides(file: dict, overrides: list[str] | None, *, source: str) -> dict:
    """The config dict of ``file`` (the YAML file's contents, named ``source`` in messages) with the command-line
    ``overrides`` applied by the rules in this module's docstring."""
    for top in file:
        if top in REFUSED:
            raise ConfigError(f"{top!r} is TRL's name; cpo_jax has no such key", where=source, hint=REFUSED[top])
    merged = copy.deepcopy(file)
    typed: set[str] = set()
    for item in overrides or []:
        override = parse_override(item)
        key, parts = override.key, override.key.split(".")
        if override.delete:
            if not _has(merged, key):
                raise ConfigError(
                    f"the config does not set {key}",
                    where=f"{COMMAND_LINE}: {item}",
                    hint="~KEY unsets a key of the config file (its default applies); check the spelling",
                )
            _delete(merged, key)
            typed.add(key)
            continue
        typed |= _leaves(key, override.value)
        if key.startswith("loss.hparams.") and len(parts) == 3 and override.value is None:
            _delete(merged, key)  # null unsets a hyperparameter: the loss's own default applies
            continue
        node = _node(merged, parts, item, create=True)
        if isinstance(override.value, dict) and is_mapping_key(key):
            node[parts[-1]] = override.value  # replaced, not merged: loss.hparams={beta: 0.1} leaves only beta
        else:
            _merge(node, parts[-1], override.value)
    _switch(file, merged, typed, source)
    return merged


def _typed(typed: set[str], key: str) -> bool:
    return any(k == key or k.startswith(key + ".") for k in typed)


def _switch(file: dict, merged: dict, typed: set[str], source: str) -> None:
    """What a typed loss, objective, steps or epochs sets aside in the file (see the module docstring)."""
    loss = merged.get("loss") if isinstance(merged.get("loss"), dict) else {}
    if _typed(typed, "loss.name") and not _typed(typed, "loss.type"):
        for key in ("type", "weights"):
            if loss.get(key) is not None and not _typed(typed, f"loss.{key}"):
                _note(source, f"loss.{key}", loss.pop(key), f"gives way to loss.name={loss.get('name')!r}")
    if _typed(typed, "loss.type") and not _typed(typed, "loss.name") and loss.get("type") is not None:
        if "name" in loss:
            name = loss.pop("name")
            if name != DEFAULT_LOSS:
                _note(source, "loss.name", name, f"gives way to loss.type={loss['type']!r}")
        if loss.get("weights") is not None and not _typed(typed, "loss.weights"):
            _note(source, "loss.weights", loss.pop("weights"), f"belongs to another loss.type than {loss['type']!r}")
    steps, epochs = merged.get("steps"), merged.get("epochs")
    if steps is not None and epochs is not None:
        typed_steps, typed_epochs = _typed(typed, "steps"), _typed(typed, "epochs")
        if typed_steps and typed_epochs:
            raise ConfigError(
                f"steps={steps!r} and epochs={epochs!r} are both given",
                where=COMMAND_LINE,
                hint="give one of them: epochs computes steps from the size of data.train_files",
            )
        if typed_epochs:
            _note(source, "steps", merged.pop("steps"), f"gives way to epochs={epochs!r}")
        elif typed_steps:
            _note(source, "epochs", merged.pop("epochs"), f"gives way to steps={steps!r}")
        else:
            raise ConfigError(
                f"steps={steps!r} and epochs={epochs!r} are both set",
                where=source,
                hint="keep one of them: epochs computes steps from the size of data.train_files",
            )
    _check_hparams(merged, typed, source)


def _loss_takes(loss: dict) -> tuple[str, set[str]] | None:
    """``(what, hyperparameter names)`` of the config's objective and loss; None for an unknown loss (the
    validation names it)."""
    from cpo_jax.train.validate import OBJECTIVE_HPARAMS

    objective = loss.get("objective", "preference")
    if objective in OBJECTIVE_HPARAMS:
        return f"loss.objective={objective!r}", set(OBJECTIVE_HPARAMS[objective])
    if objective != "preference":
        return None
    kinds, weights = loss.get("type"), loss.get("weights")
    if isinstance(kinds, str):
        kinds = [kinds]
    try:
        if kinds is not None:
            name = combined_loss_name(kinds, weights if weights is not None and len(weights) == len(kinds) else None)
            what = f"loss.type={list(kinds)!r}"
        else:
            name = loss.get("name", DEFAULT_LOSS)
            what = f"loss {name!r}"
        from cpo_jax import losses

        return what, set(losses.hyperparameters(name))
    except (KeyError, TypeError, ValueError):
        return None


def _check_hparams(merged: dict, typed: set[str], source: str) -> None:
    loss = merged.get("loss")
    if not isinstance(loss, dict) or not isinstance(loss.get("hparams"), dict):
        return
    takes = _loss_takes(loss)
    if takes is None:
        return
    what, allowed = takes
    switched = any(_typed(typed, f"loss.{k}") for k in ("name", "type", "objective"))
    for key in sorted(set(loss["hparams"]) - allowed):
        if _typed(typed, f"loss.hparams.{key}"):
            raise ConfigError(
                f"{key!r} is not a hyperparameter of {what}",
                where=f"{COMMAND_LINE}: loss.hparams.{key}",
                hint=f"{what} takes {sorted(allowed) or 'no loss.hparams'}",
            )
        if switched:
            _note(source, f"loss.hparams.{key}", loss["hparams"].pop(key), f"is not a hyperparameter of {what}")
