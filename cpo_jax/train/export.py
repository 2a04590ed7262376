"""``cpo-jax convert orbax-to-hf``: a training run's checkpoint -> an HF directory, from the run directory alone.

The run directory is the only source of weights: its own ``checkpoints/`` (never the ``output_dir`` its
config names, which after a copy or a move is another run). The architecture and tokenizer come from the
run's ``model/`` folder (written at the start of every run), or, for runs written before it existed, from
its ``hf/`` export or the config's ``model.path``. Only the parameters are read from the checkpoint (an
Orbax partial restore), not the optimiser state, onto one device.

The destination is never silently replaced: an existing non-empty directory needs ``overwrite=True``,
and a destination that contains the run directory is always refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx

from cpo_jax.errors import CheckpointError, UserError, UserFileNotFoundError, first_line

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # config.json + tokenizer files of the policy, written into the run directory at start
LORA_SPEC = "lora.json"  # in MODEL_DIR: the adapters' settings, for adapter runs
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "generation_config.json",
)


def save_model_description(model_path: str | Path, run_dir: str | Path) -> Path:
    """Copy ``config.json`` and the tokenizer files (no weights) of ``model_path`` into ``run_dir/model``, so that
    the run can be exported without the original model directory. Returns that folder."""
    src, out = Path(model_path), Path(run_dir) / MODEL_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *_TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def _check_destination(run_dir: Path, dst: Path, overwrite: bool) -> None:
    run, out = run_dir.resolve(), dst.resolve()
    if out == run or out in run.parents:
        raise CheckpointError(
            "the destination contains the run directory; exporting there would replace the run",
            where=str(dst),
            hint="choose a destination outside the run, e.g. RUN_DIR/hf",
        )
    if dst.is_file():
        raise CheckpointError("the destination is a file", where=str(dst), hint="choose a directory path")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(
            "the destination exists and is not empty; its files would be replaced",
            where=str(dst),
            hint="choose a new directory, or pass --overwrite to replace it",
        )


def _model_description(run_dir: Path, cfg: dict) -> Path:
    for candidate in (run_dir / MODEL_DIR, run_dir / "hf"):
        if (candidate / "config.json").is_file():
            return candidate
    from cpo_jax.hf.resolve import resolve_model_path

    path = cfg.get("model", {}).get("path", "")
    try:
        found = resolve_model_path(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"the run has no {MODEL_DIR}/ or hf/ folder, and its model.path {path!r} is gone, so "
            f"the architecture and tokenizer are unknown",
            where=str(run_dir),
            hint="pass the original model directory as model.path in RUN_DIR/config.json",
        ) from None
    log.warning(
        "%s has no %s/ folder (written by runs from this version on): taking the architecture and "
        "tokenizer from model.path=%s",
        run_dir,
        MODEL_DIR,
        found,
    )
    return found


def _read_only_manager(directory: Path) -> ocp.CheckpointManager:
    """A manager that can only read: a conversion never changes the run it reads. (Orbax logs two warnings
    about read-only mode, which say nothing to a user: they are silenced here.)"""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return ocp.CheckpointManager(
            directory.absolute(),
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        )
    finally:
        absl_logging.set_verbosity(verbosity)


def _restore_params(manager: ocp.CheckpointManager, step: int, abstract_model_state) -> dict:
    """Only ``state.params`` of ``step``, on the first device: the model as ``abstract_model_state`` lays it out,
    and any head (reward ``head``, PPO ``value_head``) as the checkpoint stores it."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = manager.item_metadata(step)["state"]["params"]
    target = {
        key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), value)
        for key, value in saved.items()
        if key != "model"
    }
    target["model"] = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_model_state
    )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
            )
        ),
    )
    return out.state["params"]


def save_lora_spec(spec, run_dir: str | Path) -> Path:
    """Record the adapters' :class:`~cpo_jax.models.lora.LoraSpec` in ``run_dir/model/lora.json`` (the adapters of
    a checkpoint cannot be read without it, and an imported adapter's directory may be gone by export time)."""
    out = Path(run_dir) / MODEL_DIR / LORA_SPEC
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dataclasses.asdict(spec), indent=2))
    return out


def _lora_spec(description: Path):
    from cpo_jax.models.lora import LoraSpec

    file = description / LORA_SPEC
    if not file.is_file():
        return None
    saved = json.loads(file.read_text())
    targets = saved.get("targets")
    return LoraSpec(**{**saved, "targets": tuple(targets) if targets is not None else None})


class RunStep(NamedTuple):
    """What a checkpoint step holds, read without building a trainer."""

    graphdef: object
    params: dict
    description: Path
    config: dict
    lora_spec: object  # LoraSpec, or None for full fine-tuning
    frozen: object  # the abstract frozen base (adapter runs), or None


