"""Engine plumbing: the accelerator, DDP or DeepSpeed preparation of the trainable modules, EMAs, and gathering
full parameters where the trainer reads whole weights.

DDP (and single process): one `Accelerator` prepares every module, optimizer and scheduler.
DeepSpeed (experimental): one engine, hence one accelerator, per trainable module (accelerate's multi-model
pattern): the first accelerator owns the tokenizer engine (stage 2: the AR) plus data, RNG and EMAs; one more
`Accelerator()` per further engine. The AR and its projector form one engine (`ARWithProjector`, they share an
optimizer). Cross-engine graphs (soft branch through the frozen AR, GAN term through the frozen discriminator) are
safe because the other engine's parameters do not require grad while its module is used (`gear_step.frozen`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .builders import TrainingData, TrainingModels, TrainingOptimization, TrainingSetupError
from .config import TrainingConfig
from .ema import EMA
from .gear_step import GEARModules, ModuleUpdate, unwrap


def build_accelerator(cfg: TrainingConfig, output_dir: Path):
    """The main `Accelerator` (DDP, single process or DeepSpeed) and the DeepSpeed ZeRO stage (0 without)."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    no_cuda = not torch.cuda.is_available()
    if cfg.train.deepspeed_config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # `accelerate launch --config_file configs/accelerate/deepspeed_zero*.yaml`: take its json.
        cfg.train.deepspeed_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    use_deepspeed = cfg.train.deepspeed_config is not None
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if no_cuda and (world > 1 or use_deepspeed):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed on CPU: see deepspeed_on_cpu.md
    log_with = None if cfg.train.report_to in (None, "", "none") else cfg.train.report_to
    output_dir.mkdir(parents=True, exist_ok=True)
    extra, zero_stage = {}, 0
    if use_deepspeed:
        plugins, zero_stage = deepspeed_plugins(cfg, world)
        extra["deepspeed_plugins"] = plugins
    else:
        extra["mixed_precision"] = cfg.train.mixed_precision
    accelerator = Accelerator(
        cpu=no_cuda and not use_deepspeed,  # without it, torchrun on a CPU box gives N independent runs
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        kwargs_handlers=handlers,
        **extra,
    )
    if use_deepspeed:
        unset_hf_deepspeed_config()
    return accelerator, zero_stage


# ------------------------------------------------------------------------------------------------------ DeepSpeed
def deepspeed_modules(cfg: TrainingConfig) -> list[str]:
    """Trainable modules of the stage, in engine order (the first one's accelerator is the main one)."""
    stage = cfg.train.stage
    names = {0: ["tokenizer"], 1: ["tokenizer", "ar"], 2: ["ar"]}[stage]
    if stage in (0, 1) and cfg.loss.gan_weight > 0:
        names.append("discriminator")
    return names


def deepspeed_plugins(cfg: TrainingConfig, world: int) -> tuple[dict[str, Any], int]:
    """One `DeepSpeedPlugin` per trainable module from `train.deepspeed_config` (json), with the batch sizes,
    clipping and precision filled in from the training config; and the ZeRO stage."""
    from accelerate.utils import DeepSpeedPlugin

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
    # exports) and registers the embedding tables that GEAR reads outside their own forward.
    zero_stage = int(base.get("zero_optimization", {}).get("stage", 0))
    per_device = cfg.train.train_batch_size // max(1, world)
    plugins = {}
    for name in deepspeed_modules(cfg):
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
    return plugins, zero_stage


def unset_hf_deepspeed_config() -> None:
    """Accelerate registers the selected DeepSpeed config with transformers (a global weakref). Under ZeRO-3 that
    makes `from_pretrained` build models inside `deepspeed.zero.Init` (partitioned while loading) and switches other
    transformers code paths; the trainer instead builds whole models on every rank (the EMAs start as exact copies)
    and `deepspeed.initialize` partitions them."""
    try:
        from transformers.integrations import unset_hf_deepspeed_config as unset
    except ImportError:
        return
    unset()


def register_zero3_embedding_tables(root: nn.Module) -> None:
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


class ARWithProjector(nn.Module):
    """AR + projector as one module: DeepSpeed needs one engine per optimizer (they share `opt_ar`)."""

    def __init__(self, ar: nn.Module, projector: nn.Module):
        super().__init__()
        self.ar = ar
        self.projector = projector

    def forward(self, *args, **kwargs):
        return self.ar(*args, **kwargs)


