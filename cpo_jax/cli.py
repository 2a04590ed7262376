"""``cpo-jax``: train, eval, generate, audit and convert (typer for commands, OmegaConf for configs).

Configs are YAML files merged with ``key=value`` overrides (OmegaConf dot-lists), then loaded strictly
into :class:`cpo_jax.train.TrainConfig`: an unknown key, a wrong type, a missing path or an impossible mesh
is reported with the key's name before anything is compiled or downloaded. How overrides combine with the file
(replacing mappings, ``~key``, switching the loss in one override, TRL's names) is :mod:`cpo_jax.train.overrides`;
``cpo-jax train --help-config`` lists every key.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cpo_jax.errors import ConfigError, UserError, debug_requested, report_user_error

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0], pretty_exceptions_enable=False
)
convert_app = typer.Typer(no_args_is_help=True, help="Convert between HF directories and Orbax checkpoints.")
app.add_typer(convert_app, name="convert")

#: What ``cpo-jax plan`` puts in place of data files it never reads, when a config leaves them ``???``.
PLAN_DATA = "(not read by plan)"


def load_config(path: str | Path, overrides: list[str] | None = None, *, for_plan: bool = False):
    """YAML + ``key=value`` overrides -> a validated :class:`TrainConfig` (structure, value ranges, paths, mesh).

    ``for_plan``: the config of ``cpo-jax plan``, which reads only the model's ``config.json``: missing data files
    are allowed and the mesh is checked against the planned devices later.

    Every problem is a :class:`ConfigError` naming the file (and line) or the key."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.overrides import apply_overrides
    from cpo_jax.train.validate import validate_config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "the config file does not exist" if not path.exists() else "the config path is not a file",
            where=str(path),
            hint="give a YAML file, e.g. configs/tiny.yaml",
        )
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"not valid YAML: {getattr(err, 'problem', None) or err}", where=where) from None
    except (OmegaConfBaseException, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot be read as a config: {err}", where=str(path)) from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError("the config file must hold a mapping of keys (model:, data:, loss:, ...)", where=str(path))
    try:
        merged = OmegaConf.create(apply_overrides(OmegaConf.to_container(loaded), overrides, source=str(path)))
        if for_plan and "data.train_files" in OmegaConf.missing_keys(merged):
            merged = OmegaConf.merge(merged, OmegaConf.create({"data": {"train_files": [PLAN_DATA]}}))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                f"mandatory value(s) {missing} are '???' in the config",
                where=str(path),
                hint="supply them on the command line, e.g. " + " ".join(f"{k}=..." for k in missing),
            )
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).strip(), where=str(path)) from None
    try:
        cfg = from_dict(TrainConfig, data)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(str(err.args[0] if err.args else err), where=str(path)) from None
    validate_config(cfg)
    if for_plan:
        from cpo_jax.hf.resolve import resolve_model_path

        try:
            resolve_model_path(cfg.model.path)
        except UserError as err:
            raise ConfigError(
                f"{cfg.model.path!r}: {err.problem}",
                where="config key model.path",
                hint="plan reads only config.json: give a model directory, or one of configs/shapes/",
            ) from None
    else:
        _check_paths_and_mesh(cfg)
    return cfg


def _check_paths_and_mesh(cfg) -> None:
    import jax

    from cpo_jax.data.sources import is_bundled
    from cpo_jax.errors import UserFileNotFoundError
    from cpo_jax.hf.resolve import SMOLLM2, TINY, model_dir
    from cpo_jax.parallel import resolve_mesh_shape

    if cfg.model.path not in (SMOLLM2, TINY):
        try:
            model_dir(cfg.model.path)  # a directory, or a hub id in the local HF cache
        except UserFileNotFoundError as err:
            raise ConfigError(
                f"{cfg.model.path!r}: {err.problem}", where="config key model.path", hint=err.hint
            ) from None
    for key in ("train_files", "eval_files"):
        for file in getattr(cfg.data, key):
            if not is_bundled(file) and not Path(file).exists():
                raise ConfigError(
                    f"names {file!r}, which does not exist",
                    where=f"config key data.{key}",
                    hint="check the path (relative paths start from the current directory)",
                )
    resolve_mesh_shape(cfg.mesh, jax.device_count())


def _check_output_dir(path: Path) -> None:
    """``output_dir`` is (or can become) a writable directory: fail before the model loads, not after training."""
    if path.exists() and not path.is_dir():
        raise ConfigError(
            "exists and is not a directory",
            where=f"config key output_dir={str(path)!r}",
            hint="choose another output_dir",
        )
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            "is not writable",
            where=f"config key output_dir={str(path)!r}",
            hint="fix its permissions or choose another output_dir",
        )


