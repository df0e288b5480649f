#!/usr/bin/env python
"""GEAR Stage 0 — tokenizer warm-up.

    python scripts/train_tokenizer.py --config configs/tiny/stage0.yaml --output-dir outputs/tiny-stage0
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_tokenizer.py --config <preset> \
        [--max-train-steps N] [--resume-from-checkpoint latest|PATH] [--set section.key=value ...]

See `gear_hf.training.trainer` for what is built, logged, checkpointed and exported.
"""

from gear_hf.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main(stage=0))
