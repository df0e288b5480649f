"""Text-to-image metrics as GEAR's scripts compute them.

GPIC (`src/eval/gpic/gpic_eval_dino.py`, a port of the GPIC toolkit / dgm-eval / clovaai-prdc):
* DINOv2 features: PIL `Resize((224, 224), BICUBIC)` → [0, 1] → ImageNet mean/std → the CLS token after the
  final LayerNorm (`pooler_output` of `transformers.Dinov2Model`). The torch-hub model resamples its 37×37
  position table with `scale_factor = (16 + 0.1) / 37`; transformers resamples to `size = 16`. `pos_embed="hub"`
  (default) installs the hub's rule on the transformers model so the features follow the GPIC toolkit.
* FD-DINOv2 against `dino_mu/dino_sigma` (plus its mean and trace terms), PRDC (Naeem et al.: k = 5, Euclidean
  distances, strict `<`, at most 10,000 per side) and the polynomial-kernel MMD (KID estimator, (xᵀy/d + 1)³,
  100 subsets of min(1000, n)). The toolkit subsamples with the unseeded global NumPy RNG; here a seeded
  `np.random.default_rng(seed)` (recorded in the output). Distances and kernels are computed in float64.

COCO (`src/coco_fid.py`): both image sets short-side bicubic-resized to 256 (`round`, at least 256) and center
cropped (floor offsets), FID with pytorch-fid's input pipeline, and CLIPScore = 100 · mean cosine of the CLIP image
and text embeddings (GEAR's definition). Hessel et al.'s 2.5 · max(cos, 0) and torchmetrics' max(100 · cos, 0) are
reported beside it under their own keys.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .frechet import FIDStatistics, frechet_distance_stats

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GPIC_METRICS = ("fd", "prdc", "mmd")
PRDC_MAX_SAMPLES = 10_000
CLIP_SCORE_DEFINITION = "100 * mean(cos(image_embeds, text_embeds)) (GEAR src/coco_fid.py; no clamp, no 2.5 weight)"


# ---------------------------------------------------------------------------------------------------------------
# DINOv2 features
# ---------------------------------------------------------------------------------------------------------------


def dinov2_inputs(images_uint8: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 (N, H, W, 3) → (N, 3, size, size): PIL bicubic squash resize, [0, 1], ImageNet normalisation."""
    arrays = [np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((size, size), Image.BICUBIC))
              for im in images_uint8]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _hub_interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """facebookresearch/dinov2's `interpolate_pos_encoding` (interpolate_offset 0.1, no antialias)."""
    num_patches, num_positions = embeddings.shape[1] - 1, self.position_embeddings.shape[1] - 1
    if num_patches == num_positions and height == width:
        return self.position_embeddings
    patch_h, patch_w = self.patch_embeddings.patch_size
    h0, w0 = height // patch_h, width // patch_w
    side = int(math.sqrt(num_positions))
    dim = embeddings.shape[-1]
    table = self.position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    table = F.interpolate(table.float(), scale_factor=((w0 + 0.1) / side, (h0 + 0.1) / side), mode="bicubic",
                          antialias=False).to(self.position_embeddings.dtype)
    if tuple(table.shape[-2:]) != (w0, h0):
        raise ValueError(f"Position-table resampling gave {tuple(table.shape[-2:])}, expected {(w0, h0)}.")
    return torch.cat([self.position_embeddings[:, :1], table.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


class DINOv2Extractor:
    """CLS features of a `transformers.Dinov2Model` (from a local path or Hub id, fp32, eval) on GPIC's input."""

    def __init__(self, model, device: str | torch.device = "cpu", batch_size: int = 64, pos_embed: str = "hub",
                 progress: bool = True):
        if pos_embed not in ("hub", "transformers"):
            raise ValueError(f"pos_embed must be 'hub' or 'transformers', got {pos_embed!r}.")
        self.model = model.to(device).float().eval().requires_grad_(False)
        if pos_embed == "hub":
            embeddings = self.model.embeddings
            embeddings.interpolate_pos_encoding = types.MethodType(_hub_interpolate_pos_encoding, embeddings)
        self.device, self.batch_size, self.progress = torch.device(device), batch_size, progress

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> DINOv2Extractor:
        from transformers import Dinov2Model

        try:
            model = Dinov2Model.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:  # a missing local dir reads as an invalid Hub id
            raise FileNotFoundError(f"Cannot load DINOv2 from {name_or_path!r} ({error}). Pass --dinov2 with a local "
                                    "directory of facebook/dinov2-large (config.json + model.safetensors) or a Hub "
                                    "id reachable from this machine.") from error
        return cls(model, **kwargs)

    @torch.no_grad()
    def features(self, images_uint8) -> np.ndarray:
        """(N, hidden) float32 features of uint8 NHWC images (an array or an iterable of batches)."""
        from tqdm.auto import tqdm

        if isinstance(images_uint8, np.ndarray):
            images_uint8 = [images_uint8[i:i + self.batch_size] for i in range(0, len(images_uint8),
                                                                               self.batch_size)]
        out = []
        for batch in tqdm(images_uint8, desc="DINOv2 features", disable=not self.progress):
            x = dinov2_inputs(np.asarray(batch)).to(self.device)
            out.append(self.model(pixel_values=x).pooler_output.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# PRDC and MMD
# ---------------------------------------------------------------------------------------------------------------


def _euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    squared = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return squared.clamp_min(0).sqrt()


def _nn_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance to the k-th nearest neighbour within the set (self excluded): the (k+1)-th smallest row entry."""
    radii = []
    for start in range(0, len(features), chunk):
        block = _euclidean(features[start:start + chunk], features)
        block[torch.arange(len(block)), torch.arange(start, start + len(block))] = 0.0  # exact self-distance
        radii.append(block.topk(k + 1, dim=1, largest=False).values.max(dim=1).values)
    return torch.cat(radii)


def prdc(real_features, fake_features, k: int = 5, chunk: int = 2048) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) as clovaai-prdc / GPIC compute them."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if min(len(real), len(fake)) < k + 1:
        raise ValueError(f"PRDC with k = {k} needs at least {k + 1} real and fake features; got {len(real)} and "
                         f"{len(fake)}.")
    real_nn, fake_nn = _nn_radii(real, k, chunk), _nn_radii(fake, k, chunk)
    fake_in = torch.zeros(len(fake), dtype=torch.bool)
    fake_count = torch.zeros(len(fake), dtype=torch.float64)
    real_in, real_covered = [], []
    for start in range(0, len(real), chunk):
        block = _euclidean(real[start:start + chunk], fake)  # (real chunk, fake)
        inside = block < real_nn[start:start + chunk, None]
        fake_in |= inside.any(0)
        fake_count += inside.sum(0)
        real_in.append((block < fake_nn[None]).any(1))
        real_covered.append(block.min(1).values < real_nn[start:start + chunk])
    return {"precision": float(fake_in.double().mean()), "recall": float(torch.cat(real_in).double().mean()),
            "density": float(fake_count.mean() / k), "coverage": float(torch.cat(real_covered).double().mean())}


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    gamma = 1.0 / x.shape[1]
    k_xx, k_yy, k_xy = ((gamma * a @ b.T + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m = len(x)
    return float((k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
                 - 2 * k_xy.sum() / (m * m))


def polynomial_mmd(real_features, fake_features, n_subsets: int = 100, subset_size: int = 1000,
                   seed: int = 0) -> np.ndarray:
    """Unbiased MMD² with the cubic polynomial kernel on `n_subsets` pairs of random subsets (without
    replacement) of min(subset_size, n_real, n_fake) rows; returns the per-subset values (report their mean)."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"MMD needs at least 2 real and 2 fake features; got {len(real)} and {len(fake)}.")
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    values = np.empty(n_subsets)
    for i in tqdm(range(n_subsets), desc="MMD", disable=n_subsets < 10):
        r = real[torch.from_numpy(rng.choice(len(real), m, replace=False))]
        f = fake[torch.from_numpy(rng.choice(len(fake), m, replace=False))]
        values[i] = _polynomial_mmd2(r, f)
    return values


def gpic_metrics(sample_features: np.ndarray, reference: dict, metrics=GPIC_METRICS, seed: int = 0,
                 fd_method: str = "sqrtm") -> dict:
    """FD-DINOv2 (`fd`, `fd_mu`, `fd_sigma`), PRDC and MMD of sample DINOv2 features against a GPIC reference
    (a mapping with `dino_mu`, `dino_sigma` and, for PRDC/MMD, `dino_embeddings`)."""
    import warnings

    unknown = set(metrics) - set(GPIC_METRICS)
    if unknown:
        raise ValueError(f"Unknown GPIC metrics {sorted(unknown)}; choose from {GPIC_METRICS}.")
    keys = set(reference.keys())
    if "fd" in metrics and not {"dino_mu", "dino_sigma"} <= keys:
        raise KeyError(f"The reference lacks dino_mu / dino_sigma (it has {sorted(keys)}); use GPIC's "
                       "reference_stats/test_stats.npz.")
    if {"prdc", "mmd"} & set(metrics) and "dino_embeddings" not in keys:
        raise KeyError(f"PRDC and MMD need the reference's dino_embeddings (it has {sorted(keys)}); pass "
                       "--metrics fd to compute FD-DINOv2 alone.")
    if len(sample_features) < 50_000:
        warnings.warn(f"{len(sample_features)} sample features; the GPIC protocol uses 50,000 (FD-DINOv2 is biased "
                      "high on fewer).", UserWarning, stacklevel=2)
    result: dict = {"seed": seed}
    if "fd" in metrics:
        fd, fd_mu, fd_sigma = frechet_distance_stats(
            FIDStatistics.from_features(sample_features.astype(np.float64)),
            FIDStatistics(reference["dino_mu"], reference["dino_sigma"]), method=fd_method)
        result.update(fd=fd, fd_mu=fd_mu, fd_sigma=fd_sigma)
    embeddings = reference["dino_embeddings"] if "dino_embeddings" in keys else None
    if "mmd" in metrics:
        result["mmd"] = float(polynomial_mmd(embeddings, sample_features, seed=seed).mean())
    if "prdc" in metrics:
        rng = np.random.default_rng(seed)
        n = min(PRDC_MAX_SAMPLES, len(embeddings), len(sample_features))
        ref_sub = embeddings[rng.choice(len(embeddings), n, replace=False)] if len(embeddings) > n else embeddings
        sample_sub = (sample_features[rng.choice(len(sample_features), n, replace=False)]
                      if len(sample_features) > n else sample_features)
        result.update(prdc(ref_sub, sample_sub, k=5))
    return result


# ---------------------------------------------------------------------------------------------------------------
# COCO: preprocessing and CLIPScore
# ---------------------------------------------------------------------------------------------------------------


def coco_preprocess(image: Image.Image, size: int = 256) -> Image.Image:
    """GEAR's COCO FID preprocessing: short side to `size` (PIL bicubic, `max(size, round(side · scale))`), then
    a center crop at floor offsets; `size`² images pass unchanged."""
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) == (size, size):
        return image
    if min(w, h) != size:
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


class CLIPScorer:
    """Image–caption cosine similarities with a `transformers` CLIP model and processor (fp32, eval)."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 64):
        self.model = model.to(device).float().eval().requires_grad_(False)
        self.processor, self.device, self.batch_size = processor, torch.device(device), batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> CLIPScorer:
        from transformers import CLIPModel, CLIPProcessor

        try:
            return cls(CLIPModel.from_pretrained(name_or_path), CLIPProcessor.from_pretrained(name_or_path), **kwargs)
        except (OSError, ValueError) as error:  # a missing local dir reads as an invalid Hub id
            raise FileNotFoundError(f"Cannot load CLIP from {name_or_path!r} ({error}). Pass --clip with a local "
                                    "directory of openai/clip-vit-base-patch32 (model and processor files) or a "
                                    "Hub id reachable from this machine.") from error

    @torch.no_grad()
    def cosines(self, images: list[Image.Image], captions: list[str]) -> np.ndarray:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions.")
        out = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(text=captions[start:start + self.batch_size],
                                    images=images[start:start + self.batch_size], return_tensors="pt",
                                    padding=True, truncation=True, max_length=77).to(self.device)
            result = self.model(**inputs)
            image = F.normalize(result.image_embeds.float(), dim=-1)
            text = F.normalize(result.text_embeds.float(), dim=-1)
            out.append((image * text).sum(-1).cpu().numpy())
        return np.concatenate(out)


def clip_score_summary(cosines: np.ndarray) -> dict:
    """The three CLIPScore definitions of the same cosines; `clip_score` is GEAR's."""
    cosines = np.asarray(cosines, dtype=np.float64)
    return {"clip_score": float(100.0 * cosines.mean()), "clip_score_definition": CLIP_SCORE_DEFINITION,
            "clip_score_hessel": float((2.5 * np.maximum(cosines, 0)).mean()),
            "clip_score_torchmetrics": float(np.maximum(100.0 * cosines, 0).mean())}


class COCOImages:
    """The ground-truth images of a COCO subset, decoded and preprocessed on access (as uint8 HWC arrays)."""

    def __init__(self, dataset, indices, size: int = 256):
        self.dataset, self.indices, self.size = dataset, [int(i) for i in indices], size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        from ..training.data import decode_image

        return np.asarray(coco_preprocess(decode_image(self.dataset[self.indices[i]]["image"]), self.size))


def load_coco_pairs(source: str, num_samples: int = 30000, seed: int = 42, size: int = 256):
    """(captions, ground-truth images) of the COCO subset GEAR evaluates: a directory of parquet files or a
    `datasets` id with `image` and `caption` columns, rows `RandomState(seed).permutation(n)[:num_samples]`
    (num_samples capped at n, as the official evaluator does)."""
    import glob
    import os
    import warnings

    import datasets

    if os.path.isdir(source):  # every parquet file of the directory, in sorted order (as the official loader)
        files = sorted(glob.glob(os.path.join(source, "*.parquet")))
        if not files:
            raise FileNotFoundError(f"No .parquet files in {source!r}.")
        dataset = datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    else:
        splits = datasets.load_dataset(source)
        if len(splits) != 1 and "train" not in splits:
            raise ValueError(f"{source} has the splits {list(splits)}; pass a directory of the COCO parquet files.")
        dataset = splits["train"] if "train" in splits else next(iter(splits.values()))
    missing = {"image", "caption"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{source} lacks the column(s) {sorted(missing)} (it has {dataset.column_names}); COCO "
                         "evaluation needs `image` and `caption` (as BinLin203/COCO2017-Val).")
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    if num_samples > len(dataset):
        warnings.warn(f"num_samples={num_samples} > {len(dataset)} rows; using all {len(dataset)} (as GEAR does).",
                      UserWarning, stacklevel=2)
        num_samples = len(dataset)
    indices = np.random.RandomState(seed).permutation(len(dataset))[:num_samples]
    captions = [dataset[int(i)]["caption"] for i in indices]
    return captions, COCOImages(dataset, indices, size)


def coco_metrics(samples_uint8: np.ndarray, captions: list[str], gt_images, inception_path=None, clip=None,
                 device: str | torch.device = "cpu", batch_size: int = 32, fd_method: str = "sqrtm") -> dict:
    """COCO FID (pytorch-fid pipeline, generated vs ground truth) and CLIPScore (when `clip` names a model)."""
    from tqdm.auto import tqdm

    from .frechet import fid_from_features
    from .inception import InceptionExtractor

    if len(samples_uint8) != len(captions) or len(gt_images) != len(captions):
        raise ValueError(f"{len(samples_uint8)} samples, {len(captions)} captions and {len(gt_images)} ground-truth "
                         "images: sample exactly one image per caption of the subset, in order.")
    extractor = InceptionExtractor(inception_path=inception_path, device=device, batch_size=batch_size,
                                   progress=False)
    generated = [coco_preprocess(Image.fromarray(im)) for im in samples_uint8]

    def features(images, desc):
        out = []
        for start in tqdm(range(0, len(images), batch_size), desc=desc):
            batch = np.stack([np.asarray(images[i]) for i in range(start, min(start + batch_size, len(images)))])
            out.append(extractor.pytorch_fid_pool(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0))
        return np.concatenate(out)

    result = {"fid": fid_from_features(features(gt_images, "COCO reference features"),
                                       features(generated, "sample features"), method=fd_method)}
    if clip:
        scorer = CLIPScorer.from_pretrained(clip, device=device)
        result.update(clip_score_summary(scorer.cosines(generated, captions)))
    else:
        result.update(clip_score=None, clip_score_definition=CLIP_SCORE_DEFINITION)
    return result


__all__ = ["CLIPScorer", "CLIP_SCORE_DEFINITION", "COCOImages", "DINOv2Extractor", "GPIC_METRICS", "clip_score_summary",
           "coco_metrics", "coco_preprocess", "dinov2_inputs", "gpic_metrics", "load_coco_pairs", "polynomial_mmd",
           "prdc"]
