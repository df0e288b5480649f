#!/usr/bin/env python
"""GEAR Stage 1 — GEAR joint tokenizer + AR training.

    python scripts/train_gear.py --config configs/tiny/stage1.yaml --output-dir outputs/tiny-stage1
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_gear.py --config <preset> \
        [--max-train-steps N] [--resume-from-checkpoint latest|PATH] [--set section.key=value ...]

See `gear_hf.training.trainer` for what is built, logged, checkpointed and exported.
"""

from gear_hf.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main(stage=1))
