"""OLMo 2, Phi-3 and SmolLM3 (issue 18) against transformers' PyTorch models, on tiny random checkpoints.

Each tiny model exercises what sets its family apart: OLMo 2's post-norm blocks, whole-projection qk-norm and
attention biases (GQA, so the k norm is narrower than the q norm); Phi-3's fused ``qkv_proj`` (unequal q/k/v parts
under GQA) and ``gate_up_proj`` and its sliding window; SmolLM3's NoPE layers, which here are also its sliding
layers. Every norm and bias vector is perturbed, so that a missed one shows in the logits.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpo_jax.errors import UnsupportedConfig
from cpo_jax.hf.pretrained import from_pretrained, save_pretrained
from tests.hf_tiny import COMMON, assert_greedy_matches_hf, assert_same_safetensors, hf_logits, max_diff

torch = pytest.importorskip("torch")
ATOL = 1e-4

TINY = {
    "olmo2": ("Olmo2Config", dict(attention_bias=True)),
    "phi3": ("Phi3Config", dict(sliding_window=4)),
    "smollm3": (
        "SmolLM3Config",
        dict(
            num_hidden_layers=4,
            no_rope_layers=[1, 0, 1, 0],  # layers 1 and 3 are NoPE ...
            use_sliding_window=True,  # ... and, as transformers derives layer_types, sliding
            sliding_window=4,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
}
NAMES = sorted(TINY)


def _build(name: str, directory: Path, *, seed: int = 0, **overrides):
    """A tiny HF model of ``name`` with perturbed norms and biases, saved to ``directory`` (torch model returned)."""
    import transformers

    cls_name, kwargs = TINY[name]
    config = getattr(transformers, cls_name)(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_tiny_dense")


@functools.cache
def _cached(name: str, root: str):
    directory = Path(root) / name
    return _build(name, directory), directory


def tiny(name, root):
    """``(torch model, checkpoint dir)``, built once per module."""
    return _cached(name, str(root))


def _batch(seed=0, b=3, t=12):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 256, (b, t))
    lengths = np.array([t, t - 3, t - 7])[:b]
    right = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    return ids, right


# ------------------------------------------------------------------------------------------------------ translation
def test_configs_translate_to_the_family_flags(root):
    olmo2 = from_pretrained(tiny("olmo2", root)[1]).config
    assert (olmo2.block, olmo2.qk_norm, olmo2.qk_norm_scope, olmo2.qkv_bias, olmo2.o_bias) == (
        "post",
        True,
        "all_heads",
        True,
        True,
    )
    phi3 = from_pretrained(tiny("phi3", root)[1]).config
    assert phi3.sliding_window == 4 and set(phi3.layer_types) == {"sliding_attention"} and not phi3.qk_norm
    smol = from_pretrained(tiny("smollm3", root)[1]).config
    assert smol.nope_layers == (1, 3) and smol.tie_embeddings
    assert smol.layer_types == ("full_attention", "sliding_attention") * 2


# ----------------------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("name,scan", [("olmo2", False), ("phi3", False), ("smollm3", False), ("smollm3", True)])
def test_logits_match_hf_with_padding(name, scan, root):
    hf, path = tiny(name, root)
    ours = from_pretrained(path, scan_layers=scan)
    ids, right = _batch()
    ref = hf_logits(hf, ids, right)
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(right)))
    diff = max_diff(got, ref, right)
    print(f"{name} scan={scan}: max |logits diff| on real tokens {diff:.2e}")
    assert diff < ATOL
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits

    left = right[:, ::-1].copy()  # left padding: ours count positions from the first real token
    ref_left = hf_logits(hf, ids, left, np.maximum(np.cumsum(left, -1) - 1, 0))
    got_left = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(left)))
    assert max_diff(got_left, ref_left, left) < ATOL


def test_nope_layers_and_the_window_matter(root):
    """NoPE layers and Phi-3's window are not no-ops on these tiny models: without them the logits move far past
    the tolerance, so the parity above checks them."""
    ids, right = _batch(7)
    for name, change in (("smollm3", dict(nope_layers=())), ("phi3", dict(sliding_window=64))):
        _, path = tiny(name, root)
        want = np.asarray(from_pretrained(path)(jnp.asarray(ids), jnp.asarray(right)))
        got = np.asarray(from_pretrained(path, **change)(jnp.asarray(ids), jnp.asarray(right)))
        assert max_diff(got, want, right) > 100 * ATOL, name


# ------------------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip(name, root, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, path = tiny(name, root)
    # Stacked (scanned) layers must write the same fused tensors as the per-layer list.
    save_pretrained(from_pretrained(path, scan_layers=name == "phi3"), tmp_path / "out")
    assert_same_safetensors(path / "model.safetensors", tmp_path / "out" / "model.safetensors")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, right = _batch(1)
    np.testing.assert_allclose(hf_logits(reloaded, ids, right), hf_logits(hf, ids, right), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers_generate(name, root):

    hf, path = tiny(name, root)
    rng = np.random.RandomState(11)
    ids = rng.randint(3, 256, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :4], ids[1, :4] = 0, 0  # left padding
    new = 10  # 19 tokens in all: the windows of 4 slide during decoding
    assert_greedy_matches_hf(hf, path, ids, mask, new)


# ---------------------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("name,scan", [("phi3", False), ("olmo2", True)])
def test_sharded_equals_single_device(name, scan, root):
    """Each device reads its block of Phi-3's fused tensors (unequal q/k/v parts); OLMo 2's q/k norms run over the
    tensor-sharded heads axis. The logits agree with one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from cpo_jax.parallel import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    _, path = tiny(name, root)
    plain = from_pretrained(path, scan_layers=scan)
    sharded = from_pretrained(path, mesh=mesh, scan_layers=scan)
    attn = sharded.layers.attn if scan else sharded.layers[0].attn
    plain_attn = plain.layers.attn if scan else plain.layers[0].attn
    assert attn.k.kernel[...].sharding.spec == P(*(None,) * scan, "fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(attn.k.kernel[...]), np.asarray(plain_attn.k.kernel[...]))
    if name == "olmo2":
        assert attn.q_norm.scale[...].sharding.spec == P(*(None,) * scan, "tensor")
    ids, mask = _batch(2)
    ids, mask = np.concatenate([ids, ids[1:2, ::-1]]), np.concatenate([mask, mask[1:2]])  # 4 rows: data x fsdp
    batch = NamedSharding(mesh, P(("data", "fsdp"), None))
    got = nnx.jit(lambda m, i, a: m(i, a))(
        sharded, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch)
    )
    want = plain(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- training
def test_dpo_steps_through_the_trainer(tmp_path):
    """A few DPO steps on the arithmetic data with a tiny OLMo 2 policy: they run, and the losses are finite."""
    from cpo_jax.data import byte_chat_tokenizer
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.trainer import Trainer
    from tests.train_fixtures import arithmetic_files

    policy = tmp_path / "policy"
    _build(
        "olmo2",
        policy,
        vocab_size=260,
        hidden_size=32,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=3,
    )
    byte_chat_tokenizer().save_pretrained(policy)
    train, evaluation = arithmetic_files(tmp_path, train=16, eval=4)
    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"path": str(policy)},
            "data": {
                "train_files": [str(train)],
                "eval_files": [str(evaluation)],
                "max_length": 96,
                "pairs_per_batch": 4,
            },
            "loss": {"name": "sigmoid"},
            "optim": {"learning_rate": 1e-2, "schedule": "constant"},
            "steps": 3,
            "log_every": 1,
            "save_every": 100,
            "progress_bar": False,
            "tensorboard": False,
            "export_hf": False,
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        },
    )
    result = Trainer(cfg, devices=jax.devices()[:1]).run()
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    np.testing.assert_allclose(losses[0], math.log(2.0), rtol=1e-5)  # step 1: the policy is still the reference
    assert losses[-1] != losses[0]


