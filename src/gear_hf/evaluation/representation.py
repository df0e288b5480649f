"""Where the alignment lives: the paper's representation analysis (Table 4, Figure 5, App. E; evaluation spec §5).

For every model (a tokenizer, optionally with its AR generator) and a frozen teacher (DINOv2 by default) it
measures, on the same images,

* the tokenizer's own features before (`pre`: encoder → quant_conv) and after (`post`: the quantized codes the
  decoder reads) quantization: Table 4;
* the AR's raw hidden state after every layer (layer 0 = the embedding output, layer ℓ = the residual stream after
  block ℓ, before the final norm and before any REPA projector): Figure 5;

against the teacher's patch tokens with CKNNA and linear CKA at two levels, plus two locality statistics:

* image level: every feature map is mean-pooled over its positions; CKA/CKNNA over `chunk_size` images (PRH's
  1,024 by default), reported as mean ± std over disjoint chunks (std null for a single chunk; a last partial
  chunk is left out);
* patch level: each image's grid² × d token matrix against the teacher's is one problem (n = grid²), reported as
  mean ± std over images;
* Moran's I and the FFT high-frequency ratio of each raw feature map on the token grid (and of the teacher's, the
  reference line), mean ± std over images.

Every CKA/CKNNA input goes through PRH's preprocessing first (clamp at the 95th percentile of |x| of the problem,
L2-normalise rows). Standard deviations are population (ddof = 0) ones.

Row/patch convention (the REPA convention of `training.gear_step.align_loss`): the AR runs teacher-forced on the
model's own tokens of the image, `input_ids = tokens[:, :-1]` with the true class label, in eval mode, and hidden
row p (row 0 = the class token) — the state that predicts image token p — is paired with teacher patch p and
placed at grid cell p (raster order) for Moran's I and the FFT ratio.

`main` is the command line (`scripts/evaluate.py representation`); it writes `representation.json` and a
Figure-5-style `representation.png`, and resumes from `representation_state.pt` after an interruption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .files import save_atomically
from .representation_stats import RepresentationStats

TOKENIZER_FEATURES = ("pre", "post")
DEFAULT_TEACHER_PATHS = {"dinov2": "facebook/dinov2-base"}  # ViT-B/14, the REPA teacher of the paper
STATE_FILE = "representation_state.pt"
JSON_FILE = "representation.json"
FIGURE_FILE = "representation.png"


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


class EvalImageDataset(torch.utils.data.Dataset):
    """Evaluation view of a `load_image_dataset` dataset: short side → `image_size` (PIL bicubic, antialiased),
    centre crop, uint8 (3, S, S); `label` is -1 when the dataset has none."""

    def __init__(self, dataset, image_size: int):
        self.dataset = dataset
        self.image_size = image_size
        self.has_labels = "label" in (dataset.features or {})

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from ..training.data import decode_image

        row = self.dataset[index]
        image = decode_image(row["image"]).convert("RGB")
        image = TF.resize(image, self.image_size, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, self.image_size)
        return {"pixel_values": TF.pil_to_tensor(image), "label": row["label"] if self.has_labels else -1}


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AnalysedModel:
    """A tokenizer and, optionally, the AR generator trained on its tokens."""

    name: str
    source: str
    tokenizer: torch.nn.Module
    ar: torch.nn.Module | None = None


def parse_model_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--model expects NAME=PATH (e.g. gear=runs/gear/pipeline), got {spec!r}.")
    return name, path


def _could_be_hub_id(path: str) -> bool:
    """A missing local path should fail as such, not as a Hub lookup."""
    return not path.startswith((".", "/", "~")) and path.count("/") == 1


def _load(model_class, path: str, what: str, subfolder: str | None = None):
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        return model_class.from_pretrained(path, **kwargs).eval()
    except OSError as error:
        where = f"{path!r}" + (f" (subfolder {subfolder}/)" if subfolder else "")
        raise FileNotFoundError(f"Could not load the {what} from {where}: {error}") from error


def load_analysed_model(name: str, path: str) -> AnalysedModel:
    """`path`: a pipeline directory (`vq_model/`, `transformer/`), a training output directory (`tokenizer/` and
    optionally `ar/`), a tokenizer directory (tokenizer-only analysis), or the Hub id of a pipeline."""
    from ..models.modeling_gear_ar import GEARForCausalImageLM
    from ..models.modeling_gear_tokenizer import GEARTokenizerModel

    root = Path(path)
    if root.is_dir():
        for tokenizer_dir, ar_dir in (("vq_model", "transformer"), ("tokenizer", "ar")):
            if (root / tokenizer_dir).is_dir():
                tokenizer = _load(GEARTokenizerModel, str(root / tokenizer_dir), f"{name!r} tokenizer")
                ar = None
                if (root / ar_dir).is_dir():
                    ar = _load(GEARForCausalImageLM, str(root / ar_dir), f"{name!r} AR")
                return AnalysedModel(name, path, tokenizer, ar)
        config = root / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        if model_type == "gear_tokenizer":
            return AnalysedModel(name, path, _load(GEARTokenizerModel, path, f"{name!r} tokenizer"))
        if model_type == "gear_ar":
            raise ValueError(
                f"--model {name}={path} is an AR model alone; the analysis needs the tokenizer whose tokens it reads. "
                "Pass the pipeline directory (vq_model/ + transformer/) or the training output directory instead."
            )
        raise FileNotFoundError(
            f"--model {name}={path}: no GEAR weights found. Expected a pipeline directory (vq_model/, transformer/), "
            "a training output directory (tokenizer/ [, ar/]) or a tokenizer directory (config.json with "
            "model_type gear_tokenizer + model.safetensors)."
        )
    if not _could_be_hub_id(path):
        raise FileNotFoundError(f"--model {name}={path}: no such directory (and not a Hub id of the form org/name).")
    tokenizer = _load(GEARTokenizerModel, path, f"{name!r} tokenizer", subfolder="vq_model")
    ar = _load(GEARForCausalImageLM, path, f"{name!r} AR", subfolder="transformer")
    return AnalysedModel(name, path, tokenizer, ar)


def token_grid(models: list[AnalysedModel], image_size: int) -> int:
    """The common token grid side of all models at `image_size`; raises on any mismatch."""
    from ..pipelines.pipeline_gear import check_components_compatible

    grids = {}
    for model in models:
        factor = model.tokenizer.config.downsample_factor
        if image_size % factor:
            raise ValueError(
                f"--image-size {image_size} is not a multiple of the {model.name!r} tokenizer's downsample factor "
                f"{factor}; use e.g. {model.tokenizer.config.image_size}."
            )
        grid = grids[model.name] = image_size // factor
        if model.ar is not None:
            check_components_compatible(model.tokenizer, model.ar)
            if model.ar.config.grid_size != grid:
                raise ValueError(
                    f"--image-size {image_size} gives a {grid}x{grid} token grid for {model.name!r}, but its AR models "
                    f"a {model.ar.config.grid_size}x{model.ar.config.grid_size} grid: use --image-size "
                    f"{model.ar.config.grid_size * factor}."
                )
    if len(set(grids.values())) > 1:
        raise ValueError(
            f"The models have different token grids at {image_size} px ({grids}); the analysis compares them on one "
            "grid (the teacher's patches). Compare models with the same downsample factor."
        )
    return next(iter(grids.values()))


# ---------------------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------------------


def load_analysis_teacher(name: str, path: str | None, grid: int, image_size: int, device) -> torch.nn.Module:
    """The REPA teacher (`training.alignment.load_teacher`) on the token grid, checked on one probe image."""
    from ..training.alignment import TEACHERS, load_teacher

    if name not in TEACHERS:
        raise ValueError(f"Unknown teacher {name!r}; choose one of {sorted(TEACHERS)}.")
    path = path if path is not None else DEFAULT_TEACHER_PATHS.get(name)
    if path is None and name != "efficientnet-lite0":  # efficientnet-lite0 without a path = the bundled weights
        raise ValueError(f"The {name} teacher needs --teacher-path (a local directory or Hub id).")
    if path is not None and not os.path.exists(path) and not _could_be_hub_id(path):
        raise FileNotFoundError(f"--teacher-path {path}: no such file or directory (and not a Hub id org/name).")
    try:
        teacher = load_teacher(name, path, grid).to(device)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load the {name} teacher weights from {path!r}: {error}\nWithout network (HF_HUB_OFFLINE=1) "
            "pass --teacher-path a local directory holding its config.json and weights (evaluation spec §6)."
        ) from error
    probe = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)
    with torch.no_grad():
        patches = teacher.patch_tokens(teacher.preprocess(probe)).shape[1]
    if patches != grid * grid:
        raise ValueError(
            f"The {name} teacher's patch grid does not match the {grid}x{grid} token grid: it gives {patches} patch "
            f"tokens for {image_size} px images, the tokens are {grid * grid}. Use a teacher that resizes its input "
            "to the token grid (dinov2, efficientnet-lite0) or an --image-size at which both grids agree."
        )
    return teacher


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


def to_tokens(latent: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) → (B, h·w, D), raster order."""
    return latent.flatten(2).transpose(1, 2)


