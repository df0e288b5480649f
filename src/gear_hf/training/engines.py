"""Engine plumbing: the accelerator, DDP / DeepSpeed / FSDP2 preparation of the trainable modules, precision
(autocast), `torch.compile`, EMAs, and full parameters where the trainer reads whole weights.

DDP (and single process): one `Accelerator` prepares every module, optimizer and scheduler.
DeepSpeed and FSDP2: one engine (DeepSpeed engine / FSDP2 root), hence one accelerator, per trainable module
(accelerate's multi-model pattern; accelerate's FSDP2 also takes one model per `prepare` and its
`clip_grad_norm_` picks the first prepared model whose parameters compare equal, so each root gets its own
accelerator): the first accelerator owns the tokenizer engine (stage 2: the AR) plus data, RNG and EMAs; one
more `Accelerator()` per further engine. The AR and its projector form one engine (`ARWithProjector`, they share an
optimizer). Cross-engine graphs (soft branch through the frozen AR, GAN term through the frozen discriminator) are
safe because the other engine's parameters do not require grad while its module is used (`gear_step.frozen`).
Engine choice, precision / compile checks and engine specifics: `distributed.py`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn

from .builders import TrainingData, TrainingModels, TrainingOptimization
from .config import TrainingConfig
from .distributed import (
    broadcast_buffers_like_ddp,
    check_hardware_choices,
    deepspeed_plugins,
    enable_fsdp_without_gpu,
    engine_modules,
    fsdp_plugin,
    fsdp_units_of,
    gathered_dtensors,
    register_zero3_embedding_tables,
    resolve_engine,
    unset_hf_deepspeed_config,
)
from .ema import EMA
from .gear_step import GEARModules, ModuleUpdate, unwrap


def build_accelerator(cfg: TrainingConfig, output_dir: Path):
    """The main `Accelerator`, the engine ("ddp" | "deepspeed" | "fsdp") and the DeepSpeed ZeRO stage (0 without).
    Checks the engine / precision / compile choice first: a choice that cannot work fails before any model exists."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    engine = resolve_engine(cfg)
    check_hardware_choices(cfg, engine)
    no_cuda = not torch.cuda.is_available()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if no_cuda and (world > 1 or engine == "deepspeed"):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed on CPU: see deepspeed_on_cpu.md
    log_with = None if cfg.train.report_to in (None, "", "none") else cfg.train.report_to
    output_dir.mkdir(parents=True, exist_ok=True)
    extra, zero_stage = {}, 0
    if engine == "deepspeed":
        plugins, zero_stage = deepspeed_plugins(cfg, world)
        extra["deepspeed_plugins"] = plugins
    else:
        extra["mixed_precision"] = cfg.train.mixed_precision
    if engine == "fsdp":
        extra["fsdp_plugin"] = plugin = fsdp_plugin()
    accelerator = Accelerator(
        cpu=no_cuda and engine != "deepspeed",  # without it, torchrun on a CPU box gives N independent runs
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        kwargs_handlers=handlers,
        **extra,
    )
    if engine == "deepspeed":
        unset_hf_deepspeed_config()
    if engine == "fsdp":
        enable_fsdp_without_gpu(accelerator, plugin)
    return accelerator, engine, zero_stage


def fp32_outputs(*modules: nn.Module | None) -> None:
    """Under bf16, accelerate's DDP preparation makes the prepared modules return fp32 outputs (a cast, exact); the
    same for the DeepSpeed / FSDP2 modules, so losses and the cross-engine passes see the same dtypes (and values)
    under every engine. (The discriminator runs in the losses' fp32 region under every engine.)"""
    from accelerate.utils import convert_outputs_to_fp32

    for module in modules:
        if module is not None:
            module.forward = MethodType(convert_outputs_to_fp32(module.forward.__func__), module)


