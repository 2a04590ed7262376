"""Sharded loading on a (data=2, fsdp=2, tensor=2) CPU mesh, and clear errors for bad checkpoints/configs."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from cpo_jax.errors import ModelError, UnsupportedConfig
from cpo_jax.hf.pretrained import from_pretrained
from cpo_jax.parallel import logical_spec, make_mesh
from tests.hf_tiny import tiny_model

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_tiny_shard")


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen3", "gpt2"])
@pytest.mark.parametrize("scan", [False, True])
def test_sharded_load_matches_unsharded(name, scan, root, mesh):
    _, path = tiny_model(name, root)
    plain = from_pretrained(path, scan_layers=scan)
    sharded = from_pretrained(path, mesh=mesh, scan_layers=scan)

    q = sharded.layers.attn.q.kernel[...] if scan else sharded.layers[0].attn.q.kernel[...]
    want = P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor")
    assert q.sharding.spec == want
    assert sharded.embed[...].sharding.spec == P("tensor", "fsdp")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == tuple(
        s // d for s, d in zip(q.shape, (1,) * scan + (2, 2))
    )

    rng = np.random.RandomState(0)
    ids = rng.randint(3, 256, (4, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    ids_s = jax.device_put(jnp.asarray(ids), batch_sharding)
    mask_s = jax.device_put(jnp.asarray(mask), batch_sharding)
    from flax import nnx

    got = nnx.jit(lambda m, i, a: m(i, a))(sharded, ids_s, mask_s)
    want_logits = plain(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want_logits), atol=1e-5)


def test_generate_with_sharded_model_matches_unsharded(root, mesh):
    from cpo_jax.models.generate import generate

    _, path = tiny_model("qwen3", root)
    ids = np.random.RandomState(1).randint(3, 256, (4, 6))
    mask = np.ones_like(ids)
    mask[2, :3] = 0
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    sharded = generate(
        from_pretrained(path, mesh=mesh),
        jax.device_put(jnp.asarray(ids), batch_sharding),
        jax.device_put(jnp.asarray(mask), batch_sharding),
        max_new_tokens=5,
    )
    plain = generate(from_pretrained(path), jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(plain.tokens))


def test_logical_spec_drops_non_dividing_axes(mesh):
    assert logical_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
    assert logical_spec(("embed", "mlp"), (63, 96), mesh) == P(None, "tensor")
    assert logical_spec(("batch", None), (4, 3), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="bogus"):
        logical_spec(("bogus",), (4,), mesh)


def _copy(path, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(path, out)
    return out


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(model_type="deepseek_v3"), "'deepseek_v3'"),  # MLA attention: not ported
        (dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}), "rope_type='proportional'"),
        (dict(hidden_act="swish_glu"), "hidden_act='swish_glu'"),
        (dict(attention_dropout=0.1), "attention_dropout=0.1"),
        (dict(quantization_config={"quant_method": "bitsandbytes"}), "quantization_config"),
    ],
)
def test_unsupported_config_values_are_named(changes, message, root, tmp_path):
    path = _copy(tiny_model("llama", root)[1], tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(UnsupportedConfig, match=message):
        from_pretrained(path)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_a_family_refuses_model_types_it_does_not_cover(family):
    import importlib

    module = importlib.import_module(f"cpo_jax.hf.families.{family}")
    with pytest.raises(UnsupportedConfig, match=rf"{family} family does not cover model_type 'mixtral'"):
        module.config_from_hf({"model_type": "mixtral"})


def test_missing_and_unmapped_tensors_are_named(root, tmp_path):
    path = _copy(tiny_model("llama", root)[1], tmp_path)
    tensors = load_file(path / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        from_pretrained(path)
    extra = dict(tensors, **{"model.layers.0.self_attn.rotary.inv_freq": np.zeros(4, np.float32)})
    save_file(extra, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.safetensors: checkpoint holds 1 tensor.*rotary.inv_freq"):
        from_pretrained(path)


def test_shape_mismatch_names_file_and_tensor(root, tmp_path):
    path = _copy(tiny_model("llama", root)[1], tmp_path)
    _edit_config(path, intermediate_size=80)
    with pytest.raises(ModelError, match=r"model.safetensors: tensor model.layers.0.mlp.\w+_proj.weight has shape"):
        from_pretrained(path)


def test_extra_layer_in_checkpoint_is_an_error(root, tmp_path):
    path = _copy(tiny_model("llama", root)[1], tmp_path)
    _edit_config(path, num_hidden_layers=1)
    with pytest.raises(
        ModelError,
        match="model.safetensors: checkpoint holds tensors for layers the config does not "
        "have, e.g. \\['model.layers.1.",
    ):
        from_pretrained(path)


def test_sharded_load_reads_device_blocks_not_whole_tensors(root, mesh, monkeypatch):
    import cpo_jax.hf.pretrained as pretrained

    reads = []
    original = pretrained.read_block

    def spy(handle, binding, index):
        block = original(handle, binding, index)
        reads.append((binding.hf_name, block.shape))
        return block

    monkeypatch.setattr(pretrained, "read_block", spy)
    _, path = tiny_model("llama", root)
    from_pretrained(path, mesh=mesh)
    q_reads = [shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    # q kernel [64, 64] is split 2 (fsdp) x 2 (tensor) and replicated over data: 8 reads of a 32x32 block.
    assert q_reads == [(32, 32)] * 8
    embed_reads = [shape for name, shape in reads if name == "model.embed_tokens.weight"]
    assert embed_reads == [(128, 32)] * 8


def test_save_pretrained_writes_tokenizer_files(root, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(253)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    _, path = tiny_model("llama", root)
    out = tmp_path / "with_tok"
    from cpo_jax.hf.pretrained import save_pretrained

    save_pretrained(from_pretrained(path), out, tokenizer=tokenizer)
    again = AutoTokenizer.from_pretrained(out)
    assert again("w1 w7 w200")["input_ids"] == tokenizer("w1 w7 w200")["input_ids"] == [4, 10, 203]


def test_save_pretrained_replaces_existing_directory_atomically(root, tmp_path, monkeypatch):
    import cpo_jax.hf.pretrained as pretrained
    from cpo_jax.hf.pretrained import save_pretrained

    _, path = tiny_model("llama", root)
    model = from_pretrained(path)
    out = save_pretrained(model, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
