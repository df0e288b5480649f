"""The accelerate training loop for GEAR stages 0, 1 and 2.

    stage 0  tokenizer warm-up          tokenizer (+EMA) + discriminator          `gear_step.tokenizer_step`
    stage 1  GEAR joint training        tokenizer (+EMA) + discriminator + AR (+EMA) + projector, teacher
                                                                                   `gear_step.gear_step`
    stage 2  AR on a frozen tokenizer   AR (+EMA) + projector, teacher             `gear_step.ar_step`

`GEARTrainer(cfg).train()` builds everything from a `TrainingConfig` (see `configs/`), runs the loop and exports
`from_pretrained` directories at the end:

    <output_dir>/tokenizer/   tokenizer EMA weights (stage 2: the frozen tokenizer it trained on)
    <output_dir>/ar/          AR EMA weights (stages 1, 2)
    <output_dir>/pipeline/    a ready `GEARPipeline` (stages 1, 2)
    <output_dir>/raw/         live weights for the next stage: tokenizer/, ar/ (from_pretrained dirs),
                              discriminator.safetensors, projector.safetensors
    <output_dir>/checkpoints/step_XXXXXXXX/   resumable training states (see `checkpointing.py`)
    <output_dir>/logs/        TensorBoard;  <output_dir>/samples/  PNG grids

`train.init_from=<output_dir of the previous stage>` chains the stages like the official scripts: stage 1 takes
the stage-0 tokenizer, tokenizer EMA and discriminator; stage 2 takes the stage-1 tokenizer EMA (frozen) and, with
`train.init_ar_from_previous`, the AR EMA and the projector (optimizer states are never carried over).

Batch semantics: `train.train_batch_size` is the GLOBAL batch (official 256); per device it is
global / (processes × gradient_accumulation_steps), which must divide exactly. Both are logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import checkpointing as ckpt
from .config import TrainingConfig
from .gear_step import GEARModules, ModuleUpdate, ar_step, gear_step, tokenizer_step, unwrap

logger = logging.getLogger(__name__)

STEP_FUNCTIONS = {0: tokenizer_step, 1: gear_step, 2: ar_step}


class TrainingSetupError(ValueError):
    """Invalid configuration or inputs, detected before training starts (one clear message)."""


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------


def _flat_config(cfg: TrainingConfig) -> dict[str, Any]:
    """Flattened `section.key` → scalar config for trackers (TensorBoard hparams need scalars)."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if value is None or isinstance(value, (list, tuple, dict)):
                value = json.dumps(value, default=str)
            flat[f"{section}.{key}"] = value
    return flat


def _constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor = step / warmup for step < warmup, then 1 (official: warm-up 1 ⇒ the first update runs at lr 0)."""

    def factor(step: int) -> float:
        return step / warmup_steps if step < warmup_steps else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _adamw(params, lr: float, cfg: TrainingConfig) -> torch.optim.AdamW:
    o = cfg.optim
    # foreach: one multi-tensor kernel per step (torch only picks it by default for CUDA tensors).
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(o.betas),
                             weight_decay=o.weight_decay, eps=o.eps, foreach=True)


def _load_safetensors_into(module: nn.Module, path: Path, what: str) -> None:
    from safetensors.torch import load_file

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


class _ARWithProjector(nn.Module):
    """AR + projector as one module: DeepSpeed needs one engine per optimizer (they share `opt_ar`)."""

    def __init__(self, ar: nn.Module, projector: nn.Module):
        super().__init__()
        self.ar = ar
        self.projector = projector

    def forward(self, *args, **kwargs):
        return self.ar(*args, **kwargs)


def _unset_hf_deepspeed_config() -> None:
    """Accelerate registers the selected DeepSpeed config with transformers (a global weakref). Under ZeRO-3 that
    makes `from_pretrained` build models inside `deepspeed.zero.Init` (partitioned while loading) and switches other
    transformers code paths; the trainer instead builds whole models on every rank (the EMAs start as exact copies)
    and `deepspeed.initialize` partitions them."""
    try:
        from transformers.integrations import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def _register_zero3_embedding_tables(root: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters only around that module's own forward and backward. GEAR reads
    embedding tables outside the `nn.Embedding`'s forward (the AR's soft read-out `π @ tok_embeddings.weight`, the
    VQ/IBQ codebook distances in the quantizer), so every `nn.Embedding` weight becomes an external parameter of
    the engine's root module: gathered while the root runs, forward and backward. (Not of the direct parent: the
    quantizer returns a dataclass, whose tensors ZeRO-3 cannot see, so its pre-backward hook would never re-gather
    the codebook; the roots return `ModelOutput`s, which ZeRO-3 handles.)"""
    import deepspeed

    for module in root.modules():
        if isinstance(module, nn.Embedding):
            deepspeed.zero.register_external_parameter(root, module.weight)


class _EngineEMA:
    """DeepSpeed: the EMA of one engine's bare module (`source`). `update()` reads the full live parameters (ZeRO-3:
    gathered on every rank for the update, re-partitioned after) of `source`, whatever module the step passes (the
    AR engine's module is `_ARWithProjector`, the EMA tracks the bare AR). Everything else (`model`, `state_dict`,
    `load_state_dict`, `to`, ...) is the wrapped EMA's."""

    def __init__(self, ema, source: nn.Module, full_parameters):
        self.ema, self.source, self._full_parameters = ema, source, full_parameters

    def update(self, model: nn.Module | None = None) -> None:
        with self._full_parameters(self.source):
            self.ema.update(self.source)

    def __getattr__(self, name):
        if name == "ema":  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.ema, name)