def compile_modules(*modules: nn.Module | None) -> None:
    """`train.compile`: compile the hot modules in place (`nn.Module.compile`, inductor), as the official recipe
    compiles tokenizer, AR and loss: no wrapper, so state-dict names, `unwrap`, EMAs (copied before) and exports are
    unchanged, and every call of the module is compiled, the soft pass through the frozen AR and the GAN term
    through the frozen discriminator included. Two call patterns of the AR (soft: `input_probs`, eval,
    `stop_at_layer`; hard: `input_ids`, train) and train / eval switches each compile once: the cache limit leaves
    room for them (the official trainer sets the same limits)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    for module in modules:
        if module is not None:
            module.compile(backend="inductor", mode="default")


class ARWithProjector(nn.Module):
    """AR + projector as one module: DeepSpeed needs one engine per optimizer (they share `opt_ar`)."""

    def __init__(self, ar: nn.Module, projector: nn.Module):
        super().__init__()
        self.ar = ar
        self.projector = projector

    def forward(self, *args, **kwargs):
        return self.ar(*args, **kwargs)


class EngineEMA:
    """DeepSpeed / FSDP2: the EMA of one engine's bare module (`source`). `update()` reads the full live parameters
    of `source` (ZeRO-3: gathered for the update, re-partitioned after; FSDP2: all-gathered shards), whatever module
    the step passes (the AR engine's module is `ARWithProjector`, the EMA tracks the bare AR). The EMA itself is a
    whole fp32 copy on every rank. Everything else (`model`, `state_dict`, `load_state_dict`, `to`, ...) is the
    wrapped EMA's."""

    def __init__(self, ema, source: nn.Module, full_parameters):
        self.ema, self.source, self._full_parameters = ema, source, full_parameters

    def update(self, model: nn.Module | None = None) -> None:
        with self._full_parameters(self.source):
            self.ema.update(self.source)

    def __getattr__(self, name):
        if name == "ema":  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.ema, name)


# ------------------------------------------------------------------------------------------------------ prepared
@dataclass
class TrainingComponents:
    """Everything the loop touches, after preparation (DDP-wrapped modules / DeepSpeed engines)."""

    tokenizer: nn.Module
    ar: nn.Module | None
    projector: nn.Module | None
    discriminator: nn.Module | None
    opt_tok: Any
    opt_ar: Any
    opt_disc: Any
    sched_tok: Any
    sched_ar: Any
    sched_disc: Any
    tokenizer_ema: Any
    ar_ema: Any
    train_loader: Any
    text_conditioner: Any  # text-to-image: the frozen text encoder (on the device, never prepared)
    step_modules: GEARModules  # what the step functions receive
    trainable: list[nn.Module]  # for `accelerator.accumulate`


