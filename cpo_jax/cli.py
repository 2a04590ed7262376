"""``cpo-jax``: train, eval, generate, audit and convert (typer for commands, OmegaConf for configs).

Configs are YAML files merged with ``key=value`` overrides (OmegaConf dot-lists), then loaded strictly
into :class:`cpo_jax.train.TrainConfig`: an unknown key, a wrong type, a missing path or an impossible mesh
is reported with the key's name before anything is compiled or downloaded. ``max_steps=N`` is an alias of
``steps=N``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
convert_app = typer.Typer(no_args_is_help=True, help="Convert between HF directories and Orbax checkpoints.")
app.add_typer(convert_app, name="convert")

_ALIASES = {"max_steps": "steps"}


class ConfigError(ValueError):
    """A config problem found before any work starts."""


def load_config(path: str | Path, overrides: list[str] | None = None):
    """YAML + ``key=value`` overrides -> a validated :class:`TrainConfig`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cpo_jax.train import TrainConfig, from_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    dotlist = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        dotlist.append(f"{_ALIASES.get(key, key)}={value}")
    try:
        merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(dotlist))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}") from None
    try:
        cfg = from_dict(TrainConfig, data)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err.args[0] if err.args else err}") from None
    _check_paths_and_mesh(cfg, path)
    return cfg


def _check_paths_and_mesh(cfg, source: Path) -> None:
    import jax

    from cpo_jax.data.sources import is_bundled
    from cpo_jax.hf.resolve import SMOLLM2, TINY
    from cpo_jax.parallel import resolve_mesh_shape

    if cfg.model.path not in (SMOLLM2, TINY) and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"{source}: model.path={cfg.model.path!r} is not an HF checkpoint directory "
                          f"(no config.json); use a directory, {SMOLLM2!r} or {TINY!r}")
    for key in ("train_files", "eval_files"):
        for file in getattr(cfg.data, key):
            if not is_bundled(file) and not Path(file).exists():
                raise ConfigError(f"{source}: data.{key} names {file!r}, which does not exist")
    try:
        resolve_mesh_shape(cfg.mesh, jax.device_count())
    except ValueError as err:
        raise ConfigError(f"{source}: mesh: {err} ({jax.device_count()} devices here)") from None


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _restored_trainer(config: Path, overrides: list[str] | None):
    """``(cfg, trainer, step)``: a validated config, its Trainer, and the checkpoint step it restored (0: none)."""
    from cpo_jax.train import Trainer

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        _fail(err)
    if cfg.loss.objective == "rlhf":
        from cpo_jax.rlhf import RLTrainer

        trainer = RLTrainer(cfg)
    else:
        trainer = Trainer(cfg)
    step, _ = trainer.restore_latest()
    return cfg, trainer, step


def _evaluate(trainer, cfg) -> dict:
    from cpo_jax.report import generation_accuracy

    metrics = trainer.evaluate(trainer.state.params) if trainer.eval_set is not None else {}
    if cfg.eval_generation_prompts:
        metrics.update(generation_accuracy(trainer.policy(), trainer.tokenizer, cfg.eval_generation_prompts,
                                           max_new_tokens=cfg.eval_generation_tokens))
    return metrics


@app.command()
def train(
    config: Path,
    overrides: Annotated[list[str] | None, typer.Argument()] = None,
    distributed: Annotated[bool, typer.Option(help="join a multi-host run via JAX cluster detection (TPU pods, "
                                                   "SLURM); CPO_JAX_COORDINATOR etc. also start one")] = False,
) -> None:
    """Train (DPO, CPO or any loss by name; SFT; reward model; RLOO/GRPO/PPO) from CONFIG.yaml with key=value
    overrides."""
    from cpo_jax.parallel import initialize
    from cpo_jax.report import PREFERENCE_PANELS, RL_PANELS, format_before_after, plot_curves

    initialize(cluster_detection=distributed)  # before any other JAX call; a no-op for one process
    cfg, trainer, start = _restored_trainer(config, overrides)
    import jax

    before = _evaluate(trainer, cfg) if start == 0 else {}
    writes = jax.process_index() == 0  # on several hosts, process 0 writes the run's files
    if before and writes:  # the step-0 point of the eval curves
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, **{f"eval/{k}": float(v) for k, v in before.items()}}) + "\n")
    result = trainer.run()
    after = _evaluate(trainer, cfg)
    if not writes:
        return
    out = Path(cfg.output_dir)
    if (out / "metrics.jsonl").is_file():
        panels = RL_PANELS if cfg.loss.objective == "rlhf" else PREFERENCE_PANELS
        plot_curves(out / "metrics.jsonl", out / "curves.png", panels=panels)
    summary = {"start_step": result.start_step, "final_step": result.final_step, "before": before, "after": after}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(f"trained steps {result.start_step} -> {result.final_step}; outputs in {out}")
    if before or after:
        typer.echo(format_before_after(before, after))