class _StopRequest:
    """SIGTERM/SIGINT → save a checkpoint at the next step boundary and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM,):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        logger.warning("Received signal %s: saving a checkpoint at the next step boundary, then exiting.", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class GEARTrainer:
    """Builds accelerator, models, losses, optimizers, data from a `TrainingConfig`; `train()` runs the loop."""

    def __init__(self, cfg: TrainingConfig):
        cfg.validate()
        if cfg.train.stage not in (0, 1, 2):
            raise TrainingSetupError(f"train.stage must be 0, 1 or 2, got {cfg.train.stage!r}.")
        self.cfg = cfg
        self.stage = cfg.train.stage
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoint_root = self.output_dir / ckpt.CHECKPOINT_DIR
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches each process consumed in the current epoch
        self._built = False

    # ----------------------------------------------------------------------------------------------- build
    def build(self) -> GEARTrainer:
        if self._built:
            return self
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.accelerator = self._build_accelerator()
        acc = self.accelerator
        n_proc, accum = acc.num_processes, cfg.train.gradient_accumulation_steps
        if cfg.train.train_batch_size % (n_proc * accum):
            raise TrainingSetupError(
                f"train.train_batch_size={cfg.train.train_batch_size} is the GLOBAL batch; it must be divisible by "
                f"processes ({n_proc}) × gradient_accumulation_steps ({accum})."
            )
        self.per_device_batch_size = cfg.train.train_batch_size // (n_proc * accum)
        if cfg.train.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Same seed on every rank for construction (identical initial weights and data order), per-rank after.
        set_seed(cfg.train.seed)
        self._build_data()
        self._build_models()
        self._build_optimization()
        self._prepare()
        set_seed(cfg.train.seed, device_specific=True)  # official: seed + rank (dropout, class dropout)
        self._built = True
        return self

    def _build_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import (
            DataLoaderConfiguration,
            DistributedDataParallelKwargs,
            InitProcessGroupKwargs,
            ProjectConfiguration,
        )

        cfg = self.cfg
        no_cuda = not torch.cuda.is_available()
        if cfg.train.deepspeed_config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            # `accelerate launch --config_file configs/accelerate/deepspeed_zero*.yaml`: take its json.
            cfg.train.deepspeed_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
        use_deepspeed = cfg.train.deepspeed_config is not None
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if no_cuda and (world > 1 or use_deepspeed):
            handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed on CPU: see deepspeed_on_cpu.md
        report_to = cfg.train.report_to
        log_with = None if report_to in (None, "", "none") else report_to
        self.output_dir.mkdir(parents=True, exist_ok=True)
        extra = {}
        self.extra_accelerators: dict[str, Any] = {}
        self.zero_stage = 0  # DeepSpeed ZeRO stage (0: DDP / single process)
        if use_deepspeed:
            extra["deepspeed_plugins"] = self._deepspeed_plugins(world)
        else:
            extra["mixed_precision"] = cfg.train.mixed_precision
        accelerator = Accelerator(
            cpu=no_cuda and not use_deepspeed,  # without it, torchrun on a CPU box gives N independent runs
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
            kwargs_handlers=handlers,
            **extra,
        )
        if use_deepspeed:
            _unset_hf_deepspeed_config()
        return accelerator

    # ---- DeepSpeed: one engine (and one accelerator) per trainable module
    def _deepspeed_modules(self) -> list[str]:
        names = {0: ["tokenizer"], 1: ["tokenizer", "ar"], 2: ["ar"]}[self.stage]
        if self.stage in (0, 1) and self.cfg.loss.gan_weight > 0:
            names.append("discriminator")
        return names

    def _deepspeed_plugins(self, world: int) -> dict[str, Any]:
        """One `DeepSpeedPlugin` per trainable module from `train.deepspeed_config` (json), with the batch sizes,
        clipping and precision filled in from the training config."""
        from accelerate.utils import DeepSpeedPlugin

        cfg = self.cfg
        if cfg.train.gradient_accumulation_steps != 1:
            raise TrainingSetupError("DeepSpeed mode supports train.gradient_accumulation_steps=1 only.")
        if cfg.train.mixed_precision != "no":
            raise TrainingSetupError(
                "DeepSpeed mode is experimental and runs in fp32 only (train.mixed_precision=no): bf16 DeepSpeed "
                "engines keep bf16 weights, which the soft/hard GEAR branches and the EMAs do not handle yet."
            )
        try:
            import deepspeed  # noqa: F401
        except ImportError as error:
            raise TrainingSetupError("train.deepspeed_config needs `pip install deepspeed` (>= 0.19.8).") from error
        path = Path(cfg.train.deepspeed_config)
        if not path.is_file():
            raise TrainingSetupError(f"train.deepspeed_config: {path} not found.")
        base = json.loads(path.read_text())
        # ZeRO-3 partitions the parameters: the trainer gathers them where it reads full weights (EMA updates,
        # exports) and registers the embedding tables that GEAR reads outside their own forward (`_prepare_deepspeed`).
        self.zero_stage = int(base.get("zero_optimization", {}).get("stage", 0))
        per_device = cfg.train.train_batch_size // max(1, world)
        plugins = {}
        for name in self._deepspeed_modules():
            ds = json.loads(json.dumps(base))
            ds.update({
                "train_batch_size": cfg.train.train_batch_size,
                "train_micro_batch_size_per_gpu": per_device,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": cfg.optim.max_grad_norm,
            })
            ds.pop("bf16", None)
            ds.pop("fp16", None)
            # zero3_init_flag=False: models are built (and loaded) whole on every rank, so the EMAs start as exact
            # copies; `deepspeed.initialize` partitions them. (The default for a ZeRO-3 config would be True.)
            plugins[name] = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
        return plugins

    def _build_data(self):
        from .data import build_train_dataset, collate

        cfg, acc = self.cfg, self.accelerator
        d = cfg.data
        try:
            dataset = build_train_dataset(
                d.source, d.path, d.image_size, split=d.split, random_flip=d.random_flip, seed=cfg.train.seed,
                max_samples=d.max_samples, rank=acc.process_index, world_size=acc.num_processes,
            )
        except FileNotFoundError as error:
            raise TrainingSetupError(f"No images found for data.source={d.source!r} at {d.path!r}: {error}") from error
        except ValueError as error:
            raise TrainingSetupError(str(error)) from error
        self.dataset = dataset
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        if not self.streaming and len(dataset) < self.per_device_batch_size * acc.num_processes:
            raise TrainingSetupError(
                f"The dataset has {len(dataset)} images, fewer than one global micro-batch "
                f"({self.per_device_batch_size} × {acc.num_processes} processes)."
            )
        self.class_names = getattr(dataset, "class_names", None)
        self.dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=self.per_device_batch_size, shuffle=not self.streaming, drop_last=True,
            collate_fn=collate, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
            # Its own generator: a DataLoader iterator otherwise draws its worker base seed from the GLOBAL torch
            # RNG, so a resumed run (which re-creates the iterator mid-epoch) would shift the dropout RNG stream.
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )

    # ---- models
    def _build_tokenizer(self):
        from ..models.configuration_gear_tokenizer import GEARTokenizerConfig
        from ..models.modeling_gear_tokenizer import GEARTokenizerModel

        cfg, t = self.cfg, self.cfg.tokenizer
        init = Path(cfg.train.init_from) if cfg.train.init_from else None
        live_ema = None  # stage 1 from stage 0: (live, ema) weights
        if init is not None and self.stage in (1, 2):
            ema_dir = _require_dir(init / "tokenizer", "tokenizer (EMA)")
            if self.stage == 1:
                live = GEARTokenizerModel.from_pretrained(
                    _require_dir(init / "raw" / "tokenizer", "live tokenizer"), dtype=torch.float32)
                ema = GEARTokenizerModel.from_pretrained(ema_dir, dtype=torch.float32)
                return live, ema
            source = ema_dir if t.use_ema else _require_dir(init / "raw" / "tokenizer", "live tokenizer")
            return GEARTokenizerModel.from_pretrained(source, dtype=torch.float32), live_ema
        if t.pretrained:
            path = Path(t.pretrained)
            if path.is_file():  # official .pt / .ckpt / .safetensors file
                config = (GEARTokenizerConfig.from_preset(t.preset, **t.config) if t.preset
                          else GEARTokenizerConfig(**t.config))
                model = GEARTokenizerModel.from_official_checkpoint(path, config, use_ema=t.use_ema)
            else:
                model = GEARTokenizerModel.from_pretrained(t.pretrained, dtype=torch.float32)
            return model, None
        if not t.preset and not t.config:
            raise TrainingSetupError("Give tokenizer.pretrained, tokenizer.preset or tokenizer.config "
                                     "(or train.init_from for stages 1-2).")
        config = GEARTokenizerConfig.from_preset(t.preset, **t.config) if t.preset else GEARTokenizerConfig(**t.config)
        return GEARTokenizerModel(config), None

    def _ar_config(self, tokenizer):
        from ..models.configuration_gear_ar import GEARConfig

        cfg, a = self.cfg, self.cfg.ar
        tc = tokenizer.config
        derived = {"vocab_size": tc.codebook_size, "image_size": cfg.data.image_size,
                   "downsample_factor": tc.downsample_factor}
        if self.class_names:
            derived["num_classes"] = len(self.class_names)
        if a.pretrained:
            config = GEARConfig.from_pretrained(a.pretrained)
        else:
            overrides = {**derived, **a.config}
            config = GEARConfig.from_preset(a.preset, **overrides) if a.preset else GEARConfig(**overrides)
        for key in ("vocab_size", "image_size", "downsample_factor"):
            if getattr(config, key) != derived[key]:
                raise TrainingSetupError(
                    f"ar.{key}={getattr(config, key)} does not match the tokenizer / data "
                    f"({key}={derived[key]}). Leave it unset so it is derived, or fix the other side."
                )
        if self.class_names and config.num_classes < len(self.class_names):
            raise TrainingSetupError(f"The dataset has {len(self.class_names)} classes but the AR only "
                                     f"num_classes={config.num_classes}.")
        return config

    def _build_models(self):
        from .alignment import ProjectorBank
        from .ema import EMA
        from .losses import LPIPS, PatchGANDiscriminator, TokenizerLoss

        cfg, acc = self.cfg, self.accelerator
        image_size = cfg.data.image_size
        tokenizer, tokenizer_ema_init = self._build_tokenizer()
        factor = tokenizer.config.downsample_factor
        if image_size % factor:
            raise TrainingSetupError(
                f"data.image_size={image_size} is not divisible by the tokenizer's downsample factor {factor}; "
                f"use a multiple of {factor}, e.g. {max(1, round(image_size / factor)) * factor}."
            )
        self.grid_size = image_size // factor

        # AR (stages 1, 2)
        ar = ar_config = None
        if self.stage in (1, 2):
            ar_config = self._ar_config(tokenizer)
            n_layer = ar_config.num_hidden_layers
            needs_tap = self.stage == 1 or cfg.gear.use_repa
            if needs_tap and not 1 <= cfg.gear.align_layer <= n_layer:
                raise TrainingSetupError(
                    f"gear.align_layer (ℓ) = {cfg.gear.align_layer} must be in [1, {n_layer}] "
                    f"(1-based block index of the {n_layer}-layer AR)."
                )
            ar = self._build_ar(ar_config)

        # Teacher + projector
        teacher = projector = None
        use_repa = self.stage == 1 or (self.stage == 2 and cfg.gear.use_repa)
        if use_repa:
            teacher = self._build_teacher()
            projector = ProjectorBank(ar.config.hidden_size, [teacher.hidden_size], cfg.gear.projector_dim)
            if self.stage == 2 and cfg.train.init_from and cfg.train.init_ar_from_previous:
                raw = Path(cfg.train.init_from) / "raw" / "projector.safetensors"
                if raw.is_file():
                    _load_safetensors_into(projector, raw, "projector")
                else:
                    logger.warning("train.init_from has no raw/projector.safetensors: the projector starts fresh.")

        # Tokenizer loss + discriminator (stages 0, 1)
        discriminator = tokenizer_loss = None
        if self.stage in (0, 1):
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
            if lp.gan_weight > 0:
                discriminator = PatchGANDiscriminator(tokenizer.config.num_channels, lp.discriminator_channels,
                                                      lp.discriminator_layers)
                if self.stage == 1 and cfg.train.init_from:
                    _load_safetensors_into(discriminator, Path(cfg.train.init_from) / "raw" /
                                           "discriminator.safetensors", "discriminator")
                if acc.num_processes > 1 and torch.cuda.is_available():
                    discriminator = discriminator.to_sync_batchnorm()

        # Stage 2: the tokenizer is frozen (eval, no grad), never prepared or saved in checkpoints.
        if self.stage == 2:
            tokenizer.eval().requires_grad_(False)
            tokenizer.check_input_range = False  # inputs come from uint8; skip the per-step host sync
        self.tokenizer, self.ar, self.projector, self.teacher = tokenizer, ar, projector, teacher
        self.discriminator, self.tokenizer_loss = discriminator, tokenizer_loss
        self._tokenizer_ema_init = tokenizer_ema_init
        self.signature = ckpt.structural_signature(cfg, tokenizer.config, ar_config,
                                                   {"teacher.hidden_size": getattr(teacher, "hidden_size", None)})
        self._ema_cls = EMA

    def _build_ar(self, ar_config):
        from ..models.modeling_gear_ar import GEARForCausalImageLM

        cfg = self.cfg
        if self.stage == 2 and cfg.train.init_from and cfg.train.init_ar_from_previous:
            path = _require_dir(Path(cfg.train.init_from) / "ar", "AR (EMA)",
                                " Set train.init_ar_from_previous=false to train the AR from scratch.")
            ar = GEARForCausalImageLM.from_pretrained(path, dtype=torch.float32)
            if ar.config.vocab_size != ar_config.vocab_size or ar.config.num_image_tokens != ar_config.num_image_tokens:
                raise TrainingSetupError(f"The AR at {path} does not fit the tokenizer/data (vocab "
                                         f"{ar.config.vocab_size}, {ar.config.num_image_tokens} tokens).")
            return ar
        if cfg.ar.pretrained:
            return GEARForCausalImageLM.from_pretrained(cfg.ar.pretrained, dtype=torch.float32)
        return GEARForCausalImageLM(ar_config)

    def _build_teacher(self):
        from .alignment import DINOv2Teacher, load_teacher

        t = self.cfg.teacher
        if t.random_init:
            from transformers import Dinov2Config, Dinov2Model

            config = Dinov2Config(**t.config)
            teacher = DINOv2Teacher(Dinov2Model(config).eval(), self.grid_size)
        else:
            try:
                teacher = load_teacher(t.name, t.path, self.grid_size, t.layer)
            except OSError as error:
                raise TrainingSetupError(
                    f"Cannot load the REPA teacher {t.name!r} from {t.path!r} (nothing is downloaded: give a local "
                    f"directory / file, or pre-populate the Hub cache): {error}"
                ) from error
        # Fail now (not at step 1) when the teacher's patch grid is not the token grid.
        size = self.cfg.data.image_size
        try:
            with torch.no_grad():
                teacher(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        except ValueError as error:
            raise TrainingSetupError(f"REPA teacher/token grid mismatch: {error}") from error
        return teacher

    # ---- optimizers, schedulers
    def _build_optimization(self):
        cfg, acc = self.cfg, self.accelerator
        o = cfg.optim
        # AcceleratedScheduler steps `num_processes` times per optimizer step (split_batches=False).
        # (DeepSpeed engines step their scheduler once per optimizer step instead.)
        scale = 1 if cfg.train.deepspeed_config is not None else acc.num_processes
        warmup = max(0, o.warmup_steps) * scale
        self.opt_tok = self.opt_ar = self.opt_disc = None
        if self.stage in (0, 1):
            self.opt_tok = _adamw(self.tokenizer.parameters(), o.tokenizer_lr, cfg)
        if self.stage in (1, 2):
            params = list(self.ar.parameters()) + (list(self.projector.parameters()) if self.projector else [])
            self.opt_ar = _adamw(params, o.ar_lr, cfg)
        if self.discriminator is not None:
            self.opt_disc = _adamw(self.discriminator.parameters(), o.discriminator_lr, cfg)
        self.sched_tok = _constant_with_warmup(self.opt_tok, warmup) if self.opt_tok else None
        self.sched_ar = _constant_with_warmup(self.opt_ar, warmup) if self.opt_ar else None
        self.sched_disc = _constant_with_warmup(self.opt_disc, warmup) if self.opt_disc else None

    def _prepare(self):
        acc = self.accelerator
        # EMAs start as exact copies of the bare modules (identical on every rank: same seed / same files).
        decay = self.cfg.train.ema_decay
        self.tokenizer_ema = self.ar_ema = None
        if self.stage in (0, 1):
            self.tokenizer_ema = self._ema_cls(self.tokenizer, decay, include_buffers=True)
            if self._tokenizer_ema_init is not None:
                self.tokenizer_ema.model.load_state_dict(self._tokenizer_ema_init.state_dict())
                self._tokenizer_ema_init = None
        if self.stage in (1, 2):
            self.ar_ema = self._ema_cls(self.ar, decay, include_buffers=False)

        self._ar_engine = None  # DeepSpeed: the engine of `_ARWithProjector`
        if self.cfg.train.deepspeed_config is not None:
            self._prepare_deepspeed()
        else:
            names = ["tokenizer", "ar", "projector", "discriminator", "opt_tok", "opt_ar", "opt_disc",
                     "sched_tok", "sched_ar", "sched_disc"]
            if self.stage == 2:
                names.remove("tokenizer")  # frozen: plain module on the device
            present = [n for n in names if getattr(self, n) is not None]
            prepared = acc.prepare(*[getattr(self, n) for n in present])
            if len(present) == 1:
                prepared = (prepared,)
            for name, obj in zip(present, prepared):
                setattr(self, name, obj)
            if self.streaming:
                self.train_loader = self.dataloader  # sharded by the dataset itself (split_dataset_by_node)
            else:
                self.train_loader = acc.prepare(self.dataloader)
        device = acc.device
        if self.stage == 2:
            self.tokenizer.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        if self.tokenizer_loss is not None:
            self.tokenizer_loss.to(device)

        for ema in (self.tokenizer_ema, self.ar_ema):
            if ema is not None:
                ema.to(device)
                acc.register_for_checkpointing(ema)

        max_norm = self.cfg.optim.max_grad_norm
        accs = {name: self.extra_accelerators.get(name, acc) for name in ("tokenizer", "ar", "discriminator")}

        def upd(name, model, opt, sched):
            return ModuleUpdate(accs[name], model, opt, sched, max_norm) if opt is not None else None

        self.modules = GEARModules(
            # DeepSpeed: the hard branch runs through the AR engine's forward (DeepSpeed's per-step backward
            # bookkeeping hangs on it); `unwrap` of it gives `_ARWithProjector`, whose forward is the AR's (soft branch;
            # under ZeRO-3 its hooks gather the partitioned AR parameters).
            tokenizer=self.tokenizer, ar=self.ar if self._ar_engine is None else self._ar_engine,
            projector=self.projector, teacher=self.teacher,
            tokenizer_loss=self.tokenizer_loss, discriminator=self.discriminator,
            tokenizer_update=upd("tokenizer", self.tokenizer, self.opt_tok, self.sched_tok),
            ar_update=upd("ar", self.ar, self.opt_ar, self.sched_ar),
            discriminator_update=upd("discriminator", self.discriminator, self.opt_disc, self.sched_disc),
            tokenizer_ema=self.tokenizer_ema, ar_ema=self.ar_ema,
        )
        self.trainable = [m for m in (None if self.stage == 2 else self.tokenizer, self.ar, self.projector,
                                      self.discriminator) if m is not None]

    def _prepare_deepspeed(self):
        """Experimental: one DeepSpeed engine per trainable module (accelerate's multi-model pattern: the first
        accelerator owns the tokenizer engine (stage 2: the AR) plus data, RNG and EMAs; one more `Accelerator()`
        per further engine). The AR and its projector form one engine (`_ARWithProjector`). Cross-engine graphs
        (soft branch through the frozen AR, GAN term through the frozen discriminator) are safe because the other
        engine's parameters do not require grad while its module is used (`gear_step.frozen`).

        ZeRO-3 (parameters partitioned): the other engine's module is called directly (`unwrap(engine)`, i.e.
        `engine.module`), whose ZeRO-3 hooks gather its parameters for the forward and again for the backward;
        embedding tables read outside their own forward are registered with the engine's root module; the EMAs update
        from gathered parameters (`_EngineEMA`) and `export` gathers the live weights."""
        from accelerate import Accelerator

        acc = self.accelerator
        order = self._deepspeed_modules()
        groups = {
            "tokenizer": ("tokenizer", "opt_tok", "sched_tok"),
            "ar": ("ar", "opt_ar", "sched_ar"),
            "discriminator": ("discriminator", "opt_disc", "sched_disc"),
        }
        for i, name in enumerate(order):
            owner = acc if i == 0 else Accelerator()
            if i:
                self.extra_accelerators[name] = owner
            acc.state.select_deepspeed_plugin(name)
            model_attr, opt_attr, sched_attr = groups[name]
            module = getattr(self, model_attr)
            if name == "ar" and self.projector is not None:
                module = _ARWithProjector(self.ar, self.projector)
            objs = [module, getattr(self, opt_attr), getattr(self, sched_attr)]
            if i == 0 and not self.streaming:
                objs.append(self.dataloader)
            prepared = owner.prepare(*objs)
            engine = prepared[0]
            if self.zero_stage >= 3:
                _register_zero3_embedding_tables(engine.module)
            setattr(self, opt_attr, prepared[1])
            setattr(self, sched_attr, prepared[2])
            if i == 0:
                self.train_loader = prepared[3] if not self.streaming else self.dataloader
            if name == "ar" and self.projector is not None:
                self.ar, self.projector = engine.module.ar, engine.module.projector
                self._ar_engine = engine
            else:
                setattr(self, model_attr, engine)
        _unset_hf_deepspeed_config()  # selecting a plugin registered it again (see `_build_accelerator`)
        if self.tokenizer_ema is not None:
            self.tokenizer_ema = _EngineEMA(self.tokenizer_ema, unwrap(self.tokenizer), self._full_parameters)
        if self.ar_ema is not None:
            self.ar_ema = _EngineEMA(self.ar_ema, unwrap(self.ar), self._full_parameters)

    @contextlib.contextmanager
    def _full_parameters(self, *modules: nn.Module | None):
        """Context in which `modules` hold their full parameters on every rank: under ZeRO-3 they are gathered on
        entry (a collective: every rank must enter) and re-partitioned on exit (read-only: changes are dropped).
        A no-op otherwise."""
        with contextlib.ExitStack() as stack:
            if self.zero_stage >= 3:
                import deepspeed

                for module in modules:
                    if module is not None:
                        stack.enter_context(deepspeed.zero.GatheredParameters(list(module.parameters()),
                                                                               modifier_rank=None))
            yield

    # ---------------------------------------------------------------------------------------------- resume
    def _state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "num_processes": self.accelerator.num_processes,
            "per_device_batch_size": self.per_device_batch_size,
            "signature": self.signature,
            "config": self.cfg.to_dict(),
        }

    def resume(self, spec: str | None) -> Path | None:
        """Load a checkpoint (`latest` or a path). Returns the checkpoint used, or None (fresh start)."""
        try:
            path = ckpt.resolve_resume_path(spec, self.output_dir)
        except FileNotFoundError as error:
            raise TrainingSetupError(str(error)) from error
        if path is None:
            if spec == "latest":
                logger.info("resume_from_checkpoint=latest: no checkpoint in %s, starting fresh.", self.checkpoint_root)
            return None
        state = ckpt.read_state(path)
        ckpt.check_compatible(state.get("signature", {}), self.signature, path)
        if state.get("num_processes") != self.accelerator.num_processes:
            logger.warning("Checkpoint %s was written by %s processes, resuming with %s: the data order and RNG "
                           "streams will differ from an uninterrupted run.", path, state.get("num_processes"),
                           self.accelerator.num_processes)
        self.accelerator.load_state(str(path))
        for name, extra in self.extra_accelerators.items():
            extra.load_state(str(path / name))
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.accelerator.print(f"Resumed from {path} at step {self.global_step} "
                               f"(epoch {self.epoch}, batch {self.batches_in_epoch}).")
        return path

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.accelerator, self.checkpoint_root, self.global_step, self._state(),
                                    self.cfg.train.checkpoints_total_limit, self.extra_accelerators)

    # ------------------------------------------------------------------------------------------------ loop
    def _epoch_batches(self):
        """Yield micro-batches forever, tracking (epoch, batches_in_epoch); skips what a resumed run consumed."""
        acc = self.accelerator
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)  # augmentation depends on (seed, epoch, index)
            loader = self.train_loader
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch)  # sampler order depends on (seed, epoch)
            skip = self.batches_in_epoch
            if skip:
                if self.streaming:
                    iterator = iter(loader)
                    for _ in range(skip):
                        next(iterator, None)
                    loader = iterator
                else:
                    loader = acc.skip_first_batches(loader, skip)
            got_any = False
            for batch in loader:
                got_any = True
                self.batches_in_epoch += 1  # counted when handed out: a checkpoint after this step skips it
                yield batch
            if not got_any and skip == 0:
                raise TrainingSetupError("The data loader yielded no batch (is the dataset empty?).")
            self.epoch += 1
            self.batches_in_epoch = 0

    def train(self, resume_from_checkpoint: str | None = None) -> dict[str, Any]:
        """Run to `train.max_train_steps`. Returns {"global_step", "status": "finished"|"interrupted", ...}."""
        self.build()
        cfg, acc = self.cfg, self.accelerator
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else cfg.train.resume_from_checkpoint
        resumed_from = self.resume(resume)
        max_steps = cfg.train.max_train_steps
        step_fn = STEP_FUNCTIONS[self.stage]

        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "training_config.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        if acc.log_with:
            acc.init_trackers("gear", config=_flat_config(cfg))
        acc.print(
            f"GEAR stage {self.stage}: global batch {cfg.train.train_batch_size} = per-device "
            f"{self.per_device_batch_size} × {acc.num_processes} processes × {cfg.train.gradient_accumulation_steps} "
            f"accumulation; {max_steps} steps; {acc.distributed_type}, mixed precision {acc.mixed_precision}."
        )
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_counts: dict[str, int] = {}
        self._zero_runs: dict[str, torch.Tensor] = {}
        from .codebook_stats import CodebookUsage

        self._stats_usage = CodebookUsage(unwrap(self.tokenizer).config.codebook_size, device=acc.device)
        self._window_start = time.perf_counter()
        self._window_images = 0
        self._data_wait = 0.0

        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=self.global_step, disable=not acc.is_local_main_process,
                        desc=f"stage {self.stage}", dynamic_ncols=True)
        status = "finished"
        last_saved = self.global_step if resumed_from is not None else None
        with _StopRequest() as stop:
            batches = self._epoch_batches()
            while self.global_step < max_steps:
                t0 = time.perf_counter()
                batch = next(batches)
                self._data_wait += time.perf_counter() - t0
                if self.streaming:
                    batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                want_stats = self._is_due(cfg.train.stats_every, self.global_step + 1)
                extras = {"with_assignment": want_stats and self.stage != 2}
                with acc.accumulate(*self.trainable), acc.autocast():
                    logs = step_fn(self.modules, batch, cfg, step=self.global_step, extras=extras)
                self._accumulate_logs(logs, batch)
                if "indices" in extras:
                    self._stats_usage.update(extras["indices"])
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                progress.update(1)
                self._track_zero_grads(logs)
                if want_stats:
                    self._log_codebook_stats(extras)
                del extras
                if self._is_due(cfg.train.log_every, self.global_step) or self.global_step == max_steps:
                    self._flush_logs(progress)
                if self._is_due(cfg.train.sample_every, self.global_step):
                    self.save_samples()
                if stop.requested:
                    acc.set_trigger()
                if acc.check_trigger():  # collective: every rank stops at the same step
                    self.save_checkpoint()
                    last_saved = self.global_step
                    status = "interrupted"
                    acc.print(f"Stopped by signal: checkpoint saved at step {self.global_step}.")
                    break
                if self._is_due(cfg.train.checkpointing_steps, self.global_step):
                    self.save_checkpoint()
                    last_saved = self.global_step
        progress.close()
        if status == "finished":
            if last_saved != self.global_step:
                self.save_checkpoint()
            self.export()
        acc.wait_for_everyone()
        acc.end_training()
        return {"global_step": self.global_step, "status": status, "output_dir": str(self.output_dir)}

    @staticmethod
    def _is_due(every: int | None, step: int) -> bool:
        return bool(every) and every > 0 and step % every == 0

    # --------------------------------------------------------------------------------------------- logging
    def _accumulate_logs(self, logs: dict[str, Any], batch: dict[str, torch.Tensor]) -> None:
        """Device-side sums of detached scalars; no host sync."""
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # DeepSpeed grad norms
                value = torch.tensor(float(value), device=self.accelerator.device)
            if value is None or not torch.is_tensor(value) or value.numel() != 1:
                continue
            value = value.detach().float().reshape(())
            self._log_sums[key] = self._log_sums[key] + value if key in self._log_sums else value.clone()
            self._log_counts[key] = self._log_counts.get(key, 0) + 1
        if "num_skipped" in batch:
            skipped = batch["num_skipped"].float().sum().reshape(())
            key = "data/skipped_images"
            self._log_sums[key] = self._log_sums[key] + skipped if key in self._log_sums else skipped
            self._log_counts[key] = 1  # a sum, not a mean
        self._window_images += batch["pixel_values"].shape[0]

    def _track_zero_grads(self, logs: dict[str, Any]) -> None:
        for key, value in logs.items():
            if key.startswith("grad_norm/") and torch.is_tensor(value):
                run = self._zero_runs.get(key)
                zero = (value.detach().reshape(()) == 0).long()
                self._zero_runs[key] = zero if run is None else (run + 1) * zero

    def _flush_logs(self, progress=None) -> dict[str, float]:
        """Reduce the window's sums across ranks and log them: one host sync per `log_every` steps."""
        acc, cfg = self.accelerator, self.cfg
        keys = sorted(self._log_sums)
        zero_keys = sorted(self._zero_runs)
        values = [self._log_sums[k] / self._log_counts[k] for k in keys]
        values += [self._zero_runs[k].float() for k in zero_keys]
        result: dict[str, float] = {}
        if values:
            stacked = torch.stack(values)
            if acc.num_processes > 1:
                stacked = acc.reduce(stacked, reduction="mean")
            host = stacked.tolist()
            result = dict(zip(keys, host[: len(keys)]))
            zero_runs = dict(zip(zero_keys, host[len(keys):]))
        else:
            zero_runs = {}
        if "data/skipped_images" in result:
            result["data/skipped_images"] *= acc.num_processes  # mean → total over ranks
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        result["perf/images_per_second"] = self._window_images * acc.num_processes / elapsed
        result["perf/images_per_second_per_device"] = self._window_images / elapsed
        result["perf/data_wait_fraction"] = self._data_wait / elapsed
        result["train/epoch"] = self.epoch
        result["train/global_batch_size"] = cfg.train.train_batch_size
        result["train/per_device_batch_size"] = self.per_device_batch_size
        for name, sched in (("tokenizer", self.sched_tok), ("ar", self.sched_ar), ("discriminator", self.sched_disc)):
            if sched is not None:
                result[f"lr/{name}"] = sched.get_last_lr()[0]

        bad = [k for k, v in result.items() if not math.isfinite(v)]
        if bad:
            message = f"Non-finite values at step {self.global_step}: {', '.join(bad)}."
            logger.error(message)
            acc.print("ALARM: " + message)
            if cfg.train.abort_on_nonfinite:
                raise FloatingPointError(message)
        k_zero = cfg.train.zero_grad_alarm_steps
        for key, run in zero_runs.items():
            if k_zero and run >= k_zero:
                message = (f"{key} has been exactly 0 for {int(run)} consecutive steps (step {self.global_step}): "
                           "that module is not learning (frozen by mistake / detached graph?).")
                logger.warning(message)
                acc.print("ALARM: " + message)
        if acc.log_with:
            acc.log(result, step=self.global_step)
        if progress is not None:
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in result.items()
                     if k in ("tokenizer/loss", "ar/ntp_loss", "discriminator/loss")}
            progress.set_postfix(shown, refresh=False)
        self._log_sums, self._log_counts = {}, {}
        self._window_start, self._window_images, self._data_wait = time.perf_counter(), 0, 0.0
        self.last_logs = result
        return result

    def _log_codebook_stats(self, extras: dict) -> None:
        """Codebook usage over the window since the last call + assignment statistics of this step (collective)."""
        from .codebook_stats import assignment_statistics

        acc = self.accelerator
        stats = {f"codebook/{k}": v for k, v in self._stats_usage.compute(acc).items()}
        logits = extras.get("assignment_logits")
        if logits is not None:
            stats.update({f"codebook/{k}": v for k, v in
                          assignment_statistics(logits, 1.0, accelerator=acc).items()})
            stats.update({f"soft/{k}": v for k, v in
                          assignment_statistics(logits, self.cfg.gear.temperature, accelerator=acc).items()})
        host = torch.stack([v.float().reshape(()) for v in stats.values()]).tolist()
        result = dict(zip(stats, host))
        if acc.log_with:
            acc.log(result, step=self.global_step)
        self.last_codebook_stats = result

    # --------------------------------------------------------------------------------------------- samples
    def _fixed_images(self, n: int) -> torch.Tensor | None:
        if self.streaming:
            return None
        self.dataset.set_epoch(0)
        images = torch.stack([self.dataset[i]["pixel_values"] for i in range(min(n, len(self.dataset)))])
        self.dataset.set_epoch(self.epoch)
        return images

    @torch.no_grad()
    def save_samples(self) -> None:
        """Reconstruction grid (tokenizer EMA) and class-conditional samples (AR + tokenizer EMA) as PNGs.

        Main process only; uses its own generator so the training RNG streams are untouched."""
        acc, cfg = self.accelerator, self.cfg
        if not acc.is_main_process:
            return
        from torchvision.utils import make_grid, save_image

        from .gear_step import to_signed_unit

        tokenizer = self.tokenizer_ema.model if self.tokenizer_ema is not None else unwrap(self.tokenizer)
        tokenizer.eval()
        out_dir = self.output_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        n = max(1, cfg.train.num_sample_images)
        grids = {}
        images = self._fixed_images(n)
        device = acc.device
        if images is not None:
            with torch.autocast(device_type=device.type, enabled=False):
                recon = tokenizer(to_signed_unit(images.to(device))).reconstruction
            pair = torch.cat([images.to(device).float() / 255.0, ((recon.clamp(-1, 1) + 1) / 2)], dim=0)
            grids["reconstructions"] = make_grid(pair.cpu(), nrow=len(images))
        if self.ar_ema is not None:
            ar = self.ar_ema.model
            num_classes = ar.config.num_classes
            labels = torch.arange(n, device=device) % num_classes
            generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
            guidance = cfg.train.sample_guidance_scale if ar.config.has_null_class else 1.0
            tokens = ar.generate_images(labels, guidance_scale=guidance,
                                        top_k=min(cfg.train.sample_top_k, ar.config.vocab_size),
                                        generator=generator)
            samples = tokenizer.decode(tokens)
            grids["samples"] = make_grid(((samples.clamp(-1, 1) + 1) / 2).cpu(), nrow=min(n, 8))
        for name, grid in grids.items():
            save_image(grid, out_dir / f"step_{self.global_step:08d}_{name}.png")
        if acc.log_with:
            try:
                tracker = acc.get_tracker("tensorboard", unwrap=True)
                for name, grid in grids.items():
                    tracker.add_image(f"images/{name}", grid, self.global_step)
            except Exception as error:  # noqa: BLE001 - image logging is best effort
                logger.debug("Could not log images to the tracker: %s", error)

    # ---------------------------------------------------------------------------------------------- export
    def export(self) -> dict[str, str]:
        """Write the from_pretrained directories (EMA weights) and the live weights for the next stage.

        Collective: under ZeRO-3 every rank gathers the live weights while the main process writes them."""
        acc = self.accelerator
        acc.wait_for_everyone()
        written: dict[str, str] = {}
        live = (None if self.stage == 2 else self.tokenizer, self.ar, self.projector, self.discriminator)
        with self._full_parameters(*live):
            if acc.is_main_process:
                written = self._write_exports()
        return written

    def _write_exports(self) -> dict[str, str]:
        from safetensors.torch import save_file

        acc = self.accelerator
        written: dict[str, str] = {}
        out, raw = self.output_dir, self.output_dir / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        tokenizer_final = self.tokenizer_ema.model if self.tokenizer_ema is not None else unwrap(self.tokenizer)
        tokenizer_final.save_pretrained(out / "tokenizer")
        written["tokenizer"] = str(out / "tokenizer")
        if self.stage in (0, 1):
            unwrap(self.tokenizer).save_pretrained(raw / "tokenizer")
        if self.ar_ema is not None:
            self.ar_ema.model.save_pretrained(out / "ar")
            unwrap(self.ar).save_pretrained(raw / "ar")
            written["ar"] = str(out / "ar")
        if self.discriminator is not None:
            save_file({k: v.contiguous() for k, v in unwrap(self.discriminator).state_dict().items()},
                      str(raw / "discriminator.safetensors"))
        if self.projector is not None:
            save_file({k: v.contiguous() for k, v in unwrap(self.projector).state_dict().items()},
                      str(raw / "projector.safetensors"))
        if self.ar_ema is not None and self.cfg.train.export_pipeline:
            from ..pipelines import GEARPipeline

            id2label = dict(enumerate(self.class_names)) if self.class_names else None
            pipe = GEARPipeline(vq_model=tokenizer_final, transformer=self.ar_ema.model, id2label=id2label)
            pipe.save_pretrained(out / "pipeline")
            written["pipeline"] = str(out / "pipeline")
        with open(out / "export.json", "w", encoding="utf-8") as f:
            json.dump({"global_step": self.global_step, "stage": self.stage, **written}, f, indent=2)
        acc.print(f"Exported {', '.join(written)} to {out}.")
        return written


