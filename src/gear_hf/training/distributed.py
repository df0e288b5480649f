"""What differs between the engines (DDP, DeepSpeed, FSDP2): choosing one and checking the precision / compile
choice against it and the hardware (before any model is built), DeepSpeed plugins, the FSDP2 plugin and sharding
units, and full views of sharded / partitioned parameters.

Precision is the same under every engine: fp32 weights (the master weights: what the optimizers update, the EMAs
track and the exports write) and, with `train.mixed_precision=bf16`, bf16 autocast compute, as in the official
recipe. DeepSpeed gets it from its `torch_autocast` mode (fp32 module weights, gradients reduced in fp32 like
DDP), FSDP2 from a `MixedPrecisionPolicy` that all-gathers and reduces in fp32 plus autocast. DeepSpeed's `bf16`
mode and FSDP2's bf16 `param_dtype` would instead hand the modules bf16 weights: the VQ codebook would enter the
fp32 distance computation already rounded to bf16 (and the quantizer, which runs outside autocast, would see
mixed dtypes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .builders import TrainingSetupError
from .config import TrainingConfig


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() == "true"


def resolve_engine(cfg: TrainingConfig) -> str:
    """"ddp" (also one process), "deepspeed" or "fsdp", from the config or an `accelerate launch --config_file`
    environment; one clear error for a contradictory or unsupported choice. Fills `train.deepspeed_config` /
    `train.fsdp` from the launcher's environment."""
    t = cfg.train
    if t.deepspeed_config is None and _env_true("ACCELERATE_USE_DEEPSPEED"):
        # `accelerate launch --config_file configs/accelerate/deepspeed_zero*.yaml`: take its json.
        t.deepspeed_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    if not t.fsdp and _env_true("ACCELERATE_USE_FSDP"):
        t.fsdp = True
    if t.fsdp and t.deepspeed_config is not None:
        raise TrainingSetupError(
            f"Both FSDP (train.fsdp / an accelerate FSDP config) and DeepSpeed (train.deepspeed_config="
            f"{t.deepspeed_config}) are selected: pick one engine (configs/accelerate/fsdp.yaml or "
            "configs/accelerate/deepspeed_zero*.yaml).")
    if t.fsdp:
        version = os.environ.get("FSDP_VERSION", "2")
        if version != "2":
            raise TrainingSetupError(f"FSDP version {version} is selected (fsdp_version in the accelerate config); "
                                     "gear_hf supports FSDP2 only: set fsdp_version: 2 (configs/accelerate/fsdp.yaml).")
        return "fsdp"
    return "deepspeed" if t.deepspeed_config is not None else "ddp"


def check_hardware_choices(cfg: TrainingConfig, engine: str) -> None:
    """Precision, compile and engine options that cannot work here fail now, with the fix in the message."""
    t = cfg.train
    cuda = torch.cuda.is_available()
    if t.mixed_precision == "fp16":
        if not cuda:
            raise TrainingSetupError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling); on this machine "
                                     "use bf16 or no.")
        if engine != "ddp":
            raise TrainingSetupError(f"train.mixed_precision=fp16 is supported with DDP only, not {engine}: use bf16.")
    if t.mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise TrainingSetupError(f"train.mixed_precision=bf16: this GPU ({torch.cuda.get_device_name()}) has no "
                                 "native bf16 (compute capability < 8.0). Use train.mixed_precision=no.")
    if engine != "ddp" and cfg.gear.straight_through_ntp:
        # Checked here, not in TrainingConfig.validate: the engine may come from the launcher's environment.
        raise TrainingSetupError(f"gear.straight_through_ntp (one joint backward through tokenizer and AR) is not "
                                 f"supported with the {engine} engine (one engine per module): use DDP, or set "
                                 "gear.straight_through_ntp=false.")
    if engine != "ddp" and t.gradient_accumulation_steps != 1:
        raise TrainingSetupError(f"The {engine} engine supports train.gradient_accumulation_steps=1 only "
                                 "(raise train.train_batch_size instead, or use DDP).")
    if engine == "fsdp":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2:
            raise TrainingSetupError("FSDP shards over processes: launch it with several (accelerate launch "
                                     "--config_file configs/accelerate/fsdp.yaml, or torchrun --nproc_per_node N).")
    if t.compile:
        if cuda and importlib.util.find_spec("triton") is None:
            raise TrainingSetupError("train.compile=true needs triton on CUDA (pip install triton), or set "
                                     "train.compile=false.")
        if not cuda and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
            raise TrainingSetupError("train.compile=true on CPU needs a C++ compiler for inductor (g++ / clang++, or "
                                     "$CXX); install one or set train.compile=false.")