# -------------------------------------------------------------------------------------------------------------- LoRA
def test_phi3_lora_matches_peft(root, tmp_path):
    """Fused ``qkv_proj`` / ``gate_up_proj`` are one PEFT adapter each (A shared by the parts, B split), both ways."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from cpo_jax.hf.peft import add_adapter, load_adapter, lora_sites, save_adapter
    from cpo_jax.models.lora import LoraSpec

    _, path = tiny("phi3", root)
    ids, mask = _batch(3)
    real = mask.astype(bool)
    model = from_pretrained(path)
    sites = lora_sites(model.config)
    assert sites["qkv_proj"] == (("attn.q", "attn.k", "attn.v"),) and sites["gate_up_proj"] == (("mlp.gate", "mlp.up"),)
    spec = LoraSpec(rank=4, alpha=8)
    add_adapter(model, spec, rngs=nnx.Rngs(1))
    layer = model.layers[1]
    assert layer.attn.q.lora_a is layer.attn.k.lora_a is layer.attn.v.lora_a
    assert layer.mlp.gate.lora_a is layer.mlp.up.lora_a
    lora = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(0), len(nnx.to_flat_state(lora))))
    nnx.update(model, jax.tree.map(lambda v: 0.2 * jax.random.normal(next(keys), v.shape, v.dtype), lora))
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))

    def hf_base():
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()

    save_adapter(model, spec, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    theirs = hf_logits(peft.PeftModel.from_pretrained(hf_base(), tmp_path / "adapter").eval(), ids, mask)
    assert np.abs(ours - np.asarray(from_pretrained(path)(jnp.asarray(ids), jnp.asarray(mask))))[real].max() > 0.5
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)

    torch.manual_seed(0)  # and an adapter PEFT made, read by us
    peft_model = peft.get_peft_model(
        hf_base(),
        peft.LoraConfig(r=3, lora_alpha=5, target_modules=["qkv_proj", "gate_up_proj"], init_lora_weights=False),
    ).eval()
    want = hf_logits(peft_model, ids, mask)
    peft_model.save_pretrained(tmp_path / "theirs")
    again = from_pretrained(path)
    load_adapter(again, tmp_path / "theirs")
    assert again.layers[0].attn.o.lora_a is None and again.layers[0].mlp.down.lora_a is None
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask)))[real], want[real], atol=1e-4)


# ------------------------------------------------------------------------------------------------------- bad inputs
def _edited(root, tmp_path, name, **changes):
    out = tmp_path / name
    shutil.copytree(tiny(name, root)[1], out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "name,changes,message",
    [
        ("olmo2", dict(hidden_act="swish_glu"), "olmo2: config.json sets hidden_act='swish_glu'"),
        ("olmo2", dict(attention_dropout=0.1), "attention_dropout=0.1"),
        ("phi3", dict(resid_pdrop=0.1), "phi3: config.json sets resid_pdrop=0.1"),
        ("phi3", dict(sliding_window=0), "sliding_window=0"),
        (
            "phi3",
            dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75)),
            "partial_rotary_factor",
        ),
        ("smollm3", dict(no_rope_layers=[1, 0, 1]), "3 no_rope_layers for num_hidden_layers=4"),
        ("smollm3", dict(no_rope_layers=[1, 0, 2, 1]), "no_rope_layers=\\[1, 0, 2, 1\\]"),
        ("smollm3", dict(use_sliding_window=False), "use_sliding_window=false"),
    ],
)
def test_unsupported_options_are_named(name, changes, message, root, tmp_path):
    path = _edited(root, tmp_path, name, **changes)
    with pytest.raises(UnsupportedConfig, match=message):
        from_pretrained(path)


@pytest.mark.parametrize("family", ["olmo2", "phi3", "smollm3"])
def test_a_family_refuses_model_types_it_does_not_cover(family):
    import importlib

    module = importlib.import_module(f"cpo_jax.hf.families.{family}")
    with pytest.raises(UnsupportedConfig, match=rf"{family} family does not cover model_type 'llama'"):
        module.config_from_hf({"model_type": "llama"})