def tokenizer_features(tokenizer, images_uint8: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({"pre": latent z, "post": quantized codes}, each (B, L, D); hard tokens (B, L))."""
    from ..training.gear_step import to_signed_unit

    out = tokenizer.encode(to_signed_unit(images_uint8), return_latent=True)
    return {"pre": to_tokens(out.latent), "post": to_tokens(out.quantized)}, out.indices.flatten(1)


def ar_hidden_features(ar, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Raw hidden states (embeddings, after block 1, ..., after block n), each (B, L, D); row p predicts token p."""
    out = ar(input_ids=tokens[:, :-1], class_labels=labels, output_hidden_states=True,
             stop_at_layer=ar.config.num_hidden_layers)
    return tuple(h[:, ar.config.cls_token_num - 1:] for h in out.hidden_states)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AnalysisSettings:
    topk: int = 10
    outlier_quantile: float = 0.95
    chunk_size: int = 1024
    batch_size: int = 16
    num_workers: int = 0
    save_every: int = 50  # batches between resumable state files
    progress: bool = True


def check_sizes(num_images: int, grid: int, settings: AnalysisSettings) -> int:
    """The image-level chunk size actually used (min of chunk_size and the images); raises when CKNNA's top-k
    neighbours (or the unbiased HSIC's n > 3) do not fit."""
    if settings.topk < 2:
        raise ValueError(f"--topk must be >= 2 (PRH's CKNNA), got {settings.topk}.")
    chunk = min(settings.chunk_size, num_images)
    if chunk < max(settings.topk + 1, 4):
        raise ValueError(
            f"Image-level CKNNA with --topk {settings.topk} needs at least {max(settings.topk + 1, 4)} images per "
            f"chunk, but there are {num_images} images and --chunk-size {settings.chunk_size}. Use more images "
            "(--num-images) or a smaller --topk."
        )
    if grid * grid < max(settings.topk + 1, 4):
        raise ValueError(
            f"Patch-level CKNNA with --topk {settings.topk} needs at least {max(settings.topk + 1, 4)} patches per "
            f"image, but the token grid is {grid}x{grid}. Use larger images or a smaller --topk."
        )
    return chunk


def _group_labels(models: list[AnalysedModel]) -> dict[str, list]:
    labels = {}
    for model in models:
        labels[f"{model.name}/tokenizer"] = list(TOKENIZER_FEATURES)
        if model.ar is not None:
            labels[f"{model.name}/ar"] = list(range(model.ar.config.num_hidden_layers + 1))
    return labels


def _check_labels(models: list[AnalysedModel], dataset: EvalImageDataset) -> None:
    ars = [m for m in models if m.ar is not None]
    if not ars:
        return
    if not dataset.has_labels:
        raise ValueError(
            f"The AR analysis of {[m.name for m in ars]} runs teacher-forced on the true class labels, but the images "
            "have none. Use an image folder with one sub-folder per class (or a dataset with a label column)."
        )
    labels = torch.tensor(list(dataset.dataset["label"]), dtype=torch.int64)
    for model in ars:
        model.ar.check_class_labels(labels, allow_null=False)


@torch.no_grad()
def _extract(models: list[AnalysedModel], images: torch.Tensor, labels: torch.Tensor) -> dict:
    features = {}
    for model in models:
        tok_features, tokens = tokenizer_features(model.tokenizer, images)
        features[f"{model.name}/tokenizer"] = tuple(tok_features[k] for k in TOKENIZER_FEATURES)
        if model.ar is not None:
            features[f"{model.name}/ar"] = ar_hidden_features(model.ar, tokens, labels)
    return features


def analyse(models: list[AnalysedModel], teacher, dataset: EvalImageDataset, grid: int,
            settings: AnalysisSettings, state_path: Path | None = None, fingerprint: str = "",
            device="cpu") -> dict:
    """Run the analysis over `dataset` (in order) and return the summary; resumes from / saves to `state_path`."""
    from tqdm.auto import tqdm

    chunk = check_sizes(len(dataset), grid, settings)
    _check_labels(models, dataset)
    stats = RepresentationStats(_group_labels(models), grid, settings.topk, settings.outlier_quantile, chunk)
    done = 0
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"{state_path} holds a partial analysis of another configuration (models, teacher, data or "
                "settings differ). Delete it or choose another --output-dir."
            )
        stats.load_state_dict(state["stats"])
        done = state["images_done"]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(done, len(dataset))),
                                         batch_size=settings.batch_size, num_workers=settings.num_workers)
    progress = tqdm(total=len(dataset), initial=done, unit="img", desc="representation",
                    disable=not settings.progress)
    for step, batch in enumerate(loader, start=1):
        images, labels = batch["pixel_values"].to(device), batch["label"].to(device)
        with torch.no_grad():
            teacher_features = teacher(images)
        stats.add_batch(teacher_features, _extract(models, images, labels))
        done += images.shape[0]
        progress.update(images.shape[0])
        if state_path is not None and (step % settings.save_every == 0) and done < len(dataset):
            state = {"fingerprint": fingerprint, "images_done": done, "stats": stats.state_dict()}
            save_atomically(lambda p: torch.save(state, p), state_path)
    progress.close()
    summary = stats.summary()
    summary["num_images"], summary["image_level_chunk_size"] = len(dataset), chunk
    summary["image_level_chunks"] = len(dataset) // chunk
    return summary