def _restored_trainer(config: Path, overrides: list[str] | None, *, writes_output: bool = False):
    """``(cfg, trainer, step)``: a validated config, its Trainer, and the checkpoint step it restored (0: none)."""
    from cpo_jax.train.trainer import Trainer

    cfg = load_config(config, overrides)
    if writes_output:
        _check_output_dir(Path(cfg.output_dir))
    if cfg.loss.objective == "rlhf":
        from cpo_jax.rlhf.trainer import RLTrainer

        trainer = RLTrainer(cfg)
    else:
        trainer = Trainer(cfg)
    step, _ = trainer.restore_latest()
    return trainer.cfg, trainer, step  # trainer.cfg: with epochs, the steps computed from the train set


def _evaluate(trainer, cfg) -> dict:
    """Eval metrics, plus the greedy verifier's verdict per prompt (``generation/correct``, a list) when
    ``eval_generation_prompts`` is set, for the paired before/after comparison."""
    from cpo_jax.report import generation_accuracy
    from cpo_jax.train.stages import stage

    metrics = {}
    if trainer.eval_set is not None:
        with stage(f"evaluating on {len(trainer.eval_set.records)} held-out records"):
            metrics = trainer.evaluate(trainer.state.params)
    if cfg.eval_generation_prompts:
        with stage(f"greedy generation on {cfg.eval_generation_prompts}"):
            metrics.update(
                generation_accuracy(
                    trainer.policy(),
                    trainer.tokenizer,
                    cfg.eval_generation_prompts,
                    max_new_tokens=cfg.eval_generation_tokens,
                )
            )
    return metrics


def _scalars(metrics: dict) -> dict[str, float]:
    """The scalar metrics of ``metrics`` as floats (per-prompt lists left out)."""
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}


def _print_config_help(value: bool) -> None:
    if value:
        from cpo_jax.train.config_doc import render_text

        typer.echo(render_text(), nl=False)
        raise typer.Exit()


@app.command()
def train(
    config: Path,
    overrides: Annotated[list[str] | None, typer.Argument()] = None,
    distributed: Annotated[
        bool,
        typer.Option(
            help="join a multi-host run via JAX cluster detection (TPU pods, "
            "SLURM); CPO_JAX_COORDINATOR etc. also start one"
        ),
    ] = False,
    help_config: Annotated[
        bool,
        typer.Option(
            "--help-config",
            is_eager=True,
            expose_value=False,
            callback=lambda value: _print_config_help(value),
            help="list every config key with its type, default and meaning (docs/config.md), and exit",
        ),
    ] = False,
) -> None:
    """Train (DPO, CPO or any loss by name; SFT; reward model; RLOO/GRPO/PPO) from CONFIG.yaml with key=value
    overrides (--help-config lists the keys)."""
    from cpo_jax.experiments.stats import describe_change
    from cpo_jax.parallel import initialize
    from cpo_jax.report import (
        PREFERENCE_PANELS,
        RL_PANELS,
        describe_outputs,
        format_before_after,
        generation_change,
        plot_curves,
        read_before,
        write_before,
    )

    initialize(cluster_detection=distributed)  # before any other JAX call; a no-op for one process
    cfg, trainer, start = _restored_trainer(config, overrides, writes_output=True)
    import jax

    out = Path(cfg.output_dir)
    writes = jax.process_index() == 0  # on several hosts, process 0 writes the run's files
    if start:  # the loop says "resuming from step N of M"
        before = read_before(out)  # measured when the run started; a resume keeps it
    else:
        before = _evaluate(trainer, cfg)
        if writes:
            out.mkdir(parents=True, exist_ok=True)
            write_before(out, before)
            if before:  # the step-0 point of the eval curves
                with open(out / "metrics.jsonl", "w") as f:
                    f.write(json.dumps({"step": 0, **{f"eval/{k}": v for k, v in _scalars(before).items()}}) + "\n")
    result = trainer.run()
    after = _evaluate(trainer, cfg)
    if not writes:
        return
    generation = {f"eval/{k}": v for k, v in _scalars(after).items() if k.startswith("generation/")}
    if generation and (out / "metrics.jsonl").is_file():  # the end point of the generation-accuracy curve
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": result.final_step, **generation}) + "\n")
    if (out / "metrics.jsonl").is_file():
        panels = RL_PANELS if cfg.loss.objective == "rlhf" else PREFERENCE_PANELS
        plot_curves(out / "metrics.jsonl", out / "curves.png", panels=panels)
    summary = {"start_step": result.start_step, "final_step": result.final_step, "before": before, "after": after}
    change = generation_change(before, after)
    if change is not None:
        summary["generation/change"] = change
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(f"trained steps {result.start_step} -> {result.final_step} of {cfg.steps}")
    if before or after:
        typer.echo(format_before_after(before, after))
    if change is not None:
        typer.echo(describe_change(change))
    typer.echo(describe_outputs(out))


