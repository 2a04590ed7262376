"""YaRN, dynamic-NTK and LongRoPE scaling against transformers 5 (``modeling_rope_utils.py``).

Each tiny model has ``original_max_position_embeddings`` (for ``dynamic``: ``max_position_embeddings``) of 16, so
a 40-token batch runs in the scaled regime and a 12-token one below it; 16 and 17 sit on either side of HF's
``seq_len > original`` switch. Greedy generation from a 12-token prompt crosses the boundary while decoding.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.errors import UnsupportedConfig
from cpo_jax.hf.pretrained import config_from_hf, from_pretrained, save_pretrained
from cpo_jax.models.config import RopeSpec
from cpo_jax.models.generate import generate
from cpo_jax.models.layers import rope_for_positions
from tests.hf_tiny import COMMON, hf_logits, max_diff

torch = pytest.importorskip("torch")
ATOL = 1e-4
HEAD_DIM = COMMON["head_dim"]
ORIGINAL = 16

# name -> (config class, rope_parameters, extra config kwargs)
ROPE_MODELS = {
    "yarn": (
        "LlamaConfig",
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=ORIGINAL),
        dict(max_position_embeddings=64),
    ),
    # A wide ramp (small theta, beta_fast/slow), no truncation and DeepSeek's mscale ratio.
    "yarn_qwen2": (
        "Qwen2Config",
        dict(
            rope_type="yarn",
            rope_theta=100.0,
            factor=4.0,
            original_max_position_embeddings=ORIGINAL,
            beta_fast=4.0,
            beta_slow=0.25,
            truncate=False,
            mscale=1.0,
            mscale_all_dim=0.5,
        ),
        dict(max_position_embeddings=64, tie_word_embeddings=True),
    ),
    "yarn_qwen3": (
        "Qwen3Config",
        dict(rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=ORIGINAL),
        dict(max_position_embeddings=32, tie_word_embeddings=True),
    ),
    "dynamic": (
        "LlamaConfig",
        dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0),
        dict(max_position_embeddings=ORIGINAL),
    ),
    # No factor: HF derives it as max_position_embeddings / original (4), and the attention factor from it.
    "longrope": (
        "LlamaConfig",
        dict(
            rope_type="longrope",
            rope_theta=10000.0,
            original_max_position_embeddings=ORIGINAL,
            short_factor=[float(x) for x in np.linspace(1.0, 1.5, HEAD_DIM // 2)],
            long_factor=[float(x) for x in np.linspace(1.0, 8.0, HEAD_DIM // 2)],
        ),
        dict(max_position_embeddings=64),
    ),
    # Phi-3 keeps original_max_position_embeddings at the top level (HF prefers it to the rope_parameters entry).
    "longrope_phi3": (
        "Phi3Config",
        dict(
            rope_type="longrope",
            rope_theta=10000.0,
            short_factor=[float(x) for x in np.linspace(1.2, 1.0, HEAD_DIM // 2)],
            long_factor=[float(x) for x in np.linspace(2.0, 6.0, HEAD_DIM // 2)],
        ),
        dict(max_position_embeddings=48, original_max_position_embeddings=ORIGINAL),
    ),
}
NAMES = sorted(ROPE_MODELS)


def _hf_config(name: str):
    import transformers

    cls_name, rope, extra = ROPE_MODELS[name]
    kwargs = dict(COMMON, rope_parameters=json.loads(json.dumps(rope)), **extra)
    return getattr(transformers, cls_name)(**kwargs)


@functools.cache
def _built(name: str, root: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(name), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    path = Path(root) / name
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_rope")


def _fresh(model):
    """Undo HF's dynamic-NTK state (``inv_freq`` grown by an earlier, longer call), so each call stands alone."""
    rotary = model.model.rotary_emb
    if rotary.rope_type == "dynamic":
        rotary.register_buffer("inv_freq", rotary.original_inv_freq.clone(), persistent=False)
        rotary.max_seq_len_cached = rotary.original_max_seq_len
    return model


