"""Building what a training stage needs from a `TrainingConfig`: data, models, losses, optimizers.

Nothing here knows about DDP or DeepSpeed (that is `engines.py`); every function returns plain modules and
objects, built identically on every rank (same seed, same files), so the EMAs start as exact copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..conversion import load_tokenizer_from_official_checkpoint
from ..models.configuration_gear_ar import GEARConfig
from ..models.configuration_gear_tokenizer import GEARTokenizerConfig
from ..models.modeling_gear_ar import GEARForCausalImageLM
from ..models.modeling_gear_tokenizer import GEARTokenizerModel
from ..text_encoder import TextConditioner, load_text_encoder
from . import checkpointing as ckpt
from .alignment import DINOv2Teacher, ProjectorBank, load_teacher
from .config import TrainingConfig
from .data import CAPTION_SOURCES, build_train_dataset, collate
from .losses import LPIPS, PatchGANDiscriminator, TokenizerLoss

logger = logging.getLogger(__name__)


class TrainingSetupError(ValueError):
    """Invalid configuration or inputs, detected before training starts (one clear message)."""


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class TrainingData:
    dataset: Any
    dataloader: torch.utils.data.DataLoader
    streaming: bool
    class_names: list[str] | None


def build_data(cfg: TrainingConfig, per_device_batch_size: int, rank: int, world_size: int) -> TrainingData:
    d = cfg.data
    try:
        dataset = build_train_dataset(
            d.source, d.path, d.image_size, split=d.split, random_flip=d.random_flip, seed=cfg.train.seed,
            max_samples=d.max_samples, rank=rank, world_size=world_size, shuffle_buffer_size=d.shuffle_buffer_size,
        )
    except FileNotFoundError as error:
        raise TrainingSetupError(f"No images found for data.source={d.source!r} at {d.path!r}: {error}") from error
    except ValueError as error:
        raise TrainingSetupError(str(error)) from error
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    if not streaming and len(dataset) < per_device_batch_size * world_size:
        raise TrainingSetupError(
            f"The dataset has {len(dataset)} images, fewer than one global micro-batch "
            f"({per_device_batch_size} × {world_size} processes)."
        )
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=per_device_batch_size, shuffle=not streaming, drop_last=True,
        collate_fn=collate, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
        # Its own generator: a DataLoader iterator otherwise draws its worker base seed from the GLOBAL torch
        # RNG, so a resumed run (which re-creates the iterator mid-epoch) would shift the dropout RNG stream.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    return TrainingData(dataset, dataloader, streaming, getattr(dataset, "class_names", None))


# -------------------------------------------------------------------------------------------------------- models
@dataclass
class TrainingModels:
    """The modules of a stage; None where the stage has no such module."""

    tokenizer: nn.Module
    tokenizer_ema_init: nn.Module | None  # stage 1 from stage 0: the warm-up tokenizer EMA to continue
    ar: nn.Module | None
    projector: nn.Module | None
    teacher: nn.Module | None
    discriminator: nn.Module | None
    tokenizer_loss: nn.Module | None
    signature: dict[str, Any]  # what a checkpoint must match to be resumed by this run
    text_conditioner: TextConditioner | None = None  # text-to-image: the frozen text encoder


def _load_safetensors_into(module: nn.Module, path: Path, what: str) -> None:
    if not path.is_file():
        raise TrainingSetupError(f"train.init_from: {what} weights not found at {path}.")
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise TrainingSetupError(
            f"train.init_from: {what} weights at {path} do not fit the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})."
        )


def _require_dir(path: Path, what: str, hint: str = "") -> Path:
    if not (path / "config.json").is_file():
        raise TrainingSetupError(f"train.init_from: no {what} at {path} (expected a from_pretrained directory).{hint}")
    return path


def build_tokenizer(cfg: TrainingConfig) -> tuple[GEARTokenizerModel, GEARTokenizerModel | None]:
    """The tokenizer of the stage and, for stage 1 from stage 0, the warm-up EMA to continue from."""
    t, stage = cfg.tokenizer, cfg.train.stage
    init = Path(cfg.train.init_from) if cfg.train.init_from else None
    if init is not None and stage in (1, 2):
        ema_dir = _require_dir(init / "tokenizer", "tokenizer (EMA)")
        if stage == 1:
            live = GEARTokenizerModel.from_pretrained(
                _require_dir(init / "raw" / "tokenizer", "live tokenizer"), dtype=torch.float32)
            return live, GEARTokenizerModel.from_pretrained(ema_dir, dtype=torch.float32)
        source = ema_dir if t.use_ema else _require_dir(init / "raw" / "tokenizer", "live tokenizer")
        return GEARTokenizerModel.from_pretrained(source, dtype=torch.float32), None
    if t.pretrained:
        path = Path(t.pretrained)
        if path.is_file():  # official .pt / .ckpt / .safetensors file
            config = (GEARTokenizerConfig.from_preset(t.preset, **t.config) if t.preset
                      else GEARTokenizerConfig(**t.config))
            model, _ = load_tokenizer_from_official_checkpoint(path, config, use_ema=t.use_ema)
            return model, None
        return GEARTokenizerModel.from_pretrained(t.pretrained, dtype=torch.float32), None
    if not t.preset and not t.config:
        raise TrainingSetupError("Give tokenizer.pretrained, tokenizer.preset or tokenizer.config "
                                 "(or train.init_from for stages 1-2).")
    config = GEARTokenizerConfig.from_preset(t.preset, **t.config) if t.preset else GEARTokenizerConfig(**t.config)
    return GEARTokenizerModel(config), None


def is_text_to_image(cfg: TrainingConfig) -> bool:
    """Captioned data trains a text-conditional AR; class-labelled data a class-conditional one."""
    return cfg.data.source in CAPTION_SOURCES


def build_text_conditioner(cfg: TrainingConfig) -> TextConditioner:
    t = cfg.text_encoder
    if not t.name_or_path:
        raise TrainingSetupError("text_encoder.name_or_path is not set: give the text encoder's Hub id or local "
                                 "directory (e.g. Qwen/Qwen3-1.7B).")
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[t.dtype]
    try:
        tokenizer, encoder = load_text_encoder(t.name_or_path, dtype=dtype)
    except OSError as error:
        raise TrainingSetupError(f"text_encoder.name_or_path: {error}") from error
    text_length = cfg.ar.config.get("text_length", GEARConfig.text_length)
    if cfg.ar.pretrained:
        text_length = GEARConfig.from_pretrained(cfg.ar.pretrained).text_length
    return TextConditioner(tokenizer, encoder, max_length=text_length, caption_dropout=t.caption_dropout)


def ar_config_for(cfg: TrainingConfig, tokenizer: GEARTokenizerModel, class_names: list[str] | None,
                  text_conditioner: TextConditioner | None = None) -> GEARConfig:
    """The AR config: preset/config overrides, with vocabulary, image size and stride derived from the tokenizer
    and the condition from the data (classes, or the text encoder's width)."""
    a, tc = cfg.ar, tokenizer.config
    derived = {"vocab_size": tc.codebook_size, "image_size": cfg.data.image_size,
               "downsample_factor": tc.downsample_factor,
               "condition_type": "text" if text_conditioner is not None else "class"}
    if text_conditioner is not None:
        derived["caption_dim"] = text_conditioner.hidden_size
    elif class_names:
        derived["num_classes"] = len(class_names)
    if a.pretrained:
        config = GEARConfig.from_pretrained(a.pretrained)
    else:
        overrides = {**derived, **a.config}
        config = GEARConfig.from_preset(a.preset, **overrides) if a.preset else GEARConfig(**overrides)
    for key in ("vocab_size", "image_size", "downsample_factor", "condition_type", "caption_dim"):
        if key in derived and getattr(config, key) != derived[key]:
            raise TrainingSetupError(
                f"ar.{key}={getattr(config, key)} does not match the tokenizer / data / text encoder "
                f"({key}={derived[key]}). Leave it unset so it is derived, or fix the other side."
            )
    if text_conditioner is None and class_names and config.num_classes < len(class_names):
        raise TrainingSetupError(f"The dataset has {len(class_names)} classes but the AR only "
                                 f"num_classes={config.num_classes}.")
    return config


def build_ar(cfg: TrainingConfig, ar_config: GEARConfig) -> GEARForCausalImageLM:
    if cfg.train.stage == 2 and cfg.train.init_from and cfg.train.init_ar_from_previous:
        path = _require_dir(Path(cfg.train.init_from) / "ar", "AR (EMA)",
                            " Set train.init_ar_from_previous=false to train the AR from scratch.")
        ar = GEARForCausalImageLM.from_pretrained(path, dtype=torch.float32)
        if (ar.config.vocab_size, ar.config.num_image_tokens, ar.config.condition_type) != (
                ar_config.vocab_size, ar_config.num_image_tokens, ar_config.condition_type):
            raise TrainingSetupError(f"The AR at {path} does not fit the tokenizer/data (vocab "
                                     f"{ar.config.vocab_size}, {ar.config.num_image_tokens} tokens, "
                                     f"{ar.config.condition_type}-conditional). Set train.init_ar_from_previous=false "
                                     "to train a fresh AR.")
        return ar
    if cfg.ar.pretrained:
        return GEARForCausalImageLM.from_pretrained(cfg.ar.pretrained, dtype=torch.float32)
    return GEARForCausalImageLM(ar_config)


def build_teacher(cfg: TrainingConfig, grid_size: int) -> nn.Module:
    t = cfg.teacher
    if t.random_init:
        from transformers import Dinov2Config, Dinov2Model

        teacher = DINOv2Teacher(Dinov2Model(Dinov2Config(**t.config)).eval(), grid_size)
    else:
        try:
            teacher = load_teacher(t.name, t.path, grid_size, t.layer)
        except OSError as error:
            raise TrainingSetupError(
                f"Cannot load the REPA teacher {t.name!r} from {t.path!r} (nothing is downloaded: give a local "
                f"directory / file, or pre-populate the Hub cache): {error}"
            ) from error
    # Fail now (not at step 1) when the teacher's patch grid is not the token grid.
    size = cfg.data.image_size
    try:
        with torch.no_grad():
            teacher(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    except ValueError as error:
        raise TrainingSetupError(f"REPA teacher/token grid mismatch: {error}") from error
    return teacher


def build_tokenizer_losses(cfg: TrainingConfig, tokenizer: GEARTokenizerModel, num_processes: int):
    """(tokenizer loss, discriminator or None) of stages 0 and 1."""
    lp = cfg.loss
    lpips = None
    if lp.lpips_weight > 0:
        try:
            lpips = LPIPS(backbone_path=lp.lpips_backbone, random_backbone=lp.lpips_random_backbone)
        except FileNotFoundError as error:
            raise TrainingSetupError(str(error)) from error
    tokenizer_loss = TokenizerLoss(l1_weight=lp.l1_weight, lpips_weight=lp.lpips_weight,
                                   quantizer_weight=lp.quantizer_weight, gan_weight=lp.gan_weight,
                                   discriminator_start=lp.discriminator_start, lpips=lpips)
    discriminator = None
    if lp.gan_weight > 0:
        discriminator = PatchGANDiscriminator(tokenizer.config.num_channels, lp.discriminator_channels,
                                              lp.discriminator_layers)
        if cfg.train.stage == 1 and cfg.train.init_from:
            _load_safetensors_into(discriminator, Path(cfg.train.init_from) / "raw" / "discriminator.safetensors",
                                   "discriminator")
        if num_processes > 1 and torch.cuda.is_available():
            discriminator = discriminator.to_sync_batchnorm()
    return tokenizer_loss, discriminator


def build_models(cfg: TrainingConfig, class_names: list[str] | None, num_processes: int) -> TrainingModels:
    stage = cfg.train.stage
    tokenizer, tokenizer_ema_init = build_tokenizer(cfg)
    factor = tokenizer.config.downsample_factor
    if cfg.data.image_size % factor:
        raise TrainingSetupError(
            f"data.image_size={cfg.data.image_size} is not divisible by the tokenizer's downsample factor {factor}; "
            f"use a multiple of {factor}, e.g. {max(1, round(cfg.data.image_size / factor)) * factor}."
        )
    grid_size = cfg.data.image_size // factor

    ar = ar_config = text_conditioner = None
    if stage in (1, 2):
        text_conditioner = build_text_conditioner(cfg) if is_text_to_image(cfg) else None
        ar_config = ar_config_for(cfg, tokenizer, class_names, text_conditioner)
        n_layer = ar_config.num_hidden_layers
        if (stage == 1 or cfg.gear.use_repa) and not 1 <= cfg.gear.align_layer <= n_layer:
            raise TrainingSetupError(
                f"gear.align_layer (ℓ) = {cfg.gear.align_layer} must be in [1, {n_layer}] "
                f"(1-based block index of the {n_layer}-layer AR)."
            )
        ar = build_ar(cfg, ar_config)

    teacher = projector = None
    if stage == 1 or (stage == 2 and cfg.gear.use_repa):
        teacher = build_teacher(cfg, grid_size)
        projector = ProjectorBank(ar.config.hidden_size, [teacher.hidden_size], cfg.gear.projector_dim)
        if stage == 2 and cfg.train.init_from and cfg.train.init_ar_from_previous:
            raw = Path(cfg.train.init_from) / "raw" / "projector.safetensors"
            if raw.is_file():
                _load_safetensors_into(projector, raw, "projector")
            else:
                logger.warning("train.init_from has no raw/projector.safetensors: the projector starts fresh.")

    tokenizer_loss = discriminator = None
    if stage in (0, 1):
        tokenizer_loss, discriminator = build_tokenizer_losses(cfg, tokenizer, num_processes)
    else:  # stage 2: the tokenizer is frozen (eval, no grad), never prepared or saved in checkpoints
        tokenizer.eval().requires_grad_(False)
        tokenizer.check_input_range = False  # inputs come from uint8; skip the per-step host sync

    signature = ckpt.structural_signature(cfg, tokenizer.config, ar_config,
                                          {"teacher.hidden_size": getattr(teacher, "hidden_size", None)})
    return TrainingModels(tokenizer, tokenizer_ema_init, ar, projector, teacher, discriminator, tokenizer_loss,
                          signature, text_conditioner)


# -------------------------------------------------------------------------------------------------- optimization
@dataclass
class TrainingOptimization:
    opt_tok: torch.optim.Optimizer | None
    opt_ar: torch.optim.Optimizer | None
    opt_disc: torch.optim.Optimizer | None
    sched_tok: Any
    sched_ar: Any
    sched_disc: Any


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor = step / warmup for step < warmup, then 1 (official: warm-up 1 ⇒ the first update runs at lr 0)."""

    def factor(step: int) -> float:
        return step / warmup_steps if step < warmup_steps else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw(params, lr: float, cfg: TrainingConfig) -> torch.optim.AdamW:
    o = cfg.optim
    # foreach: one multi-tensor kernel per step (torch only picks it by default for CUDA tensors).
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(o.betas),
                             weight_decay=o.weight_decay, eps=o.eps, foreach=True)


def build_optimization(cfg: TrainingConfig, models: TrainingModels, scheduler_steps_per_update: int
                       ) -> TrainingOptimization:
    """Three AdamW (tokenizer, AR + projector, discriminator) with warm-up-then-constant schedules.

    `scheduler_steps_per_update`: how often the scheduler is stepped per optimizer update (accelerate's prepared
    schedulers step once per process; DeepSpeed engines once)."""
    stage, o = cfg.train.stage, cfg.optim
    warmup = max(0, o.warmup_steps) * scheduler_steps_per_update
    opt_tok = opt_ar = opt_disc = None
    if stage in (0, 1):
        opt_tok = adamw(models.tokenizer.parameters(), o.tokenizer_lr, cfg)
    if stage in (1, 2):
        params = list(models.ar.parameters()) + (list(models.projector.parameters()) if models.projector else [])
        opt_ar = adamw(params, o.ar_lr, cfg)
    if models.discriminator is not None:
        opt_disc = adamw(models.discriminator.parameters(), o.discriminator_lr, cfg)
    return TrainingOptimization(
        opt_tok, opt_ar, opt_disc,
        constant_with_warmup(opt_tok, warmup) if opt_tok else None,
        constant_with_warmup(opt_ar, warmup) if opt_ar else None,
        constant_with_warmup(opt_disc, warmup) if opt_disc else None,
    )


__all__ = [
    "TrainingSetupError",
    "TrainingData",
    "TrainingModels",
    "TrainingOptimization",
    "build_data",
    "build_models",
    "build_optimization",
    "build_tokenizer",
    "build_ar",
    "build_teacher",
    "ar_config_for",
    "build_text_conditioner",
    "is_text_to_image",
    "adamw",
    "constant_with_warmup",
]