def run_training(cfg: TrainingConfig, resume_from_checkpoint: str | None = None) -> dict[str, Any]:
    """Build a `GEARTrainer` from `cfg` and train; the entry point of the scripts."""
    return GEARTrainer(cfg).train(resume_from_checkpoint)


def config_from_cli(config_path: str, overrides: list[str] | None = None, **cli) -> TrainingConfig:
    """`--config` + `--set section.key=value` + dedicated flags (`max_train_steps`, `output_dir`, ...)."""
    overrides = list(overrides or [])
    for key, section in (("max_train_steps", "train"), ("output_dir", "train"), ("stage", "train")):
        if cli.get(key) is not None:
            overrides.append(f"{section}.{key}={cli[key]}")
    cfg = TrainingConfig.from_yaml(config_path, overrides)
    return cfg


__all__ = ["GEARTrainer", "TrainingSetupError", "run_training", "config_from_cli"]


# ---------------------------------------------------------------------------------------------------------------
# Command line (scripts/train_tokenizer.py, scripts/train_gear.py, scripts/train_ar.py)
# ---------------------------------------------------------------------------------------------------------------

_SCRIPTS = {0: "scripts/train_tokenizer.py", 1: "scripts/train_gear.py", 2: "scripts/train_ar.py"}
_DESCRIPTIONS = {
    0: "GEAR stage 0: tokenizer warm-up (L1 + LPIPS + quantizer + GAN losses, tokenizer EMA).",
    1: "GEAR stage 1: joint tokenizer + AR training (soft branch → tokenizer, hard branch → AR, REPA on both).",
    2: "GEAR stage 2: AR training on a frozen tokenizer (NTP + optional REPA).",
}