def _batch(t: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 256, (3, t))
    lengths = np.array([t, t - 3, t - 7])
    right = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    return ids, right


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_tables_equal_transformers_rope_init_functions(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = _hf_config(name)
    ((_, spec),) = config_from_hf(hf_cfg.to_dict()).rope
    init = ROPE_INIT_FUNCTIONS[spec.rope_type]
    inv, scaling = init(hf_cfg)
    np.testing.assert_array_equal(spec.inv_freq(HEAD_DIM), inv.numpy())
    assert spec.attention_scaling == scaling
    if name.startswith("yarn"):
        assert scaling > 1.0  # the mscale reaches cos/sin
    for seq_len in (1, 12, ORIGINAL, ORIGINAL + 1, 40, 1000):
        # What HF's dynamic_rope_update installs for a batch whose max(position_ids) + 1 is seq_len.
        if spec.rope_type == "longrope":
            ref = init(hf_cfg, seq_len=seq_len)[0] if seq_len > ORIGINAL else inv
        elif spec.rope_type == "dynamic":
            ref = init(hf_cfg, seq_len=torch.tensor(seq_len))[0] if seq_len > ORIGINAL else inv
        else:
            ref = inv
        got = np.asarray(spec.inv_freq_for_length(HEAD_DIM, jnp.int32(seq_len)))
        # The grown dynamic base is a float32 pow traced in XLA (HF: torch): a few ulps apart; the rest is exact.
        grown = spec.rope_type == "dynamic" and seq_len > ORIGINAL
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6 if grown else 0, atol=0)


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_one_compiled_function_serves_both_regimes(name, root):
    """cos/sin of the rotary module under jit, below and above the boundary, equal HF's rotary embedding."""
    hf, _ = _built(name, str(root))
    ((_, spec),) = config_from_hf(hf.config.to_dict()).rope
    tables = jax.jit(lambda p: rope_for_positions(p, spec, HEAD_DIM, jnp.float32))
    for offset in (0, 8, 9, 30):  # max position + 1 = 8 + offset: 8, 16, 17, 38
        positions = np.arange(8)[None] + offset
        cos, sin = tables(jnp.asarray(positions))
        with torch.no_grad():
            ref_cos, ref_sin = _fresh(hf).model.rotary_emb(torch.zeros(1, 8, 1), torch.tensor(positions))
        np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=2e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=2e-6, rtol=0)
    assert tables._cache_size() == 1


@pytest.mark.parametrize("t", [12, ORIGINAL, ORIGINAL + 1, 40])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_below_and_above_the_original_length(name, t, root):
    hf, path = _built(name, str(root))
    ours = from_pretrained(path)
    ids, right = _batch(t)
    ref = _fresh_hf_logits(hf, ids, right)
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(right)))
    diff = max_diff(got, ref, right)
    assert diff < ATOL, f"{name} T={t}: max |logit diff| {diff:.2e}"
    assert np.abs(ref).max() > 0.5

    left = right[:, ::-1].copy()
    positions = np.maximum(np.cumsum(left, -1) - 1, 0)
    ref_left = _fresh_hf_logits(hf, ids, left, positions)
    got_left = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(left)))
    assert max_diff(got_left, ref_left, left) < ATOL