@app.command("eval")
def evaluate(config: Path, overrides: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    """Preference accuracy, the paper's diagnostics and (verifiable task) generation accuracy of a run's latest
    checkpoint, or of model.path when the run has none."""
    cfg, trainer, step = _restored_trainer(config, overrides)
    metrics = {"step": step, **_scalars(_evaluate(trainer, cfg))}
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

    from cpo_jax.data import BatchConfig, RecordTokenizer, TokenizeConfig
    from cpo_jax.data.batching import PROMPT_ONLY, BatchBuilder
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.hf.resolve import resolve_model_path
    from cpo_jax.hf.tokenizer import load_tokenizer
    from cpo_jax.models.generate import SamplingConfig
    from cpo_jax.models.generate import generate as run_generate

    _require_option(max_new_tokens >= 1, "--max-new-tokens", max_new_tokens, "must be >= 1")
    _require_option(temperature >= 0, "--temperature", temperature, "must be >= 0 (0: greedy)")
    _require_option(top_k >= 0, "--top-k", top_k, "must be >= 0 (0: off)")
    _require_option(0 < top_p <= 1, "--top-p", top_p, "must be in (0, 1]")
    _require_option(all(p.strip() for p in prompt), "--prompt", "", "must not be empty")
    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path)
    # The data pipeline's own prompt tokenisation and left-padded prompt batches.
    record_tokenizer = RecordTokenizer(tokenizer, TokenizeConfig())  # only prompt_ids is used: no limits apply
    encoded = [
        np.asarray(record_tokenizer.prompt_ids([{"role": "user", "content": p}] if chat else p), np.int32)
        for p in prompt
    ]
    pad = tokenizer.pad_token_id or 0
    builder = BatchBuilder(
        BatchConfig(pairs_per_batch=len(prompt), max_length=max(map(len, encoded)), pad_id=pad), PROMPT_ONLY
    )
    for i, ids in enumerate(encoded):
        builder.add({"prompt": ids, "index": i})
    batch = builder.build()
    out = run_generate(
        from_pretrained(path),
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        rng=jax.random.key(seed),
    )
    tokens, keep = np.asarray(out.tokens), np.asarray(out.mask)
    for p, row, m in zip(prompt, tokens, keep):
        typer.echo(
            json.dumps(
                {"prompt": p, "completion": tokenizer.decode(row[m > 0], skip_special_tokens=True)}, ensure_ascii=False
            )
        )


@app.command()
def audit(
    model: str,
    data: list[str],
    out: Path = Path("runs/audit"),
    max_length: int = 512,
    max_prompt_length: Annotated[
        int | None,
        typer.Option(
            help="prompt token limit; use the training config's data.max_prompt_length (default: max_length // 2)"
        ),
    ] = None,
    top_k: int = 20,
) -> None:
    """Before training: how often does the reference MODEL prefer the rejected answer on DATA (delta_ref < 0)?"""
    from cpo_jax.audit import audit_preferences, format_audit, write_audit
    from cpo_jax.hf.resolve import resolve_model_path

    _require_option(max_length >= 2, "--max-length", max_length, "must be >= 2")
    _require_option(
        max_prompt_length is None or 1 <= max_prompt_length < max_length,
        "--max-prompt-length",
        max_prompt_length,
        f"must be in [1, --max-length={max_length})",
    )
    _require_option(top_k >= 0, "--top-k", top_k, "must be >= 0")
    path = resolve_model_path(model)
    report = audit_preferences(path, data, max_length=max_length, max_prompt_length=max_prompt_length, top_k=top_k)
    files = write_audit(report, out)
    typer.echo(format_audit(report))
    typer.echo(f"report: {files['json']}  histogram: {files['png']}")