def build_arg_parser(stage: int):
    import argparse

    parser = argparse.ArgumentParser(
        description=_DESCRIPTIONS[stage],
        epilog="Multi-process: accelerate launch --config_file configs/accelerate/ddp.yaml "
               f"{_SCRIPTS[stage]} --config ... (CPU: configs/accelerate/ddp_cpu.yaml or torchrun).",
    )
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/tiny/stage1.yaml")
    parser.add_argument("--max-train-steps", type=int, default=None)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--resume-from-checkpoint", default=None, metavar="latest|PATH",
                        help="'latest' (newest complete checkpoint of --output-dir, fresh start if none) or a path")
    parser.add_argument("--init-from", default=None, help="previous stage's output dir (sets train.init_from)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key (repeatable), e.g. --set gear.temperature=0.05")
    return parser


def main(stage: int, argv: list[str] | None = None) -> int:
    """Parse the command line of a stage script, build everything from the library and train."""
    import sys

    parser = build_arg_parser(stage)
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.init_from is not None:
        overrides.append(f"train.init_from={args.init_from}")
    try:  # config errors (unknown key, τ <= 0, bad value, missing file): one clear message, no traceback
        cfg = config_from_cli(args.config, overrides, max_train_steps=args.max_train_steps,
                              output_dir=args.output_dir)
        if cfg.train.stage != stage:
            raise TrainingSetupError(
                f"{args.config} is a stage-{cfg.train.stage} config; run it with {_SCRIPTS[cfg.train.stage]} "
                f"(this script trains stage {stage})."
            )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = run_training(cfg, args.resume_from_checkpoint)
    except (TrainingSetupError, ckpt.CheckpointCompatibilityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
