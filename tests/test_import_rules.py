"""Imports run one way (issue 21; the rules are written out in docs/architecture.md, "Import rules").

Two checks:

* **Pure modules stay light.** Each is imported in a fresh interpreter, and the heavy frameworks it must not load
  are looked up in ``sys.modules`` afterwards. This catches a heavy import anywhere in the chain, including one
  reached through a package ``__init__``.
* **Layers.** Every ``import`` / ``from ... import`` statement under ``cpo_jax/`` (module level, inside functions
  and under ``if TYPE_CHECKING:`` alike) is read with :mod:`ast`, and the ``cpo_jax`` packages each layer may not
  import are refused. No modules are imported for this check.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cpo_jax"

HEAVY = ("flax", "orbax", "grain", "tensorflow", "tensorflow_datasets", "transformers", "torch", "optax")
# module -> what it may not load (directly or through anything it imports)
PURE = {
    "cpo_jax.errors": (*HEAVY, "jax", "numpy"),
    "cpo_jax.losses": (*HEAVY, "cpo_jax.models", "cpo_jax.train", "cpo_jax.data", "cpo_jax.hf"),
    "cpo_jax.ops": (*HEAVY, "cpo_jax.models", "cpo_jax.train", "cpo_jax.data", "cpo_jax.hf"),
    "cpo_jax.rlhf.algorithms": (
        *HEAVY,
        "cpo_jax.models",
        "cpo_jax.train",
        "cpo_jax.data",
        "cpo_jax.hf",
        "cpo_jax.rlhf.trainer",
        "cpo_jax.rlhf.rollout",
        "cpo_jax.rlhf.rewards",
    ),
    # the config is read and validated before anything is built: no JAX at all
    "cpo_jax.train.config": (*HEAVY, "jax", "cpo_jax.train.trainer", "cpo_jax.train.step"),
    "cpo_jax.train": (*HEAVY, "jax", "cpo_jax.train.trainer", "cpo_jax.train.step"),
    # the package's light names (GGUF conversion helpers, WeightRule, UnsupportedConfig) and model-path checks
    "cpo_jax.hf": (*HEAVY, "jax", "cpo_jax.models", "cpo_jax.hf.pretrained"),
    "cpo_jax.hf.resolve": (*HEAVY, "jax", "cpo_jax.models", "cpo_jax.hf.pretrained"),
    "cpo_jax.hf.tokenizer": (*HEAVY, "jax", "cpo_jax.models", "cpo_jax.hf.pretrained"),
    # the command line parses its arguments before it loads any of the heavy modules it dispatches to
    "cpo_jax.cli": (*HEAVY, "jax", "cpo_jax.train.trainer", "cpo_jax.models"),
}

# layer (a package under cpo_jax/) -> the cpo_jax packages its modules may not import
FORBIDDEN = {
    "losses": ("models", "train", "data", "hf", "rlhf", "parallel", "experiments"),
    "ops": ("losses", "models", "train", "data", "hf", "rlhf", "parallel", "experiments"),
    "models": ("hf", "losses", "train", "data", "rlhf", "experiments"),
    "data": ("models", "losses", "train", "hf", "rlhf", "experiments"),
    "parallel": ("models", "losses", "train", "data", "hf", "rlhf", "experiments"),
    "hf": ("losses", "train", "rlhf", "experiments"),
}
# single modules held to a stricter rule than their package
FORBIDDEN_MODULES = {
    "rlhf/algorithms.py": ("models", "train.trainer", "train.step", "data", "hf", "rlhf.trainer", "rlhf.rollout"),
}


def _loaded_after_import(module: str, names: tuple[str, ...]) -> list[str]:
    """The ``names`` in ``sys.modules`` after ``import module`` in a fresh interpreter."""
    code = f"import json, sys\nimport {module}\nprint(json.dumps([n for n in {list(names)!r} if n in sys.modules]))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent
    )
    assert result.returncode == 0, f"import {module} failed:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_module_loads_nothing_heavy(module):
    assert _loaded_after_import(module, PURE[module]) == [], f"import {module} loads these"


def _cpo_jax_imports(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every cpo_jax module that ``source`` (the text of ``module``, e.g.
    ``cpo_jax.models.transformer`` or ``cpo_jax.models.__init__``) imports, absolute or relative, anywhere in it."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            # "from cpo_jax import losses" may import the subpackage cpo_jax.losses: count base.name
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return sorted((line, name) for line, name in found if name == "cpo_jax" or name.startswith("cpo_jax."))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _hits(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == f"cpo_jax.{f}" or name.startswith(f"cpo_jax.{f}.") for f in forbidden)


def _violations(files, forbidden) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in files
        for line, name in _cpo_jax_imports(path.read_text(), _module_name(path))
        if _hits(name, forbidden)
    ]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"cpo_jax/{layer}/ has no modules"
    assert _violations(files, FORBIDDEN[layer]) == []


@pytest.mark.parametrize("module", sorted(FORBIDDEN_MODULES))
def test_module_imports_only_downwards(module):
    assert _violations([PACKAGE / module], FORBIDDEN_MODULES[module]) == []


def test_hf_translation_lives_in_hf():
    """The models package holds Flax modules and their config; HF names and config.json belong to hf/."""
    models = {p.name for p in (PACKAGE / "models").glob("*.py")}
    assert not models & {"llama.py", "gemma.py", "gpt2.py", "hf_config.py"}
    assert {"llama.py", "gemma.py", "gpt2.py"} <= {p.name for p in (PACKAGE / "hf" / "families").glob("*.py")}


def test_no_lazy_module_getattr():
    """A module-level ``__getattr__`` hides an import cycle (it was how models/ reached hf/)."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
    ]
    assert found == []


def test_the_checker_sees_what_it_must():
    """The AST reader finds function-local, TYPE_CHECKING, ``from cpo_jax import x`` and relative imports."""
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cpo_jax.train.config import X\n"
        "def f():\n    import cpo_jax.hf.pretrained\n    from cpo_jax import losses\n"
        "    from ..data import tokenize\n    from . import config\n    import numpy\n"
    )
    names = [name for _, name in _cpo_jax_imports(source, "cpo_jax.models.probe")]
    assert names == [
        "cpo_jax.train.config.X",
        "cpo_jax.hf.pretrained",
        "cpo_jax.losses",
        "cpo_jax.data.tokenize",
        "cpo_jax.models.config",
    ]
    assert [name for _, name in _cpo_jax_imports("from .config import A", "cpo_jax.models.__init__")] == [
        "cpo_jax.models.config.A"
    ]
    assert _violations([PACKAGE / "hf" / "pretrained.py"], ("models",)), "hf/pretrained.py imports models/"