@pytest.mark.parametrize("prompt_len", [12, 20])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_crossing_the_boundary_matches_transformers(name, prompt_len, root):
    """Prompt 12 crosses ``original`` mid-decode (position 16 is the 5th new token); prompt 20 starts past it."""
    hf, path = _built(name, str(root))
    rng = np.random.RandomState(prompt_len)
    ids = rng.randint(3, 256, (2, prompt_len))
    mask = np.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, 0  # left padding
    new = 12
    with torch.no_grad():
        ref = (
            _fresh(hf)
            .generate(
                torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
            .numpy()[:, prompt_len:]
        )
    out = generate(from_pretrained(path), jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=new, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


@pytest.mark.parametrize("name", NAMES)
def test_export_keeps_the_rope_config(name, root, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, path = _built(name, str(root))
    source = json.loads((path / "config.json").read_text())
    save_pretrained(from_pretrained(path), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_parameters"] == source["rope_parameters"]
    assert from_pretrained(tmp_path / "out").config.rope == from_pretrained(path).config.rope
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, right = _batch(40, seed=1)
    np.testing.assert_allclose(
        _fresh_hf_logits(reloaded, ids, right), _fresh_hf_logits(hf, ids, right), atol=1e-6, rtol=0
    )


# --------------------------------------------------------------------------------------------------------------
# Translation: HF's standardisation, and bad inputs named by key.
LLAMA = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)
LONG = dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8, long_factor=[2.0] * 8)


def _rope(rope_parameters, **top):
    ((_, spec),) = config_from_hf(dict(LLAMA, rope_parameters=rope_parameters, **top)).rope
    return spec


def test_translation_follows_transformers_standardisation():
    # original_max_position_embeddings: absent -> max_position_embeddings; a top-level key wins (Phi-3).
    assert _rope(dict(rope_type="yarn", rope_theta=1e4, factor=2.0)).original_max_position_embeddings == 64
    top = _rope(
        dict(rope_type="yarn", rope_theta=1e4, factor=2.0, original_max_position_embeddings=32),
        **{"original_max_position_embeddings": 8},
    )
    assert top.original_max_position_embeddings == 8
    # yarn: null factor -> max / original; beta defaults 32 / 1; longrope: absent factor -> max / original.
    yarn = _rope(dict(rope_type="yarn", rope_theta=1e4, factor=None, original_max_position_embeddings=16))
    assert (yarn.factor, yarn.beta_fast, yarn.beta_slow, yarn.truncate) == (4.0, 32.0, 1.0, True)
    assert _rope(dict(LONG, original_max_position_embeddings=16)).factor == 4.0
    assert _rope(dict(LONG, attention_factor=1.5)).attention_scaling == 1.5
    # dynamic grows past max_position_embeddings (HF ignores original_max_position_embeddings there).
    dynamic = _rope(dict(rope_type="dynamic", rope_theta=1e4, factor=2.0, original_max_position_embeddings=8))
    assert dynamic.original_max_position_embeddings == 64 and dynamic.length_dependent
    # Legacy top-level rope_scaling with "type".
    legacy = config_from_hf(dict(LLAMA, rope_theta=5e5, rope_scaling=dict(type="dynamic", factor=2.0))).rope
    assert legacy[0][1] == RopeSpec(theta=5e5, rope_type="dynamic", factor=2.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("legacy", ["su", "yarn"])
def test_phi3_legacy_rope_type_is_longrope_as_in_transformers(legacy):
    """The first Phi-3 128k configs said rope_scaling {"type": "su"}; Phi3Config reads "su" and "yarn" as longrope."""
    import transformers

    hf = _hf_config("longrope_phi3").to_dict()
    params = {k: v for k, v in hf.pop("rope_parameters").items() if k != "rope_type"}
    old = dict(hf, rope_scaling=dict(params, type=legacy))
    assert config_from_hf(old).rope == config_from_hf(_hf_config("longrope_phi3").to_dict()).rope
    assert transformers.Phi3Config(**old).rope_parameters["rope_type"] == "longrope"


@pytest.mark.parametrize(
    "rope_parameters,needle",
    [
        (dict(rope_type="yarn", rope_theta=1e4), "has no rope_parameters.factor"),
        (dict(rope_type="dynamic", rope_theta=1e4), "has no rope_parameters.factor"),
        (dict(rope_type="yarn", rope_theta=1e4, factor=0), "rope_parameters.factor=0"),
        (dict(rope_type="yarn", rope_theta=1e4, factor=2.0, beta_fast="fast"), "rope_parameters.beta_fast='fast'"),
        (dict(rope_type="yarn", rope_theta=1e4, factor=2.0, truncate="yes"), "rope_parameters.truncate='yes'"),
        (
            dict(rope_type="yarn", rope_theta=1e4, factor=2.0, original_max_position_embeddings=16.5),
            "rope_parameters.original_max_position_embeddings=16.5",
        ),
        ({k: v for k, v in LONG.items() if k != "long_factor"}, "has no rope_parameters.long_factor"),
        ({k: v for k, v in LONG.items() if k != "short_factor"}, "has no rope_parameters.short_factor"),
        (dict(LONG, short_factor=[1.0] * 3), "rope_parameters.short_factor with 3 entries; it needs head_dim // 2 = 8"),
        (dict(LONG, long_factor=[2.0] * 9), "rope_parameters.long_factor with 9 entries"),
        (dict(LONG, long_factor=[2.0] * 7 + ["x"]), "rope_parameters.long_factor=[2.0,"),
        (dict(LONG, long_factor=2.0), "rope_parameters.long_factor=2.0; it must be a list of positive numbers"),
        (dict(rope_type="proportional", rope_theta=1e4), "rope_parameters.rope_type='proportional' is not supported"),
    ],
)
def test_bad_rope_parameters_name_the_key(rope_parameters, needle):
    with pytest.raises(UnsupportedConfig) as err:
        config_from_hf(dict(LLAMA, rope_parameters=rope_parameters), source="m/config.json")
    assert needle in str(err.value)
    assert str(err.value).startswith("m/config.json: ")


def _fresh_hf_logits(model, ids, mask, positions=None):
    """:func:`tests.hf_tiny.hf_logits` of a fresh copy (see :func:`_fresh`)."""
    return hf_logits(_fresh(model), ids, mask, positions)