def build_report(summary: dict, models: list[AnalysedModel], config: dict) -> dict:
    """The JSON layout: {"config", "teacher", "models": {name: {"source", "tokenizer": {pre|post: {metric:
    {mean, std}}}, "ar": {"layers": [0..n], metric: {"mean": [...], "std": [...]}}}}}."""
    groups = summary["groups"]
    report = {"config": {**config, "num_images": summary["num_images"],
                         "image_level_chunk_size": summary["image_level_chunk_size"],
                         "image_level_chunks": summary["image_level_chunks"]},
              "teacher": summary["teacher"],
              "models": {}}
    for model in models:
        tokenizer = groups[f"{model.name}/tokenizer"]
        entry = {"source": model.source, "tokenizer": {}}
        for f, feature in enumerate(TOKENIZER_FEATURES):
            entry["tokenizer"][feature] = {
                m: None if s is None else {"mean": s["mean"][f], "std": None if s["std"] is None else s["std"][f]}
                for m, s in tokenizer.items()}
        if model.ar is not None:
            entry["ar"] = {"layers": list(range(model.ar.config.num_hidden_layers + 1)),
                           **groups[f"{model.name}/ar"]}
        report["models"][model.name] = entry
    return report


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py representation",
        description="CKNNA / CKA of tokenizer features and AR hidden states against a teacher, Moran's I and the "
                    "FFT high-frequency ratio (paper Table 4, Figure 5).")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a pipeline dir (vq_model/, transformer/), a training output dir (tokenizer/[, ar/]), "
                             "a tokenizer dir, or a pipeline Hub id; repeat to compare models")
    parser.add_argument("--teacher", default="dinov2", help="teacher name (training.alignment.TEACHERS)")
    parser.add_argument("--teacher-path", default=None,
                        help="local dir or Hub id of the teacher weights (dinov2: facebook/dinov2-base)")
    parser.add_argument("--data", default="imagefolder", choices=["imagefolder", "hub", "fashion-mnist"])
    parser.add_argument("--data-path", default=None, help="image folder (<root>/<class>/<image>) or Hub dataset id")
    parser.add_argument("--split", default="train", help="dataset split (an image folder is its 'train' split)")
    parser.add_argument("--num-images", type=int, default=None, help="use the first N images (default: all)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels; must give the models' token grid (default: the first tokenizer's image_size)")
    parser.add_argument("--topk", type=int, default=10, help="CKNNA neighbours (PRH default 10)")
    parser.add_argument("--outlier-quantile", type=float, default=0.95, help="PRH clamp quantile of |x|")
    parser.add_argument("--chunk-size", type=int, default=1024, help="images per image-level CKA/CKNNA problem")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--align-layer", type=int, default=None, help="REPA layer ℓ, drawn as a band in the figure")
    parser.add_argument("--save-every", type=int, default=50, help="batches between resumable state files")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--output-dir", required=True)
    return parser


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def run(args: argparse.Namespace) -> dict:
    from ..training.data import load_image_dataset
    from .representation_report import format_table4, plot_representation

    specs = [parse_model_spec(spec) for spec in args.model]
    if len({name for name, _ in specs}) != len(specs):
        raise ValueError(f"--model names must be unique, got {[name for name, _ in specs]}.")
    for value, flag in ((args.batch_size, "--batch-size"), (args.chunk_size, "--chunk-size"),
                        (args.save_every, "--save-every")):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}.")
    if not 0 < args.outlier_quantile <= 1:
        raise ValueError(f"--outlier-quantile must be in (0, 1], got {args.outlier_quantile}.")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 features (spec §5.1)
    torch.backends.cudnn.allow_tf32 = False
    models = [load_analysed_model(name, path) for name, path in specs]
    for model in models:
        model.tokenizer.to(args.device).check_input_range = False  # inputs are built from uint8 here
        if model.ar is not None:
            model.ar.to(args.device)
    image_size = args.image_size or models[0].tokenizer.config.image_size
    grid = token_grid(models, image_size)
    teacher = load_analysis_teacher(args.teacher, args.teacher_path, grid, image_size, args.device)
    dataset = EvalImageDataset(
        load_image_dataset(args.data, args.data_path, split=args.split, max_samples=args.num_images), image_size)

    config = {"models": dict(specs), "teacher": args.teacher,
              "teacher_path": args.teacher_path or DEFAULT_TEACHER_PATHS.get(args.teacher),
              "data": args.data, "data_path": args.data_path, "split": args.split, "image_size": image_size,
              "grid_size": grid, "topk": args.topk, "outlier_quantile": args.outlier_quantile,
              "chunk_size": args.chunk_size, "cka": "linear, biased HSIC", "cknna": "PRH, unbiased HSIC",
              "patch_level": "per image (n = grid_size^2), mean/std over images",
              "image_level": "mean-pooled positions, per chunk of images, mean/std over chunks",
              "ar_rows": "row p (row 0 = class token) predicts token p and pairs with teacher patch p",
              "hf_cutoff": 0.25, "morans_i_weights": "rook"}
    settings = AnalysisSettings(topk=args.topk, outlier_quantile=args.outlier_quantile, chunk_size=args.chunk_size,
                                batch_size=args.batch_size, num_workers=args.num_workers,
                                save_every=args.save_every, progress=not args.no_progress)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint({**config, "num_images": len(dataset)})
    summary = analyse(models, teacher, dataset, grid, settings, output_dir / STATE_FILE, fingerprint, args.device)
    report = build_report(summary, models, config)

    def write_json(path):
        path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")

    save_atomically(write_json, output_dir / JSON_FILE)
    if any(model.ar is not None for model in models):
        save_atomically(lambda p: plot_representation(report, p, align_layer=args.align_layer),
                         output_dir / FIGURE_FILE)
    (output_dir / STATE_FILE).unlink(missing_ok=True)
    print(format_table4(report))
    return report


def main(argv: list[str] | None = None) -> int:
    """`evaluate.py representation ...`: 0 on success, 2 with one error line on bad input or missing weights."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"representation: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {Path(args.output_dir) / JSON_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
