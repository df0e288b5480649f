#!/usr/bin/env python
"""GEAR Stage 2 — class-conditional AR on a frozen tokenizer (text-to-image: scripts/train_t2i.py).

    python scripts/train_ar.py --config configs/tiny/stage2.yaml --output-dir outputs/tiny-stage2
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_ar.py --config <preset> \
        [--max-train-steps N] [--resume-from-checkpoint latest|PATH] [--set section.key=value ...]

See `gear_hf.training.trainer` for what is built, logged, checkpointed and exported.
"""

from gear_hf.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main(stage=2))
