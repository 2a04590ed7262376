"""LoRA adapters (issue 17, model level) against PEFT on tiny random HF models.

References: the model without adapters (fresh adapters, zeroed adapters), the merged weights, PEFT's own
``PeftModel`` on the transformers model (adapters saved by us, and adapters saved by PEFT and loaded by us),
transformers on the merged export, and the loop/scan and single-device/sharded forms of our own model.
"""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from cpo_jax.errors import ConfigError, ModelError, UnsupportedConfig, UserFileNotFoundError
from cpo_jax.hf.peft import add_adapter, load_adapter, lora_sites, save_adapter
from cpo_jax.hf.pretrained import from_pretrained, save_pretrained
from cpo_jax.models.lora import LoraSpec, has_lora, merge_lora, zero_adapters
from tests.hf_tiny import tiny_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IDS = np.random.RandomState(0).randint(3, 256, (2, 9))
MASK = np.ones_like(IDS)
MASK[1, :3] = 0  # left padding


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_tiny_lora")


def _logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))


def _randomize(model, seed: int = 0, std: float = 0.2):
    """Every A and B drawn from N(0, std^2) (A shared by a fused projection is drawn once)."""
    lora = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(nnx.to_flat_state(lora))))
    draw = lambda v: jax.device_put((std * jax.random.normal(next(keys), v.shape)).astype(v.dtype), v.sharding)
    nnx.update(model, jax.tree.map(draw, lora))
    return model


def _hf_logits(model) -> np.ndarray:
    positions = np.maximum(np.cumsum(MASK, axis=-1) - 1, 0)  # ours count real tokens (GPT-2's are absolute)
    with torch.no_grad():
        return (
            model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), position_ids=torch.tensor(positions))
            .logits.float()
            .numpy()
        )


def _hf_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _peft_logits(path, adapter_dir) -> np.ndarray:
    return _hf_logits(peft.PeftModel.from_pretrained(_hf_base(path), adapter_dir).eval())


def _real(logits: np.ndarray) -> np.ndarray:
    return logits[MASK.astype(bool)]  # padded positions are not compared (HF and we treat them differently)


# --------------------------------------------------------------------------------------------------
def test_fresh_adapters_leave_logits_bit_identical(root):
    _, path = tiny_model("llama", root)
    model = from_pretrained(path)
    base = _logits(model)
    add_adapter(model, LoraSpec(rank=4, alpha=8), rngs=nnx.Rngs(0))
    assert np.array_equal(_logits(model), base)
    q = model.layers[0].attn.q
    assert q.lora_a[...].shape == (64, 4) and q.lora_b[...].shape == (4, 64)
    assert not np.any(np.asarray(q.lora_b[...]))
    a = np.asarray(model.layers[0].mlp.down.lora_a[...])  # PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in))
    bound = 1 / math.sqrt(96)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound and abs(a.mean()) < 0.1 * bound
    assert isinstance(q.lora_a, nnx.LoRAParam) and q.lora_a.get_metadata()["out_sharding"] == ("embed", None)
    assert q.lora_b.get_metadata()["out_sharding"] == (None, "heads")


