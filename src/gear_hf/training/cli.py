"""Command lines of the stage scripts (`scripts/train_tokenizer.py`, `train_gear.py`, `train_ar.py`,
`train_t2i.py`)."""

from __future__ import annotations

import argparse
import json
import sys

from .builders import TrainingSetupError
from .checkpointing import CheckpointCompatibilityError
from .builders import is_text_to_image
from .config import TrainingConfig
from .trainer import run_training

SCRIPTS = {0: "scripts/train_tokenizer.py", 1: "scripts/train_gear.py", 2: "scripts/train_ar.py",
           "t2i": "scripts/train_t2i.py"}
DESCRIPTIONS = {
    0: "GEAR stage 0: tokenizer warm-up (L1 + LPIPS + quantizer + GAN losses, tokenizer EMA).",
    1: "GEAR stage 1: joint tokenizer + AR training (soft branch → tokenizer, hard branch → AR, REPA on both); "
       "class- or text-conditional AR.",
    2: "GEAR stage 2: class-conditional AR training on a frozen tokenizer (NTP + optional REPA).",
    "t2i": "GEAR text-to-image: a text-conditional AR on a frozen tokenizer, captions encoded by a frozen text "
           "encoder (NTP + REPA; paper Table 17).",
}


def config_from_cli(config_path: str, overrides: list[str] | None = None, **cli) -> TrainingConfig:
    """`--config` + `--set section.key=value` + dedicated flags (`max_train_steps`, `output_dir`, ...)."""
    overrides = list(overrides or [])
    for key, section in (("max_train_steps", "train"), ("output_dir", "train"), ("stage", "train")):
        if cli.get(key) is not None:
            overrides.append(f"{section}.{key}={cli[key]}")
    return TrainingConfig.from_yaml(config_path, overrides)


def build_arg_parser(script: int | str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=DESCRIPTIONS[script],
        epilog="Multi-process: accelerate launch --config_file configs/accelerate/ddp.yaml "
               f"{SCRIPTS[script]} --config ... (CPU: configs/accelerate/ddp_cpu.yaml or torchrun).",
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


def script_for(cfg: TrainingConfig) -> str:
    """The script that trains `cfg` (stage 2 with captioned data is the text-to-image script)."""
    stage = cfg.train.stage
    return SCRIPTS["t2i" if stage == 2 and is_text_to_image(cfg) else stage]


def main(stage: int, argv: list[str] | None = None, *, text_to_image: bool = False) -> int:
    """Parse the command line of a stage script, build everything from the library and train."""
    script = "t2i" if text_to_image else stage
    args = build_arg_parser(script).parse_args(argv)
    overrides = list(args.overrides)
    if args.init_from is not None:
        overrides.append(f"train.init_from={args.init_from}")
    try:  # config errors (unknown key, τ <= 0, bad value, missing file): one clear message, no traceback
        cfg = config_from_cli(args.config, overrides, max_train_steps=args.max_train_steps,
                              output_dir=args.output_dir)
        if script_for(cfg) != SCRIPTS[script]:
            kind = "text-to-image " if is_text_to_image(cfg) else ""
            raise TrainingSetupError(
                f"{args.config} is a stage-{cfg.train.stage} {kind}config (data.source={cfg.data.source!r}); run it "
                f"with {script_for(cfg)} (this script trains: {DESCRIPTIONS[script].split(':')[0]})."
            )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = run_training(cfg, args.resume_from_checkpoint)
    except (TrainingSetupError, CheckpointCompatibilityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


__all__ = ["main", "build_arg_parser", "config_from_cli"]