def engine_modules(cfg: TrainingConfig) -> list[str]:
    """Trainable modules of the stage, in engine order (the first one's accelerator is the main one)."""
    stage = cfg.train.stage
    names = {0: ["tokenizer"], 1: ["tokenizer", "ar"], 2: ["ar"]}[stage]
    if stage in (0, 1) and cfg.loss.gan_weight > 0:
        names.append("discriminator")
    return names


# ------------------------------------------------------------------------------------------------------ DeepSpeed
def deepspeed_plugins(cfg: TrainingConfig, world: int) -> tuple[dict[str, Any], int]:
    """One `DeepSpeedPlugin` per trainable module from `train.deepspeed_config` (json), with the batch sizes,
    clipping and precision filled in from the training config; and the ZeRO stage."""
    from accelerate.utils import DeepSpeedPlugin

    path = Path(cfg.train.deepspeed_config)
    if not path.is_file():
        raise TrainingSetupError(f"train.deepspeed_config: {path} not found.")
    base = json.loads(path.read_text())
    for key in ("bf16", "fp16"):
        if str(base.get(key, {}).get("enabled", "false")).lower() == "true":
            raise TrainingSetupError(
                f"{path} enables DeepSpeed's {key} mode, which gives the modules {key} weights. Remove the \"{key}\" "
                "block: precision comes from train.mixed_precision (bf16 = DeepSpeed torch_autocast, fp32 weights).")
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise TrainingSetupError("train.deepspeed_config needs `pip install deepspeed` (>= 0.19.8).") from error
    # ZeRO-3 partitions the parameters: the trainer gathers them where it reads full weights (EMA updates,
    # exports) and registers the embedding tables that GEAR reads outside their own forward.
    zero_stage = int(base.get("zero_optimization", {}).get("stage", 0))
    per_device = cfg.train.train_batch_size // max(1, world)
    plugins = {}
    for name in engine_modules(cfg):
        ds = json.loads(json.dumps(base))
        ds.update({
            "train_batch_size": cfg.train.train_batch_size,
            "train_micro_batch_size_per_gpu": per_device,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.optim.max_grad_norm,
        })
        ds.pop("bf16", None)
        ds.pop("fp16", None)
        if cfg.train.mixed_precision == "bf16" and name != "discriminator":
            # fp32 weights, bf16 autocast inside the engine's forward (the trainer also autocasts the cross-engine
            # passes); no module listed as "lower precision safe": gradients are reduced in fp32, as under DDP.
            # Not for the discriminator: it runs in the losses' fp32 region, which the engine would re-enable.
            autocast = ds.get("torch_autocast", {})
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                    "lower_precision_safe_modules": autocast.get("lower_precision_safe_modules", [])}
        else:
            ds.pop("torch_autocast", None)
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