@pytest.mark.parametrize(
    "name,spec",
    [
        ("llama", LoraSpec(rank=4, alpha=8)),
        ("gemma", LoraSpec(rank=4, alpha=6, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True)),
        ("gpt2", LoraSpec(rank=4, alpha=8)),
    ],
)
def test_matches_merged_peft_and_merged_export(name, spec, root, tmp_path):
    _, path = tiny_model(name, root)
    model = from_pretrained(path)
    base = _logits(model)
    _randomize(add_adapter(model, spec, rngs=nnx.Rngs(1)))
    ours = _logits(model)
    assert np.abs(ours - base).max() > 0.5  # the adapters matter

    merged = merge_lora(model)
    assert not has_lora(merged) and has_lora(model)
    np.testing.assert_allclose(_logits(merged), ours, atol=5e-5, rtol=0)

    save_adapter(model, spec, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", spec.rank, spec.alpha)
    assert config["fan_in_fan_out"] is (name == "gpt2") and config["use_rslora"] is spec.use_rslora
    assert config["target_modules"] == sorted(spec.targets or lora_sites(model.config))
    np.testing.assert_allclose(_real(_peft_logits(path, tmp_path / "adapter")), _real(ours), atol=1e-4, rtol=0)

    save_pretrained(merged, tmp_path / "merged")
    np.testing.assert_allclose(_real(_hf_logits(_hf_base(tmp_path / "merged"))), _real(ours), atol=1e-4, rtol=0)

    g, lora, rest = nnx.split(model, nnx.LoRAParam, ...)  # adapters off without a copy of the base: exact
    assert np.array_equal(_logits(nnx.merge(g, zero_adapters(lora), rest)), base)
    with pytest.raises(ValueError, match="LoRA adapters"):
        save_pretrained(model, tmp_path / "unmerged")


@pytest.mark.parametrize(
    "name,targets,rslora", [("llama", ["q_proj", "v_proj"], True), ("gpt2", ["c_attn", "c_proj"], False)]
)
def test_loads_adapter_saved_by_peft(name, targets, rslora, root, tmp_path):
    _, path = tiny_model(name, root)
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, use_rslora=rslora, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(_hf_base(path), config).eval()
    want = _hf_logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    model = from_pretrained(path)
    spec = load_adapter(model, tmp_path / "adapter")
    assert (spec.rank, spec.alpha, spec.use_rslora, spec.targets) == (4, 6, rslora, tuple(targets))
    assert spec.scale == (6 / 2 if rslora else 6 / 4)
    np.testing.assert_allclose(_real(_logits(model)), _real(want), atol=1e-4, rtol=0)
    layer = model.layers[1]
    if name == "gpt2":  # fused c_attn: one A shared by q, k and v; c_proj adapts attn.o and mlp.down
        assert layer.attn.q.lora_a is layer.attn.k.lora_a is layer.attn.v.lora_a
        assert layer.attn.o.lora_a is not None and layer.mlp.down.lora_a is not None and layer.mlp.up.lora_a is None
    else:
        assert layer.attn.k.lora_a is None and layer.mlp.up.lora_a is None and layer.attn.v.lora_a is not None

    # and back: what we write from it is what PEFT wrote
    save_adapter(model, spec, tmp_path / "again")
    theirs, ours = (
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
    )
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_scan_layers_equals_loop(root, tmp_path):
    _, path = tiny_model("qwen3", root)
    spec = LoraSpec(rank=3, alpha=5, targets=("q_proj", "down_proj"))
    loop = _randomize(add_adapter(from_pretrained(path), spec, rngs=nnx.Rngs(2)), seed=3)
    save_adapter(loop, spec, tmp_path / "adapter")
    scan = from_pretrained(path, scan_layers=True)
    assert load_adapter(scan, tmp_path / "adapter").targets == ("q_proj", "down_proj")
    q = scan.layers.attn.q
    assert q.lora_a[...].shape == (2, 64, 3) and q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
    assert q.lora_b.get_metadata()["out_sharding"] == ("layers", None, "heads")
    np.testing.assert_allclose(_logits(scan), _logits(loop), atol=1e-5, rtol=0)
    np.testing.assert_allclose(_logits(merge_lora(scan)), _logits(loop), atol=5e-5, rtol=0)
    save_adapter(scan, spec, tmp_path / "from_scan")
    a, b = (
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "from_scan" / "adapter_model.safetensors"),
    )
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_gradients_reach_only_the_adapters(root):
    _, path = tiny_model("llama", root)
    model = add_adapter(
        from_pretrained(path), LoraSpec(rank=4, alpha=8, targets=("q_proj", "o_proj", "up_proj")), rngs=nnx.Rngs(0)
    )
    weights = jnp.asarray(np.random.RandomState(1).randn(*IDS.shape, 256).astype(np.float32))

    def loss(m):
        return jnp.sum(m(jnp.asarray(IDS), jnp.asarray(MASK)) * weights)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers, nothing else
    for path_, g in flat:
        assert isinstance(g, nnx.LoRAParam)
        value = np.asarray(g[...])
        if path_[-1] == "lora_a":  # B = 0 at step 0: dL/dA = x^T (dL/dy) B^T = 0 exactly
            assert not np.any(value), path_
        else:
            assert np.abs(value).max() > 1e-3, path_