class TrainingEngines:
    """Prepares a stage's modules for its engine, sets the precision context of the step and knows how to read full
    parameters."""

    def __init__(self, cfg: TrainingConfig, accelerator, engine: str = "ddp", zero_stage: int = 0):
        self.cfg = cfg
        self.accelerator = accelerator
        self.engine = engine
        self.zero_stage = zero_stage
        self.extra_accelerators: dict[str, Any] = {}  # DeepSpeed / FSDP2: one per further engine, by module name

    @property
    def per_module(self) -> bool:
        """One engine (and accelerator) per trainable module."""
        return self.engine in ("deepspeed", "fsdp")

    @property
    def scheduler_steps_per_update(self) -> int:
        """AcceleratedScheduler steps `num_processes` times per optimizer step (split_batches=False); DeepSpeed
        engines step their scheduler once per optimizer step."""
        return 1 if self.engine == "deepspeed" else self.accelerator.num_processes

    def autocast(self):
        """The step's precision context: bf16 autocast with `train.mixed_precision=bf16` under every engine.
        (accelerate's own `autocast()` is a no-op under DeepSpeed, whose engines autocast only inside their forward;
        the soft pass and the GAN term call the other engines' modules directly.)"""
        if self.engine == "deepspeed":
            enabled = self.cfg.train.mixed_precision == "bf16"
            return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16, enabled=enabled)
        return self.accelerator.autocast()

    def prepare(self, data: TrainingData, models: TrainingModels, optim: TrainingOptimization) -> TrainingComponents:
        acc, stage = self.accelerator, self.cfg.train.stage
        # EMAs start as exact copies of the bare modules (identical on every rank: same seed / same files).
        decay = self.cfg.train.ema_decay
        tokenizer_ema = ar_ema = None
        if stage in (0, 1):
            tokenizer_ema = EMA(models.tokenizer, decay, include_buffers=True)
            if models.tokenizer_ema_init is not None:
                tokenizer_ema.model.load_state_dict(models.tokenizer_ema_init.state_dict())
        if stage in (1, 2):
            ar_ema = EMA(models.ar, decay, include_buffers=False)

        objects = {"tokenizer": models.tokenizer, "ar": models.ar, "projector": models.projector,
                   "discriminator": models.discriminator, "opt_tok": optim.opt_tok, "opt_ar": optim.opt_ar,
                   "opt_disc": optim.opt_disc, "sched_tok": optim.sched_tok, "sched_ar": optim.sched_ar,
                   "sched_disc": optim.sched_disc}
        if self.cfg.train.compile:
            compile_modules(None if stage == 2 else models.tokenizer, models.ar, models.discriminator)
        ar_for_steps = None  # DeepSpeed / FSDP2: the steps run the AR through its engine's root
        if self.per_module:
            if self.cfg.train.mixed_precision == "bf16":
                fp32_outputs(models.tokenizer if stage != 2 else None, models.ar, models.projector)
            loader, ar_for_steps = self._prepare_per_module(objects, data)
        else:
            names = [n for n, obj in objects.items() if obj is not None and not (stage == 2 and n == "tokenizer")]
            prepared = acc.prepare(*[objects[n] for n in names])
            prepared = prepared if isinstance(prepared, tuple) else (prepared,)
            objects.update(zip(names, prepared))
            disc = unwrap(objects["discriminator"]) if objects["discriminator"] is not None else None
            if disc is not None and "_original_forward" in vars(disc):
                # accelerate re-enables autocast inside each prepared module's forward; the discriminator runs in
                # the losses' fp32 region (as in the official code, where it is part of the unprepared loss
                # module, and as under DeepSpeed / FSDP2): undo it.
                disc.forward = disc._original_forward
            # Streaming data is sharded by the dataset itself (split_dataset_by_node).
            loader = data.dataloader if data.streaming else acc.prepare(data.dataloader)
        if self.per_module:
            if tokenizer_ema is not None:
                tokenizer_ema = EngineEMA(tokenizer_ema, unwrap(objects["tokenizer"]), self.full_parameters)
            if ar_ema is not None:
                ar_ema = EngineEMA(ar_ema, unwrap(objects["ar"]), self.full_parameters)

        device = acc.device
        if stage == 2:
            objects["tokenizer"].to(device)  # frozen: plain module on the device
        for module in (models.teacher, models.tokenizer_loss, models.text_conditioner):
            if module is not None:
                module.to(device)
        for ema in (tokenizer_ema, ar_ema):
            if ema is not None:
                ema.to(device)
                acc.register_for_checkpointing(ema)

        max_norm = self.cfg.optim.max_grad_norm
        accs = {name: self.extra_accelerators.get(name, acc) for name in ("tokenizer", "ar", "discriminator")}

        def update(name, model, opt, sched):
            return ModuleUpdate(accs[name], model, opt, sched, max_norm) if opt is not None else None

        o = objects
        step_modules = GEARModules(
            # DeepSpeed: the hard branch runs through the AR engine's forward (DeepSpeed's per-step backward
            # bookkeeping hangs on it); `unwrap` of it gives `ARWithProjector`, whose forward is the AR's (soft
            # branch; under ZeRO-3 its hooks gather the partitioned AR parameters). FSDP2: both branches call the
            # root `ARWithProjector` (its hooks all-gather the shards), the projector is a unit of its own.
            tokenizer=o["tokenizer"], ar=ar_for_steps or o["ar"], projector=o["projector"], teacher=models.teacher,
            tokenizer_loss=models.tokenizer_loss, discriminator=o["discriminator"],
            tokenizer_update=update("tokenizer", o["tokenizer"], o["opt_tok"], o["sched_tok"]),
            ar_update=update("ar", o["ar"], o["opt_ar"], o["sched_ar"]),
            discriminator_update=update("discriminator", o["discriminator"], o["opt_disc"], o["sched_disc"]),
            tokenizer_ema=tokenizer_ema, ar_ema=ar_ema, text_conditioner=models.text_conditioner,
        )
        trainable = [m for m in (None if stage == 2 else o["tokenizer"], o["ar"], o["projector"], o["discriminator"])
                     if m is not None]
        return TrainingComponents(
            tokenizer=o["tokenizer"], ar=o["ar"], projector=o["projector"], discriminator=o["discriminator"],
            opt_tok=o["opt_tok"], opt_ar=o["opt_ar"], opt_disc=o["opt_disc"], sched_tok=o["sched_tok"],
            sched_ar=o["sched_ar"], sched_disc=o["sched_disc"], tokenizer_ema=tokenizer_ema, ar_ema=ar_ema,
            train_loader=loader, text_conditioner=models.text_conditioner, step_modules=step_modules,
            trainable=trainable,
        )

    def _prepare_per_module(self, objects: dict[str, Any], data: TrainingData):
        """One engine per trainable module (see the module docstring). Updates `objects` in place; returns the
        data loader and the AR engine's root (or None).

        ZeRO-3 (parameters partitioned): the other engine's module is called directly (`unwrap(engine)`, i.e.
        `engine.module`), whose ZeRO-3 hooks gather its parameters for the forward and again for the backward;
        embedding tables read outside their own forward are registered with the engine's root module. FSDP2: each
        root is sharded into the units of `distributed.FSDP_UNITS`; roots are called directly (their hooks
        all-gather the shards). Both: the EMAs update from full parameters (`EngineEMA`) and exports gather the
        live weights."""
        from accelerate import Accelerator

        acc, deepspeed = self.accelerator, self.engine == "deepspeed"
        groups = {"tokenizer": ("tokenizer", "opt_tok", "sched_tok"), "ar": ("ar", "opt_ar", "sched_ar"),
                  "discriminator": ("discriminator", "opt_disc", "sched_disc")}
        loader, ar_root = data.dataloader, None
        for i, name in enumerate(engine_modules(self.cfg)):
            owner = acc if i == 0 else Accelerator()
            if i:
                self.extra_accelerators[name] = owner
            model_key, opt_key, sched_key = groups[name]
            module = objects[model_key]
            if name == "ar" and objects["projector"] is not None:
                module = ARWithProjector(objects["ar"], objects["projector"])
            prepare = [module, objects[opt_key], objects[sched_key]]
            if i == 0 and not data.streaming:
                prepare.append(data.dataloader)
            if deepspeed:
                acc.state.select_deepspeed_plugin(name)
                units = contextlib.nullcontext()
            else:
                units = fsdp_units_of(owner, name, module)
            with units:
                prepared = owner.prepare(*prepare)
            root = prepared[0]
            if deepspeed and self.zero_stage >= 3:
                register_zero3_embedding_tables(root.module)
            if not deepspeed:
                broadcast_buffers_like_ddp(root)
            objects[opt_key], objects[sched_key] = prepared[1], prepared[2]
            if i == 0 and not data.streaming:
                loader = prepared[3]
            if name == "ar" and objects["projector"] is not None:
                bare = root.module if deepspeed else root
                objects["ar"], objects["projector"] = bare.ar, bare.projector
                ar_root = root
            else:
                objects[model_key] = root
        if deepspeed:
            unset_hf_deepspeed_config()  # selecting a plugin registered it again (see `build_accelerator`)
        return loader, ar_root

    @contextlib.contextmanager
    def full_parameters(self, *modules: nn.Module | None):
        """Context in which `modules` hold their full parameters on every rank: under ZeRO-3 they are gathered on
        entry (a collective: every rank must enter) and re-partitioned on exit, under FSDP2 the shards are swapped
        for all-gathered copies (`distributed.gathered_dtensors`); read-only: changes are dropped. A no-op
        otherwise."""
        with contextlib.ExitStack() as stack:
            if self.zero_stage >= 3:
                import deepspeed

                for module in modules:
                    if module is not None:
                        stack.enter_context(deepspeed.zero.GatheredParameters(list(module.parameters()),
                                                                               modifier_rank=None))
            elif self.engine == "fsdp":
                stack.enter_context(gathered_dtensors(*modules))
            yield


__all__ = ["build_accelerator", "compile_modules", "TrainingEngines", "TrainingComponents", "ARWithProjector",
           "EngineEMA"]