def _read_step(manager: ocp.CheckpointManager, run_dir: Path, step: int) -> RunStep:
    """Checkpoint ``step``: its parameters (only the adapters for an adapter run) and how to rebuild the model."""
    from cpo_jax.hf.pretrained import abstract_model, config_from_hf, read_hf_config

    cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    description = _model_description(run_dir, cfg)
    scan = bool(cfg.get("model", {}).get("scan_layers", False))
    arch = config_from_hf(read_hf_config(description), source=description / "config.json", scan_layers=scan)
    spec = _lora_spec(description)
    if spec is None:
        graphdef, abstract_state = nnx.split(abstract_model(arch))
        return RunStep(graphdef, _restore_params(manager, step, abstract_state), description, cfg, None, None)
    from cpo_jax.hf.peft import add_adapter
    from cpo_jax.models.transformer import Transformer

    model = nnx.eval_shape(lambda: add_adapter(Transformer(arch, rngs=nnx.Rngs(0)), spec, rngs=nnx.Rngs(1)))
    graphdef, abstract_lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    return RunStep(graphdef, _restore_params(manager, step, abstract_lora), description, cfg, spec, frozen)


def _merged_adapter_model(run: RunStep, run_dir: Path):
    """The base of ``model.path`` with the checkpoint's adapters merged into its kernels (for a QLoRA run, into the
    base quantised as in training and dequantised, which is what the adapters were trained on)."""
    from cpo_jax.hf.peft import add_adapter
    from cpo_jax.hf.pretrained import from_pretrained
    from cpo_jax.hf.resolve import resolve_model_path
    from cpo_jax.models.lora import merge_lora

    path = run.config.get("model", {}).get("path", "")
    try:
        base_path = resolve_model_path(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"the run trained adapters, and a merged export needs their base model.path {path!r}, which is gone",
            where=str(run_dir),
            hint="export the adapters alone with --adapter-only, or restore the base model directory",
        ) from None
    saved = run.config.get("model", {})
    model = from_pretrained(base_path, scan_layers=saved.get("scan_layers", False))
    add_adapter(model, run.lora_spec, rngs=nnx.Rngs(0))
    nnx.update(model, run.params["model"])
    if saved.get("quantize", "none") != "none":
        # The adapters were trained on the quantised base: merge into that (dequantised), as the run's own hf/ export.
        from cpo_jax.models.quantize import quantize_model

        quantize_model(model, saved["quantize"])
    return merge_lora(model)


def export_run(
    run_dir: str | Path,
    dst: str | Path,
    *,
    step: int | None = None,
    overwrite: bool = False,
    adapter_only: bool = False,
) -> Path:
    """Write checkpoint ``step`` (default: the newest intact one) of the run in ``run_dir`` as an HF directory.

    A reward run (``loss.objective: reward``) is written as ``*ForSequenceClassification``. An adapter run is
    written merged (``W + scale * A @ B``, which needs its base ``model.path``), or with ``adapter_only`` as a PEFT
    adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, from the run alone)."""
    from cpo_jax.hf.pretrained import save_pretrained
    from cpo_jax.hf.tokenizer import load_tokenizer

    run_dir, dst = Path(run_dir), Path(dst)
    if not (run_dir / "checkpoints").is_dir():
        raise UserFileNotFoundError(
            "no checkpoints/ folder: not the output_dir of a training run",
            where=str(run_dir),
            hint="give the output_dir of a run that saved a checkpoint",
        )
    _check_destination(run_dir, dst, overwrite)
    manager = _read_only_manager(run_dir / "checkpoints")
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(
            "no complete checkpoint",
            where=str(run_dir / "checkpoints"),
            hint="the run was stopped before its first save (save_every)",
        )
    if step is not None and step not in steps:
        raise CheckpointError(
            f"no checkpoint of step {step}; the kept steps are {steps}",
            where=str(run_dir / "checkpoints"),
            hint="pass one of them with --step",
        )
    candidates = [step] if step is not None else steps[::-1]  # by default the newest step that can be read
    try:
        for i, candidate in enumerate(candidates):
            try:
                run = _read_step(manager, run_dir, candidate)
                break
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - a step that cannot be read is damaged or foreign
                damaged = CheckpointError(
                    f"checkpoint step {candidate} cannot be read: {first_line(err, 300)}",
                    where=str(run_dir / "checkpoints" / str(candidate)),
                    hint=f"export another kept step with --step (kept: {steps})",
                )
                if i + 1 == len(candidates):
                    raise damaged from err
                log.warning("%s; exporting an older step", damaged)
    finally:
        manager.close()
    if adapter_only:
        if run.lora_spec is None:
            raise CheckpointError(
                "--adapter-only exports adapters, and this run fine-tuned every weight",
                where=str(run_dir),
                hint="leave out --adapter-only to export the whole model",
            )
        from cpo_jax.hf.peft import save_adapter

        return save_adapter(
            nnx.merge(run.graphdef, run.params["model"], run.frozen),
            run.lora_spec,
            dst,
            base_model_name_or_path=run.config.get("model", {}).get("path"),
        )
    if run.lora_spec is None:
        model = nnx.merge(run.graphdef, run.params["model"])
    else:
        model = _merged_adapter_model(run, run_dir)
    return save_pretrained(model, dst, tokenizer=load_tokenizer(run.description), score_head=run.params.get("head"))