@app.command("eval")
def evaluate(config: Path, overrides: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    """Preference accuracy, the paper's diagnostics and (verifiable task) generation accuracy of a run's latest
    checkpoint, or of model.path when the run has none."""
    cfg, trainer, step = _restored_trainer(config, overrides)
    metrics = {"step": step, **_evaluate(trainer, cfg)}
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def generate(
    model: str,
    prompt: Annotated[list[str], typer.Option(help="a prompt (repeat for a batch)")],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chat: bool = True,
    seed: int = 0,
) -> None:
    """Continue prompts with MODEL (an HF directory, 'smollm2' or 'tiny-random'); chat template by default."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoTokenizer

    from cpo_jax.data import BatchConfig, RecordTokenizer, TokenizeConfig
    from cpo_jax.data.batching import PROMPT_ONLY, BatchBuilder
    from cpo_jax.hf.resolve import resolve_model_path
    from cpo_jax.models import from_pretrained
    from cpo_jax.models.generate import SamplingConfig
    from cpo_jax.models.generate import generate as run_generate

    try:
        path = resolve_model_path(model)
    except FileNotFoundError as err:
        _fail(err)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The data pipeline's own prompt tokenisation and left-padded prompt batches.
    record_tokenizer = RecordTokenizer(tokenizer, TokenizeConfig())  # only prompt_ids is used: no limits apply
    encoded = [np.asarray(record_tokenizer.prompt_ids([{"role": "user", "content": p}] if chat else p), np.int32)
               for p in prompt]
    pad = tokenizer.pad_token_id or 0
    builder = BatchBuilder(BatchConfig(pairs_per_batch=len(prompt), max_length=max(map(len, encoded)), pad_id=pad),
                           PROMPT_ONLY)
    for i, ids in enumerate(encoded):
        builder.add({"prompt": ids, "index": i})
    batch = builder.build()
    out = run_generate(from_pretrained(path), jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                       max_new_tokens=max_new_tokens,
                       sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, rng=jax.random.key(seed))
    tokens, keep = np.asarray(out.tokens), np.asarray(out.mask)
    for p, row, m in zip(prompt, tokens, keep):
        typer.echo(json.dumps({"prompt": p, "completion": tokenizer.decode(row[m > 0], skip_special_tokens=True)},
                              ensure_ascii=False))


@app.command()
def audit(
    model: str,
    data: list[str],
    out: Path = Path("runs/audit"),
    max_length: int = 512,
    max_prompt_length: Annotated[int | None, typer.Option(help="prompt token limit; use the training config's "
                                                               "data.max_prompt_length (default: max_length // 2)")] = None,
    top_k: int = 20,
) -> None:
    """Before training: how often does the reference MODEL prefer the rejected answer on DATA (delta_ref < 0)?"""
    from cpo_jax.audit import audit_preferences, format_audit, write_audit
    from cpo_jax.hf.resolve import resolve_model_path

    try:
        path = resolve_model_path(model)
        report = audit_preferences(path, data, max_length=max_length, max_prompt_length=max_prompt_length, top_k=top_k)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    files = write_audit(report, out)
    typer.echo(format_audit(report))
    typer.echo(f"report: {files['json']}  histogram: {files['png']}")


@convert_app.command("orbax-to-hf")
def orbax_to_hf(run_dir: Path, dst: Path, step: int | None = None) -> None:
    """Export a training run's checkpoint (latest, or --step) as an HF directory with the tokenizer."""
    from cpo_jax.train import TrainConfig, Trainer, from_dict

    config_file = run_dir / "config.json"
    if not config_file.is_file():
        _fail(FileNotFoundError(f"{run_dir}: no config.json; give the output_dir of a training run"))
    cfg = from_dict(TrainConfig, json.loads(config_file.read_text()))
    trainer = Trainer(cfg)
    latest = trainer.checkpointer.latest_step()
    if latest is None:
        _fail(FileNotFoundError(f"{run_dir}/checkpoints: no complete checkpoint"))
    if step is not None and step != latest:
        from cpo_jax.train.checkpoint import abstract_with_shardings

        if step not in trainer.checkpointer.manager.all_steps():
            _fail(FileNotFoundError(f"{run_dir}/checkpoints: no step {step}; have "
                                    f"{sorted(trainer.checkpointer.manager.all_steps())}"))
        trainer.state, _, _ = trainer.checkpointer.restore(
            step, abstract_with_shardings(trainer.state, trainer.state_shardings))
    else:
        trainer.restore_latest()
    typer.echo(f"wrote {trainer.export(dst)}")


@convert_app.command("hf-to-orbax")
def hf_to_orbax(src: str, dst: Path) -> None:
    """Save an HF model's parameters as an Orbax checkpoint (``DST/params``), with its config and tokenizer."""
    import shutil

    import orbax.checkpoint as ocp
    from flax import nnx

    from cpo_jax.hf.resolve import resolve_model_path
    from cpo_jax.models import from_pretrained

    try:
        path = resolve_model_path(src)
    except FileNotFoundError as err:
        _fail(err)
    if dst.exists():
        _fail(FileExistsError(f"{dst} exists; choose a new directory"))
    _, state = nnx.split(from_pretrained(path))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((dst / "params").absolute(), {"model": state})
    for file in path.iterdir():
        if file.suffix != ".safetensors" and file.name != "model.safetensors.index.json" and file.is_file():
            shutil.copy(file, dst / file.name)
    typer.echo(f"wrote {dst}")


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app(prog_name="cpo-jax")


if __name__ == "__main__":
    sys.exit(main())
