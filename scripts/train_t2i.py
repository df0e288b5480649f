#!/usr/bin/env python
"""GEAR text-to-image — a text-conditional AR on a frozen tokenizer (paper Table 17).

    python scripts/train_t2i.py --config configs/tiny/t2i.yaml --output-dir outputs/tiny-t2i
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_t2i.py --config configs/t2i/gear_1b.yaml \
        [--max-train-steps N] [--resume-from-checkpoint latest|PATH] [--set section.key=value ...]

See `gear_hf.training.trainer` for what is built, logged, checkpointed and exported.
"""

from gear_hf.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main(stage=2, text_to_image=True))