# ---------------------------------------------------------------------------------------------------------- FSDP2
# Sharding units below each root (the root module of every engine is a unit too). Embedding tables stay in their
# root's unit: GEAR reads them outside the `nn.Embedding` forward (soft read-out, codebook distances), which is
# safe only while the whole root is unsharded (its forward and backward). The projector is a unit of its own
# because the step calls it outside the AR's forward.
FSDP_UNITS = {"tokenizer": ("ConvEncoder", "ConvDecoder", "Magvit2Encoder", "Magvit2Decoder"),
              "ar": ("GEARDecoderLayer", "ProjectorBank"), "discriminator": ()}


def fsdp_plugin():
    """accelerate's FSDP2 plugin: full sharding, fp32 all-gathers and gradient reduce-scatters (bf16 compute comes
    from autocast, see the module docstring), sharded (DCP) checkpoints, whole models built on every rank."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[], state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False,
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32),
    )


def enable_fsdp_without_gpu(accelerator, plugin) -> None:
    """accelerate 1.15 switches to FSDP only for GPU-like process groups (`AcceleratorState.__init__` enables it in
    its MULTI_GPU / MULTI_XPU / ... branch, not for MULTI_CPU) and otherwise silently trains with DDP. torch's FSDP2
    itself runs on CPU over gloo, and so do accelerate's FSDP2 prepare / save_state / load_state: select it."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise TrainingSetupError(f"FSDP needs a multi-process launch; accelerate reports {state.distributed_type}.")
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin


@contextlib.contextmanager
def fsdp_units_of(accelerator, name: str, module: nn.Module):
    """Within the block, `accelerator.prepare` shards `module` into the units of `FSDP_UNITS[name]` present in it.
    accelerate also carves `get_input_embeddings()` into a unit of its own: hidden here (the tokenizer has none,
    transformers raises; the AR engine's root `ARWithProjector` has none by design)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    present = {type(m).__name__ for m in module.modules()}
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = [c for c in FSDP_UNITS[name] if c in present]
    hidden = "get_input_embeddings" in dir(module)
    if hidden:
        module.get_input_embeddings = lambda: None
    try:
        yield
    finally:
        if hidden:
            del module.get_input_embeddings


def broadcast_buffers_like_ddp(root: nn.Module) -> None:
    """FSDP2 shards parameters only; buffers (the discriminator's BatchNorm statistics) stay per rank, and a sharded
    checkpoint stores one copy of them, from any rank. After every forward of `root` all ranks take rank 0's
    buffers: rank 0's statistics evolve from its own batches exactly as under DDP (which broadcasts rank 0's
    buffers before each forward), every rank holds them, and a resume is exact."""
    import torch.distributed as dist

    buffers = list(root.buffers())
    if not buffers:
        return

    def hook(module, args, output):
        with torch.no_grad():
            for buffer in buffers:
                dist.broadcast(buffer, src=0)

    root.register_forward_hook(hook)


@contextlib.contextmanager
def gathered_dtensors(*modules: nn.Module | None):
    """FSDP2: inside the block, every sharded parameter (DTensor) of `modules` is replaced by a plain full copy
    (all-gathered, no grad), so EMA updates and `save_pretrained` see whole weights; the shards are put back on exit
    (read-only view: changes are dropped). Collective: every rank must enter, in the same order."""
    from torch.distributed.tensor import DTensor

    swapped = []
    try:
        with torch.no_grad():
            for module in modules:
                if module is None:
                    continue
                for sub in module.modules():
                    for key, param in list(sub._parameters.items()):
                        if isinstance(param, DTensor):
                            sub._parameters[key] = nn.Parameter(param.full_tensor(), requires_grad=False)
                            swapped.append((sub, key, param))
        yield
    finally:
        for sub, key, param in reversed(swapped):
            sub._parameters[key] = param


__all__ = ["resolve_engine", "check_hardware_choices", "engine_modules", "deepspeed_plugins",
           "unset_hf_deepspeed_config", "register_zero3_embedding_tables", "FSDP_UNITS", "fsdp_plugin",
           "enable_fsdp_without_gpu", "fsdp_units_of", "broadcast_buffers_like_ddp", "gathered_dtensors"]