@app.command("plan")
def plan_memory(
    config: Path,
    overrides: Annotated[list[str] | None, typer.Argument()] = None,
    devices: Annotated[
        int | None,
        typer.Option(
            help="plan for this many devices (on a CPU they are simulated); default: the devices this process has"
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the plan as JSON")] = None,
) -> None:
    """Per-device memory of one train step of CONFIG (weights, optimiser, gradients, activations), compiled from
    model.path's config.json alone: no weights are read or allocated. configs/shapes/ holds Llama and Qwen shapes."""
    if devices is not None and devices < 1:
        raise ConfigError(f"--devices {devices} must be >= 1", where="command line")
    if devices is not None and "jax" not in sys.modules:  # CPU devices are simulated; set before JAX starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        ).strip()
    cfg = load_config(config, overrides, for_plan=True)
    import jax

    from cpo_jax.hf.pretrained import read_hf_config
    from cpo_jax.train.plan import markdown, plan, plan_dict

    available = jax.devices()
    count = devices or len(available)
    if count > len(available):
        raise ConfigError(
            f"--devices {count}, and this process has {len(available)} {jax.default_backend()} device(s)",
            where="command line",
            hint="plan for at most that many, or run cpo-jax plan in a fresh process",
        )
    from cpo_jax.hf.resolve import resolve_model_path

    result = plan(cfg, read_hf_config(resolve_model_path(cfg.model.path)), devices=available[:count])
    typer.echo(markdown([(Path(cfg.model.path).name, result)]))
    typer.echo(
        f"activations: compiled temporaries at {cfg.data.max_length} tokens minus those at 16 "
        f"({jax.default_backend()} compiler); total = the sum, an estimate of the peak per device"
    )
    if json_out is not None:
        json_out.write_text(json.dumps(plan_dict(result), indent=2))


@convert_app.command("orbax-to-hf")
def orbax_to_hf(
    run_dir: Path,
    dst: Path,
    step: Annotated[int | None, typer.Option(help="the checkpoint step to export (default: the newest)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace DST when it exists and is not empty")] = False,
    adapter_only: Annotated[
        bool, typer.Option(help="write a LoRA run's adapters in PEFT's format instead of the merged model")
    ] = False,
) -> None:
    """Export a training run's checkpoint (newest, or --step) as an HF directory with the tokenizer, or turn an
    Orbax model directory written by hf-to-orbax back into the HF directory it came from. RUN_DIR's own
    checkpoints/ are the only source (and, for a merged LoRA export, the base model.path); an existing non-empty DST
    is refused without --overwrite."""
    from cpo_jax.hf.orbax_dir import is_orbax_model_dir

    if is_orbax_model_dir(run_dir) and not (run_dir / "checkpoints").is_dir():
        from cpo_jax.hf.orbax_dir import orbax_to_hf as model_to_hf

        for option, given in (("--step", step is not None), ("--adapter-only", adapter_only)):
            _require_option(
                not given, option, True, f"is for training runs; {run_dir} is an Orbax model directory (hf-to-orbax)"
            )
        typer.echo(f"wrote {model_to_hf(run_dir, dst, overwrite=overwrite)}")
        return
    from cpo_jax.train.export import export_run

    typer.echo(f"wrote {export_run(run_dir, dst, step=step, overwrite=overwrite, adapter_only=adapter_only)}")


@convert_app.command("hf-to-orbax")
def hf_to_orbax(src: str, dst: Path) -> None:
    """Save an HF model (a directory, a hub id in the local HF cache, smollm2 or tiny-random) as an Orbax model
    directory: DST/params (the parameters, for fast sharded loading as model.path) with its config and tokenizer.
    convert orbax-to-hf DST HF_DIR gives the HF directory back."""
    from cpo_jax.hf.orbax_dir import hf_to_orbax as model_to_orbax

    typer.echo(f"wrote {model_to_orbax(src, dst)}")


def _require_option(ok: bool, option: str, value, must: str) -> None:
    if not ok:
        raise ConfigError(f"{value!r} {must}", where=f"option {option}")


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="show the Python traceback of an error (also CPO_JAX_DEBUG=1); accepted anywhere on the line",
        ),
    ] = False,
) -> None:
    """Commands; user errors end with a short message and exit status 2."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a caller may have replaced it since)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


#: The prefix of a stage line on stderr, ``[HH:MM:SS] ``; an error message follows any such lines.
STAGE_LINE_FORMAT = "[%(asctime)s] %(message)s"


def _show_stages() -> None:
    """Print the ``cpo_jax.stages`` lines (what a run is doing and how long each stage took) on stderr."""
    stages = logging.getLogger("cpo_jax.stages")
    if not stages.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(STAGE_LINE_FORMAT, "%H:%M:%S"))
        stages.addHandler(handler)
        stages.setLevel(logging.INFO)
        stages.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: runs a command and returns its exit status.

    User errors (:class:`cpo_jax.errors.UserError`, and OS errors on a named path) print ``error: ...`` in a few
    lines and return 2; ``--debug`` or ``CPO_JAX_DEBUG=1`` also prints the traceback. Other exceptions are bugs
    and propagate with their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, argv = debug_requested(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _show_stages()
    try:
        # click's standalone mode reports usage errors itself (status 2) and always ends in SystemExit;
        # get_command avoids typer's excepthook, which would print a traceback for every exception.
        typer.main.get_command(app)(args=argv, prog_name="cpo-jax", standalone_mode=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Exception as err:  # noqa: BLE001 - the one place where user errors become an exit status
        return report_user_error(err, debug, echo=lambda text: typer.secho(text, fg=typer.colors.RED, err=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