def test_dropout_is_off_in_eval_and_draws_new_masks_in_train(root):
    _, path = tiny_model("llama", root)
    for scan in (False, True):
        plain = _logits(
            _randomize(
                add_adapter(from_pretrained(path, scan_layers=scan), LoraSpec(rank=4, alpha=8), rngs=nnx.Rngs(0))
            )
        )
        model = _randomize(
            add_adapter(
                from_pretrained(path, scan_layers=scan), LoraSpec(rank=4, alpha=8, dropout=0.5), rngs=nnx.Rngs(0)
            )
        )
        np.testing.assert_allclose(_logits(model), plain, atol=1e-5, rtol=0)  # eval mode: no dropout
        model.train()
        forward = nnx.jit(lambda m: m(jnp.asarray(IDS), jnp.asarray(MASK)))
        first, second = np.asarray(forward(model)), np.asarray(forward(model))
        assert np.abs(first - plain).max() > 1e-2 and np.abs(first - second).max() > 1e-2, scan
        model.eval()
        np.testing.assert_allclose(_logits(model), plain, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
def test_bad_specs_and_targets(root):
    _, path = tiny_model("llama", root)
    model = from_pretrained(path)
    with pytest.raises(ConfigError, match=r"(?s)unknown LoRA target.*'c_attn'.*q_proj"):
        add_adapter(model, LoraSpec(rank=2, alpha=4, targets=("q_proj", "c_attn")), rngs=nnx.Rngs(0))
    assert not has_lora(model)
    for bad in (
        dict(rank=0, alpha=1),
        dict(rank=2, alpha=float("nan")),
        dict(rank=2, alpha=1, dropout=1.0),
        dict(rank=2, alpha=1, targets=()),
    ):
        with pytest.raises(ConfigError):
            LoraSpec(**bad)
    assert LoraSpec(rank=4, alpha=8, use_rslora=True).scale == 4.0 and LoraSpec(rank=4, alpha=8).scale == 2.0
    add_adapter(model, LoraSpec(rank=2, alpha=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_adapter(model, LoraSpec(rank=2, alpha=4), rngs=nnx.Rngs(0))


def test_bad_adapter_directories(root, tmp_path):
    _, path = tiny_model("llama", root)
    good = tmp_path / "good"
    spec = LoraSpec(rank=2, alpha=4, targets=("q_proj", "v_proj"))
    save_adapter(_randomize(add_adapter(from_pretrained(path), spec, rngs=nnx.Rngs(0))), spec, good)
    model = from_pretrained(path)

    def variant(name, config=None, tensors=None, drop=None):
        out = tmp_path / name
        shutil.copytree(good, out)
        if config:
            cfg = json.loads((out / "adapter_config.json").read_text())
            cfg.update(config)
            (out / "adapter_config.json").write_text(json.dumps(cfg))
        if tensors:
            data = load_file(out / "adapter_model.safetensors")
            data.update(tensors)
            save_file(data, str(out / "adapter_model.safetensors"))
        if drop:
            (out / drop).unlink()
        return out

    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    cases = [
        (tmp_path / "nowhere", UserFileNotFoundError, "does not exist"),
        (variant("no_config", drop="adapter_config.json"), UserFileNotFoundError, "no adapter_config.json"),
        (variant("no_weights", drop="adapter_model.safetensors"), ModelError, "adapter_model.safetensors is missing"),
        (variant("prefix", config={"peft_type": "PREFIX_TUNING"}), UnsupportedConfig, "peft_type 'PREFIX_TUNING'"),
        (variant("dora", config={"use_dora": True}), UnsupportedConfig, "use_dora=True"),
        (variant("lacks", config={"target_modules": ["q_proj", "c_attn"]}), ModelError, "(?s)'c_attn'.*q_proj"),
        (variant("rank", config={"r": 3}), ModelError, r"lora_A.weight.*shape \(2, 64\), expected \(3, 64\)"),
        (
            variant("shape", tensors={key: np.zeros((3, 64), np.float32)}),
            ModelError,
            r"layers\.1\.self_attn\.v_proj\.lora_A\.weight: has shape \(3, 64\)",
        ),
        (
            variant("extra", tensors={key.replace("v_proj", "k_proj"): np.zeros((2, 64), np.float32)}),
            ModelError,
            "no targeted projection",
        ),
    ]
    for directory, error, message in cases:
        with pytest.raises(error, match=message):
            load_adapter(model, directory)
        assert not has_lora(model), directory.name  # nothing attached on failure


def test_sharded_adapters_follow_the_kernel(root, tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
    from cpo_jax.parallel import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    _, path = tiny_model("llama", root)
    spec = LoraSpec(rank=4, alpha=8)
    plain = _randomize(add_adapter(from_pretrained(path), spec, rngs=nnx.Rngs(0)))
    save_adapter(plain, spec, tmp_path / "adapter")
    want = _logits(plain)
    batch = NamedSharding(mesh, P("data", None))
    ids, mask = jax.device_put(jnp.asarray(IDS), batch), jax.device_put(jnp.asarray(MASK), batch)
    forward = nnx.jit(lambda m, i, a: m(i, a))
    for scan in (False, True):
        model = from_pretrained(path, mesh=mesh, scan_layers=scan)
        fresh = add_adapter(model, spec, rngs=nnx.Rngs(0))  # placed like the kernel from the start
        q = fresh.layers.attn.q if scan else fresh.layers[0].attn.q
        lead = (None,) * scan
        assert q.kernel[...].sharding.spec == P(*lead, "fsdp", "tensor")
        assert q.lora_a[...].sharding.spec == P(*lead, "fsdp", None)
        assert q.lora_b[...].sharding.spec == P(*lead, None, "tensor")
        load_adapter(model, tmp_path / "adapter")
        q = model.layers.attn.q if scan else model.layers[0].attn.q
        assert q.lora_a[...].sharding.spec == P(*lead, "fsdp", None)
        assert q.lora_b[...].sharding.spec == P(*lead, None, "tensor")
        np.testing.assert_allclose(np.asarray(forward(model, ids, mask)), want, atol=1e-5, rtol=0)
        merged = merge_lora(model)
        mq = merged.layers.attn.q if scan else merged.layers[0].attn.q
        assert mq.kernel[...].sharding == q.kernel[...].sharding
        adapters = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
        for p, v in nnx.to_flat_state(zero_adapters(nnx.state(model, nnx.LoRAParam))):
            assert v[...].sharding == adapters[p][...].sharding