class EngineEMA:
    """DeepSpeed: the EMA of one engine's bare module (`source`). `update()` reads the full live parameters (ZeRO-3:
    gathered on every rank for the update, re-partitioned after) of `source`, whatever module the step passes (the
    AR engine's module is `ARWithProjector`, the EMA tracks the bare AR). Everything else (`model`, `state_dict`,
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


# ------------------------------------------------------------------------------------------------------ prepared
@dataclass
class TrainingComponents:
    """Everything the loop touches, after preparation (DDP-wrapped modules / DeepSpeed engines)."""

    tokenizer: nn.Module
    ar: nn.Module | None
    projector: nn.Module | None
    teacher: nn.Module | None
    discriminator: nn.Module | None
    tokenizer_loss: nn.Module | None
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
    """Prepares a stage's modules for its engine and knows how to read their full parameters."""

    def __init__(self, cfg: TrainingConfig, accelerator, zero_stage: int = 0):
        self.cfg = cfg
        self.accelerator = accelerator
        self.zero_stage = zero_stage
        self.extra_accelerators: dict[str, Any] = {}  # DeepSpeed: one per further engine, by module name

    @property
    def uses_deepspeed(self) -> bool:
        return self.cfg.train.deepspeed_config is not None

    @property
    def scheduler_steps_per_update(self) -> int:
        """AcceleratedScheduler steps `num_processes` times per optimizer step (split_batches=False); DeepSpeed
        engines step their scheduler once per optimizer step."""
        return 1 if self.uses_deepspeed else self.accelerator.num_processes

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
        ar_for_steps = None  # DeepSpeed: the steps run the AR through its engine
        if self.uses_deepspeed:
            loader, ar_for_steps = self._prepare_deepspeed(objects, data)
        else:
            names = [n for n, obj in objects.items() if obj is not None and not (stage == 2 and n == "tokenizer")]
            prepared = acc.prepare(*[objects[n] for n in names])
            prepared = prepared if isinstance(prepared, tuple) else (prepared,)
            objects.update(zip(names, prepared))
            # Streaming data is sharded by the dataset itself (split_dataset_by_node).
            loader = data.dataloader if data.streaming else acc.prepare(data.dataloader)
        if self.uses_deepspeed:
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
            # branch; under ZeRO-3 its hooks gather the partitioned AR parameters).
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
            tokenizer=o["tokenizer"], ar=o["ar"], projector=o["projector"], teacher=models.teacher,
            discriminator=o["discriminator"], tokenizer_loss=models.tokenizer_loss, opt_tok=o["opt_tok"],
            opt_ar=o["opt_ar"], opt_disc=o["opt_disc"], sched_tok=o["sched_tok"], sched_ar=o["sched_ar"],
            sched_disc=o["sched_disc"], tokenizer_ema=tokenizer_ema, ar_ema=ar_ema, train_loader=loader,
            text_conditioner=models.text_conditioner, step_modules=step_modules, trainable=trainable,
        )

    def _prepare_deepspeed(self, objects: dict[str, Any], data: TrainingData):
        """One engine per trainable module (see the module docstring). Updates `objects` in place; returns the
        data loader and the AR engine (or None).

        ZeRO-3 (parameters partitioned): the other engine's module is called directly (`unwrap(engine)`, i.e.
        `engine.module`), whose ZeRO-3 hooks gather its parameters for the forward and again for the backward;
        embedding tables read outside their own forward are registered with the engine's root module; the EMAs
        update from gathered parameters (`EngineEMA`) and exports gather the live weights."""
        from accelerate import Accelerator

        acc = self.accelerator
        groups = {"tokenizer": ("tokenizer", "opt_tok", "sched_tok"), "ar": ("ar", "opt_ar", "sched_ar"),
                  "discriminator": ("discriminator", "opt_disc", "sched_disc")}
        loader, ar_engine = data.dataloader, None
        for i, name in enumerate(deepspeed_modules(self.cfg)):
            owner = acc if i == 0 else Accelerator()
            if i:
                self.extra_accelerators[name] = owner
            acc.state.select_deepspeed_plugin(name)
            model_key, opt_key, sched_key = groups[name]
            module = objects[model_key]
            if name == "ar" and objects["projector"] is not None:
                module = ARWithProjector(objects["ar"], objects["projector"])
            prepare = [module, objects[opt_key], objects[sched_key]]
            if i == 0 and not data.streaming:
                prepare.append(data.dataloader)
            prepared = owner.prepare(*prepare)
            engine = prepared[0]
            if self.zero_stage >= 3:
                register_zero3_embedding_tables(engine.module)
            objects[opt_key], objects[sched_key] = prepared[1], prepared[2]
            if i == 0 and not data.streaming:
                loader = prepared[3]
            if name == "ar" and objects["projector"] is not None:
                objects["ar"], objects["projector"] = engine.module.ar, engine.module.projector
                ar_engine = engine
            else:
                objects[model_key] = engine
        unset_hf_deepspeed_config()  # selecting a plugin registered it again (see `build_accelerator`)
        return loader, ar_engine

    @contextlib.contextmanager
    def full_parameters(self, *modules: nn.Module | None):
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


__all__ = ["build_accelerator", "TrainingEngines", "TrainingComponents", "ARWithProjector", "EngineEMA"]
