"""TRL fidelity, against TRL's and PyTorch's own code: the same token ids as TRL 1.x's DPO preprocessing, SGD and the
other optimisers with torch's/optax's defaults, the embedding row of ``pad_token_id`` frozen as ``nn.Embedding``
freezes it, rewards of exactly 0 before the first update, and the same per-step losses as ``DPOTrainer``."""

from __future__ import annotations

import json
import tempfile
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.data import RecordTokenizer, TokenizeConfig, validate, write_jsonl
from tests.tokenizer_fixtures import llama3_style, smollm2_style

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

STRING_RECORDS = [
    {"prompt": "What is 2+2? ", "chosen": "4", "rejected": "5"},  # a trailing space merges with the answer
    {"prompt": "Human: say hello\n\nAssistant:", "chosen": " Hello", "rejected": " no"},  # HH style
    {"prompt": "Write the code.\n\n", "chosen": "Sure, here is the code", "rejected": "no"},  # blank line
    {"prompt": "def f(x):\n", "chosen": "    return x", "rejected": "    print(x)"},  # newline before indent
    {"prompt": "Übersetze Straße → ", "chosen": "street 🙂", "rejected": "naïve données"},  # non-ASCII
    {"prompt": "日本語 is ", "chosen": "yes", "rejected": "no<|im_end|>"},  # CJK; a completion with eos already
]
IMPLICIT_STRINGS = [
    {"chosen": "Q: what is 7? A: 7", "rejected": "Q: what is 7? A: 12"},
    {"chosen": "Human: hi\n\nAssistant: Hello", "rejected": "Human: hi\n\nAssistant: no"},
]
CHAT_RECORDS = [
    {
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
    {
        "prompt": [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello "}],
        "chosen": [{"role": "assistant", "content": "Bonjour, données naïve"}],
        "rejected": [{"role": "assistant", "content": "Hello"}],
    },
    {
        "prompt": [
            {"role": "user", "content": "def f(x):"},
            {"role": "assistant", "content": "    return x"},
            {"role": "user", "content": "and print?\n"},
        ],
        "chosen": [{"role": "assistant", "content": "    print(x)\n"}],
        "rejected": [{"role": "assistant", "content": "日本語 🙂"}],
    },
]
IMPLICIT_CHATS = [
    {
        "chosen": [{"role": "user", "content": "Pick one "}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "Pick one "}, {"role": "assistant", "content": "no"}],
    },
]


def trl_ids(tokenizer, records: list[dict]) -> list[dict]:
    """TRL 1.x's own preprocessing (``DPOTrainer._prepare_dataset``: prompt extraction, eos, tokenisation)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_length=None, report_to=[], use_cpu=True, bf16=False)
    processed = DPOTrainer._prepare_dataset(
        SimpleNamespace(_tokenizer=tokenizer), datasets.Dataset.from_list(records), tokenizer, args, "train"
    )
    return [{k: list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in processed]


def our_ids(tokenizer, records: list[dict]) -> list[dict]:
    rt = RecordTokenizer(tokenizer, TokenizeConfig(max_length=4096, max_prompt_length=4095))
    out = []
    for i, row in enumerate(records):
        example = rt((i, f"r:{i}", validate(row, "preference", f"r:{i}")))
        n = int(example["chosen_prompt_len"])
        assert n == int(example["rejected_prompt_len"])  # chosen and rejected are cut at one point
        assert list(example["chosen"][:n]) == list(example["rejected"][:n])
        out.append(
            {
                "prompt_ids": list(example["chosen"][:n]),
                "chosen_ids": list(example["chosen"][n:]),
                "rejected_ids": list(example["rejected"][n:]),
            }
        )
    return out


@pytest.mark.parametrize("make_tokenizer", [smollm2_style, llama3_style])
@pytest.mark.parametrize(
    "records",
    [STRING_RECORDS, IMPLICIT_STRINGS, CHAT_RECORDS, IMPLICIT_CHATS],
    ids=["strings", "implicit_strings", "chats", "implicit_chats"],
)
def test_token_ids_equal_trl(make_tokenizer, records):
    tokenizer = make_tokenizer()
    if make_tokenizer is llama3_style:  # this tokenizer's eos text is <|eot_id|>
        records = json.loads(json.dumps(records).replace("<|im_end|>", "<|eot_id|>"))
    assert our_ids(tokenizer, records) == trl_ids(tokenizer, records)


def test_a_merge_across_the_prompt_boundary_is_counted(caplog):
    """The trailing-space record is the case the old separate tokenisation got wrong: the space belongs to the
    answer's token, so the prompt part is one token shorter than ``tokenizer(prompt)``."""
    tokenizer = smollm2_style()
    rt = RecordTokenizer(tokenizer, TokenizeConfig(max_length=64))
    example = rt((0, "r:1", STRING_RECORDS[0]))
    alone = tokenizer(STRING_RECORDS[0]["prompt"])["input_ids"]
    assert int(example["chosen_prompt_len"]) == len(alone) - 1 and rt.prefix_mismatches == 1
    assert tokenizer.convert_ids_to_tokens(list(example["chosen"][len(alone) - 1 :])) == ["Ġ4", "<|im_end|>"]
    assert "r:1" in caplog.text and "' '" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# optimisers


def _one_torch_step(make, params: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    p = torch.nn.Parameter(torch.tensor(params, dtype=torch.float64))
    opt = make([p])
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


def _optax_steps(optim: dict, params: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    from cpo_jax.train.config import OptimConfig
    from cpo_jax.train.optim import make_optimizer

    with jax.enable_x64(True):
        cfg = OptimConfig(**{"schedule": "constant", "max_grad_norm": None, "decay_norms_and_biases": True, **optim})
        tx = make_optimizer(cfg, 100)
        p = {"w": jnp.asarray(params, jnp.float64)}
        state = tx.init(p)
        for g in grads:
            updates, state = tx.update({"w": jnp.asarray(g, jnp.float64)}, state, p)
            p = jax.tree.map(lambda a, u: a + u, p, updates)
        return np.asarray(p["w"])


@pytest.mark.parametrize(
    "optim,make",
    [
        ({"name": "sgd", "learning_rate": 0.1}, lambda ps: torch.optim.SGD(ps, lr=0.1)),
        ({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        (
            {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        ),
        (
            {"name": "sgd", "learning_rate": 0.1, "weight_decay": 0.01},
            lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01),
        ),
        ({"name": "adamw", "learning_rate": 0.01}, lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.0)),
        (
            {"name": "adamw", "learning_rate": 0.01, "weight_decay": 0.1},
            lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        ),
        ({"name": "adam", "learning_rate": 0.01}, lambda ps: torch.optim.Adam(ps, lr=0.01)),
    ],
)
def test_optimisers_match_torch_with_their_defaults(optim, make):
    """Unset settings take torch's (and optax's) defaults: SGD has no momentum, Adam's betas are 0.9/0.999."""
    rng = np.random.default_rng(0)
    params, grads = rng.normal(size=8), [rng.normal(size=8) for _ in range(4)]
    np.testing.assert_allclose(
        _optax_steps(optim, params, grads), _one_torch_step(make, params, grads), rtol=1e-10, atol=1e-12
    )


def test_lion_takes_its_own_default_betas():
    import optax

    from cpo_jax.train.optim import effective_settings

    rng = np.random.default_rng(1)
    params, grads = rng.normal(size=8), [rng.normal(size=8) for _ in range(3)]
    with jax.enable_x64(True):
        tx, p = optax.lion(1e-3, weight_decay=0.0), jnp.asarray(params)  # our weight_decay default is 0
        state = tx.init(p)
        for g in grads:
            u, state = tx.update(jnp.asarray(g), state, p)
            p = p + u
    np.testing.assert_allclose(_optax_steps({"name": "lion", "learning_rate": 1e-3}, params, grads), np.asarray(p))
    assert effective_settings({"name": "lion"})["b2"] == 0.99


def test_optimiser_settings_they_do_not_take_are_refused():
    from cpo_jax.errors import ConfigError
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.validate import validate_config

    base = {"model": {"path": "x"}, "data": {"train_files": ["x"]}}
    for optim, key in (
        ({"name": "sgd", "b1": 0.9}, "optim.b1"),
        ({"name": "adamw", "momentum": 0.9}, "optim.momentum"),
        ({"name": "sgd", "nesterov": True}, "optim.nesterov"),
        ({"name": "lion", "eps": 1e-8}, "optim.eps"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(from_dict(TrainConfig, {**base, "optim": optim}))


def test_a_run_saved_with_sgd_momentum_from_b1_is_not_resumed_as_plain_sgd():
    """Before ``optim.momentum`` existed, ``b1`` (0.9 by default) was SGD's momentum: resuming such a run with the
    new default (no momentum) would change it, so the resume check sees the difference."""
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.config import to_dict
    from cpo_jax.train.resume import config_changes

    new = from_dict(TrainConfig, {"optim": {"name": "sgd"}})
    old = to_dict(new)
    old["optim"] = {k: v for k, v in old["optim"].items() if k not in ("momentum", "nesterov")} | {"b1": 0.9}
    assert config_changes(old, new) == {"optim.momentum": (0.9, 0.0)}
    adam = to_dict(from_dict(TrainConfig, {}))
    adam["optim"] |= {"b1": 0.9, "b2": 0.999, "eps": 1e-8}  # explicit defaults equal unset ones
    assert config_changes(adam, from_dict(TrainConfig, {})) == {}


# ------------------------------------------------------------------------------------------------------------
# the padding row of the embedding


@pytest.mark.parametrize("tied", [False, True])
def test_padding_row_gradient_matches_pytorch(tmp_path, tied):
    """``nn.Embedding(padding_idx=pad)``: no gradient through the lookup of the pad row; with tied embeddings the
    output projection's gradient still reaches it. The same loss in both frameworks, the same embedding gradient."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cpo_jax.hf.pretrained import from_pretrained

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=tied,
        pad_token_id=3,
        eos_token_id=2,
        bos_token_id=None,
    )
    hf = AutoModelForCausalLM.from_config(cfg).float()
    hf.save_pretrained(tmp_path)
    ids = np.array([[5, 3, 7, 3, 9, 11], [3, 3, 12, 13, 3, 2]])
    weights = np.random.default_rng(0).normal(size=(2, 6, 40)).astype(np.float32)

    out = hf(input_ids=torch.tensor(ids)).logits
    (out * torch.tensor(weights)).sum().backward()
    want = hf.model.embed_tokens.weight.grad.numpy()

    from flax import nnx

    for freeze, pad_row_zero in ((True, not tied), (False, False)):
        model = from_pretrained(tmp_path, **({} if freeze else {"padding_idx": None}))
        graphdef, state = nnx.split(model)
        grads = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(jnp.asarray(ids)) * weights))(state)
        got = np.asarray(grads["embed"][...])
        if freeze:
            np.testing.assert_allclose(got, want, atol=2e-5)
        else:
            assert np.abs(got[3] - want[3]).max() > 1e-4  # training the row differs from PyTorch
        assert (np.abs(got[3]).max() == 0) == pad_row_zero


# ------------------------------------------------------------------------------------------------------------
# the first step and the trajectory


def _tiny_llama(directory, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sgd_dpo_config(out, records, *, loss_type: str, beta: float, lr: float, steps: int):
    """TRL's DPOConfig for the trajectory tests: plain SGD at a constant rate on the whole dataset as one batch, no
    clipping, float32 on the CPU, a log line per step."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=len(records),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        beta=beta,
        loss_type=[loss_type],
        max_length=1024,
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_drop_last=False,
    )


def _trl_losses(model_dir, records, *, loss_type: str, beta: float, lr: float, steps: int, out) -> list[dict]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    torch.manual_seed(0)
    args = sgd_dpo_config(out, records, loss_type=loss_type, beta=beta, lr=lr, steps=steps)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def _our_losses(model_dir, records, *, loss: str, beta: float, lr: float, steps: int, out) -> list[dict]:
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.trainer import Trainer

    data = write_jsonl(records, out / "data.jsonl")
    cfg = from_dict(
        TrainConfig,
        {
            "output_dir": str(out / "run"),
            "model": {"path": str(model_dir)},
            "data": {
                "train_files": [str(data)],
                "max_length": 1024,
                "max_prompt_length": 1023,
                "pairs_per_batch": len(records),
            },
            "loss": {"name": loss, "hparams": {"beta": beta}},
            "optim": {"name": "sgd", "learning_rate": lr, "schedule": "constant", "max_grad_norm": None},
            "steps": steps,
            "save_every": 1000,
            "progress_bar": False,
            "tensorboard": False,
            "export_hf": False,
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        },
    )
    return Trainer(cfg, devices=jax.devices()[:1]).run().history


@pytest.mark.parametrize(
    "loss,records,lr", [("sigmoid", STRING_RECORDS, 0.5), ("ipo", CHAT_RECORDS, 0.01)], ids=["sigmoid", "ipo"]
)
def test_trajectory_equals_trl_dpo_trainer(tmp_path, loss, records, lr):
    """Five SGD steps of TRL's DPOTrainer and of cpo_jax on the whole dataset as one batch: the same losses and
    rewards at every step (float32; TRL's rewards are exactly 0 before the first update, and so are ours)."""
    tokenizer = smollm2_style()
    model_dir = _tiny_llama(tmp_path / "model", tokenizer)
    beta, steps = 0.1, 5
    theirs = _trl_losses(model_dir, records, loss_type=loss, beta=beta, lr=lr, steps=steps, out=tmp_path / "trl")
    ours = _our_losses(model_dir, records, loss=loss, beta=beta, lr=lr, steps=steps, out=tmp_path)
    assert len(theirs) == len(ours) == steps
    np.testing.assert_allclose([h["loss"] for h in ours], [h["loss"] for h in theirs], rtol=1e-4, atol=1e-5)
    for key in ("logps/chosen", "logps/rejected", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in ours], [h[key] for h in theirs], rtol=1e-4, err_msg=key)
    assert ours[0]["rewards/margins"] == theirs[0]["rewards/margins"] == 0.0
    assert ours[0]["rewards/accuracies"] == theirs[0]["rewards/accuracies"] == 0.0
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3  # the runs moved
