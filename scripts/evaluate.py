"""Evaluation entry point: `python scripts/evaluate.py SUBCOMMAND [options]` (`--help` on each).

    accelerate launch scripts/evaluate.py sample --pipeline DIR --num-images 50000 --sample-dir runs/eval
    python scripts/evaluate.py gfid --samples runs/eval/samples.npz --reference VIRTUAL_imagenet256_labeled.npz
    python scripts/evaluate.py tokenizer --tokenizer DIR --data-source imagefolder --data imagenet/val
    python scripts/evaluate.py codebook --tokenizer DIR --data imagenet/val --plot usage.png
    python scripts/evaluate.py fd-dinov2 --samples S.npz --reference test_stats.npz --dinov2 DIR
    python scripts/evaluate.py coco --coco COCO_DIR --pipeline DIR --sample-dir runs/coco --clip DIR
    python scripts/evaluate.py representation --model gear=runs/s2/pipeline --model repa=runs/repa/pipeline \
        --teacher-path DINOV2_DIR --data imagefolder --data-path imagenet/val --output-dir runs/representation

Each subcommand is "module:function" taking the remaining arguments; adding one is one line.
"""

from gear_hf.evaluation.cli import main

SUBCOMMANDS = {
    "sample": "gear_hf.evaluation.cli:sample_main",
    "gfid": "gear_hf.evaluation.cli:gfid_main",
    "tokenizer": "gear_hf.evaluation.cli:tokenizer_main",
    "codebook": "gear_hf.evaluation.cli:codebook_main",
    "fd-dinov2": "gear_hf.evaluation.cli:fd_dinov2_main",
    "coco": "gear_hf.evaluation.cli:coco_main",
    "representation": "gear_hf.evaluation.representation:main",
}

if __name__ == "__main__":
    main(SUBCOMMANDS)
