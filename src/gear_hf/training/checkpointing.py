"""What a training run writes to disk: atomic, resumable checkpoints (on top of `accelerator.save_state`), the
resume logic, and the final `from_pretrained` exports.

Layout under `<output_dir>/checkpoints/`:

    step_00001000/            a complete checkpoint (written as .tmp-step_00001000, then renamed)
        model*.safetensors, optimizer*.bin, scheduler*.bin, random_states_<rank>.pkl,
        custom_checkpoint_<i>.pkl (EMAs), sampler.bin, training_state.json  (written last)
    .tmp-step_00002000/       a save that was interrupted: ignored by `latest`, deleted by the next save

A checkpoint only counts when its directory name is `step_<8+ digits>` and it holds `training_state.json`; a
kill during a save can therefore never damage or replace the previous checkpoint. Old checkpoints are first
renamed to `.trash-…` and only then deleted, so a kill during pruning never leaves a half-deleted checkpoint
that looks complete.

Exports (`export_models`, at the end of a run):

    <output_dir>/tokenizer/   tokenizer EMA weights (stage 2: the frozen tokenizer it trained on)
    <output_dir>/ar/          AR EMA weights (stages 1, 2)
    <output_dir>/pipeline/    a ready `GEARPipeline` (stages 1, 2)
    <output_dir>/raw/         live weights for the next stage: tokenizer/, ar/ (from_pretrained dirs),
                              discriminator.safetensors, projector.safetensors
    <output_dir>/export.json  what was written, at which step
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..pipelines import GEARPipeline
from .gear_step import unwrap

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
FORMAT_VERSION = 1


class CheckpointCompatibilityError(ValueError):
    """A checkpoint was written by a run whose models/stage differ from the current configuration."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (the `checkpoints/` directory), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume_path(spec: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`None` → no resume; `"latest"` → newest complete checkpoint of `output_dir` (None if there is none);
    otherwise a checkpoint directory (or a run's output dir / checkpoints dir, whose latest is taken)."""
    if spec is None or spec == "":
        return None
    if spec == "latest":
        return latest_checkpoint(Path(output_dir) / CHECKPOINT_DIR)
    path = Path(spec)
    if (path / STATE_FILE).is_file():
        return path
    for candidate in (path, path / CHECKPOINT_DIR):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"resume_from_checkpoint={spec!r} is not a complete checkpoint (no {STATE_FILE}) and contains none. "
        "Pass 'latest', a checkpoints/step_XXXXXXXX directory, or a run's output directory."
    )


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    with open(Path(path) / STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_tree(path: Path) -> None:
    """Rename to a trash name first (atomic), then delete."""
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial_saves(root: Path) -> None:
    """Delete leftovers of interrupted saves / prunes (main process only)."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    accelerator,
    root: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    total_limit: int | None = None,
    extra_accelerators: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint for optimizer step `step` atomically; collective (call on every rank).

    `state` (step, data position, config …) goes to `training_state.json`, written after everything else.
    `extra_accelerators` (DeepSpeed: one accelerator per engine) are saved into sub-directories by name.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        clean_partial_saves(root)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    for name, extra in (extra_accelerators or {}).items():
        extra.save_state(str(tmp / name), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / STATE_FILE, {**state, "format_version": FORMAT_VERSION})
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a resume)
            _remove_tree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        if total_limit is not None and total_limit > 0:
            for _, old in list_checkpoints(root)[:-total_limit]:
                _remove_tree(old)
    accelerator.wait_for_everyone()
    return final


# Keys of the resolved model configurations that determine parameter shapes / which states exist.
_TOKENIZER_KEYS = ("quantizer", "codebook_size", "codebook_embed_dim", "num_channels", "base_channels",
                   "channel_multipliers", "num_res_blocks", "z_channels", "attention_levels")
_AR_KEYS = ("condition_type", "vocab_size", "num_classes", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "image_size", "downsample_factor", "cls_token_num")
_TEXT_AR_KEYS = ("caption_dim", "text_length", "text_attention", "num_double_stream_layers")  # text-conditional only
# Keys added after checkpoints were first written: absent from an older signature means this value.
_SIGNATURE_DEFAULTS = {"ar.condition_type": "class", "train.fsdp": False}


def structural_signature(cfg, tokenizer_config=None, ar_config=None, extra: dict | None = None) -> dict[str, Any]:
    """What must match between a checkpoint and the run resuming it (shapes, which modules/optimizers exist)."""
    signature: dict[str, Any] = {
        "train.stage": cfg.train.stage,
        "train.deepspeed": cfg.train.deepspeed_config is not None,
        "train.fsdp": bool(cfg.train.fsdp),
        "data.image_size": cfg.data.image_size,
        "gear.projector_dim": cfg.gear.projector_dim,
        "teacher.name": cfg.teacher.name,
        "loss.discriminator": (cfg.loss.gan_weight > 0, cfg.loss.discriminator_channels,
                               cfg.loss.discriminator_layers),
    }
    if cfg.train.stage == 2:
        signature["gear.use_repa"] = cfg.gear.use_repa
    if tokenizer_config is not None:
        for key in _TOKENIZER_KEYS:
            signature[f"tokenizer.{key}"] = getattr(tokenizer_config, key, None)
    if ar_config is not None:
        signature["ar.null_class"] = ar_config.class_dropout_prob > 0
        keys = _AR_KEYS + (_TEXT_AR_KEYS if getattr(ar_config, "condition_type", "class") == "text" else ())
        for key in keys:
            signature[f"ar.{key}"] = getattr(ar_config, key, None)
    signature.update(extra or {})
    return json.loads(json.dumps(signature, default=str))  # normalise tuples → lists like the stored JSON


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise one `CheckpointCompatibilityError` listing every structural difference. A key the current run records
    but an older checkpoint lacks counts as its documented default (`_SIGNATURE_DEFAULTS`); the text-conditional
    keys count only for text-conditional ARs."""
    saved = {**{key: value for key, value in _SIGNATURE_DEFAULTS.items() if key in current}, **saved}
    if saved.get("ar.condition_type") != "text":  # text keys once recorded for class-conditional ARs too
        saved = {key: value for key, value in saved.items() if key.removeprefix("ar.") not in _TEXT_AR_KEYS}
    diffs = [
        f"  {key}: checkpoint={saved.get(key, '<absent>')!r}, current={current.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key, "<absent>") != current.get(key, "<absent>")
    ]
    if diffs:
        raise CheckpointCompatibilityError(
            f"Cannot resume from {path}: it was written with a different configuration:\n" + "\n".join(diffs)
            + "\nResume with the configuration that wrote it, or start a new run (new train.output_dir, or "
            "train.init_from=<previous run> to reuse its weights only)."
        )


# ------------------------------------------------------------------------------------------------------ resume
def resume_training(accelerator, spec: str | None, output_dir: str | os.PathLike, signature: dict[str, Any],
                    extra_accelerators: dict[str, Any] | None = None) -> tuple[Path | None, dict[str, Any]]:
    """Load the checkpoint `spec` names (`latest` or a path) into `accelerator` (and the per-engine accelerators).

    Returns `(path, state)`: the checkpoint used and its `training_state.json`, or `(None, {})` for a fresh start.
    Raises `CheckpointCompatibilityError` when it was written by a structurally different run."""
    path = resolve_resume_path(spec, output_dir)
    if path is None:
        if spec == "latest":
            logger.info("resume_from_checkpoint=latest: no checkpoint in %s, starting fresh.",
                        Path(output_dir) / CHECKPOINT_DIR)
        return None, {}
    state = read_state(path)
    check_compatible(state.get("signature", {}), signature, path)
    if state.get("num_processes") != accelerator.num_processes:
        logger.warning("Checkpoint %s was written by %s processes, resuming with %s: the data order and RNG "
                       "streams will differ from an uninterrupted run.", path, state.get("num_processes"),
                       accelerator.num_processes)
    accelerator.load_state(str(path))
    for name, extra in (extra_accelerators or {}).items():
        extra.load_state(str(path / name))
    return path, state


# ------------------------------------------------------------------------------------------------------ exports
def export_models(output_dir: str | os.PathLike, *, stage: int, global_step: int, tokenizer, tokenizer_ema, ar,
                  ar_ema, projector, discriminator, class_names=None, export_pipeline: bool = True,
                  text_conditioner=None) -> dict[str, str]:
    """Write the `from_pretrained` directories (EMA weights), the live weights for the next stage and
    `export.json` (main process only; the caller gathers partitioned parameters first). Returns {name: path}."""
    out = Path(output_dir)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    tokenizer_final = tokenizer_ema.model if tokenizer_ema is not None else unwrap(tokenizer)
    tokenizer_final.save_pretrained(out / "tokenizer")
    written["tokenizer"] = str(out / "tokenizer")
    if stage in (0, 1):
        unwrap(tokenizer).save_pretrained(raw / "tokenizer")
    if ar_ema is not None:
        ar_ema.model.save_pretrained(out / "ar")
        unwrap(ar).save_pretrained(raw / "ar")
        written["ar"] = str(out / "ar")
    for name, module in (("discriminator", discriminator), ("projector", projector)):
        if module is not None:
            save_file({k: v.contiguous() for k, v in unwrap(module).state_dict().items()},
                      str(raw / f"{name}.safetensors"))
    if ar_ema is not None and export_pipeline:
        text = {}
        if text_conditioner is not None:
            text = {"text_encoder": text_conditioner.text_encoder, "tokenizer": text_conditioner.tokenizer}
        id2label = dict(enumerate(class_names)) if class_names and not text else None
        GEARPipeline(vq_model=tokenizer_final, transformer=ar_ema.model, id2label=id2label, **text).save_pretrained(
            out / "pipeline")
        written["pipeline"] = str(out / "pipeline")
    _write_json(out / "export.json", {"global_step": global_step, "stage": stage, **written})
    return written
