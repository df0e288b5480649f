"""Tokenizer reconstruction metrics exactly as GEAR's `tools/eval_tokenizer.py` (`run_vq_reconstruction_eval`).

Data: short-side resize to `image_size` (PIL bicubic by default, `bilinear` reproduces Open-MAGVIT2 / IBQ numbers),
center crop, uint8. Forward: x = uint8 / 127.5 − 1, reconstruction in eval mode, both clamped to [−1, 1] and mapped
to float [0, 1] — the reconstruction is not re-quantised. Metrics (single process):

* L1: mean |r − g| per batch, then the mean over batches (a short last batch weighs as much as a full one).
* PSNR: per image 20·log10(1 / sqrt(max(MSE, 1e-12))), the mean per batch, then the mean over batches.
* SSIM: scikit-image `structural_similarity(g, r, channel_axis=0, data_range=1)` defaults (7×7 uniform window,
  K1 0.01, K2 0.03, sample covariance, 3-px border cropped, channels averaged), mean over images. Computed
  batched in float64 (`ssim`), equal to scikit-image to < 1e-6 (tested).
* rFID: pytorch-fid's input pipeline (torch bilinear to 299, 2x − 1) on the FID Inception, pool features of the
  ground-truth crops vs their reconstructions, Fréchet distance (not against ImageNet reference statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..training.data import decode_image, load_image_dataset
from ..training.gear_step import to_signed_unit
from .frechet import fid_from_features
from .inception import InceptionExtractor, strict_fp32

RESIZE_MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
TOKENIZER_METRICS = ("rfid", "psnr", "ssim", "l1")


class EvalTransform:
    """Short-side resize (PIL, antialiased) → center crop → uint8 (3, S, S), as the official val loader."""

    def __init__(self, image_size: int = 256, resize: str = "bicubic"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {sorted(RESIZE_MODES)}, got {resize!r}.")
        self.image_size, self.interpolation = image_size, RESIZE_MODES[resize]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = TF.resize(image.convert("RGB"), self.image_size, interpolation=self.interpolation)
        return TF.pil_to_tensor(TF.center_crop(image, self.image_size))


class EvalImages(torch.utils.data.IterableDataset):
    """uint8 eval crops of a `load_image_dataset` source, in dataset order. An unreadable image is an error (it
    would silently change the evaluation set)."""

    def __init__(self, dataset, transform: EvalTransform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        for row in self.dataset:
            try:
                image = decode_image(row["image"])
            except (OSError, ValueError, SyntaxError) as error:
                raise ValueError(f"Cannot read evaluation image {row['image'].get('path') or '<bytes>'}: {error}. "
                                 "Remove or fix it; skipping would change the evaluation set.") from error
            yield self.transform(image)


def eval_image_loader(source: str, path: str | None, split: str = "validation", image_size: int = 256,
                      resize: str = "bicubic", batch_size: int = 32, max_samples: int | None = None,
                      num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of uint8 (B, 3, S, S) eval crops from an image folder (`imagefolder`), a `datasets` id (`hub`),
    WebDataset shards (`webdataset`) or the bundled `fashion-mnist` subset; the first `max_samples` if given."""
    dataset = load_image_dataset(source, path, split=split, max_samples=max_samples)
    images = EvalImages(dataset, EvalTransform(image_size, resize))
    return torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=min(num_workers, 1))


def ssim(images1: torch.Tensor, images2: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) pairs with scikit-image's defaults (see module docstring), in float64."""
    x, y = images1.double(), images2.double()
    if x.shape != y.shape or x.ndim != 4 or min(x.shape[-2:]) < 7:
        raise ValueError(f"ssim expects two (B, C, H >= 7, W >= 7) batches of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}.")
    window = 7
    def mean(t):  # the interior of the uniform filter: exactly the pixels skimage keeps after its border crop
        return F.avg_pool2d(t, window, stride=1)
    cov_norm = window * window / (window * window - 1)
    ux, uy = mean(x), mean(y)
    vx, vy = cov_norm * (mean(x * x) - ux * ux), cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def batch_reconstruction_stats(r: torch.Tensor, g: torch.Tensor, with_ssim: bool = True):
    """(mean L1, mean per-image PSNR, per-image SSIM or None) of float [0, 1] reconstructions `r` vs `g`."""
    l1 = (r - g).abs().mean()
    mse = ((g - r) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    psnr = (20.0 * torch.log10(1.0 / torch.sqrt(mse))).mean()
    return l1, psnr, (ssim(g, r) if with_ssim else None)


def psnr_l1_ssim(r: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """PSNR / SSIM / L1 of one batch of float [0, 1] (B, 3, H, W) reconstructions `r` against `g`."""
    l1, psnr, per_image_ssim = batch_reconstruction_stats(r.float(), g.float())
    return {"psnr": float(psnr), "ssim": float(per_image_ssim.mean()), "l1": float(l1)}


@torch.no_grad()
def reconstruction_metrics(tokenizer, batches, extractor: InceptionExtractor | None = None,
                           device: str | torch.device = "cpu", metrics=TOKENIZER_METRICS,
                           progress: bool = True, fd_method: str = "sqrtm") -> dict[str, float | None]:
    """rFID / PSNR / SSIM / L1 of `tokenizer` (a `GEARTokenizerModel`) over uint8 (B, 3, H, W) `batches`.

    rFID needs `extractor` (an `InceptionExtractor`; None → `rfid` is None); `fd_method` as in
    `frechet_distance`. Returns also `num_images`.
    """
    from tqdm.auto import tqdm

    unknown = set(metrics) - set(TOKENIZER_METRICS)
    if unknown:
        raise ValueError(f"Unknown tokenizer metrics {sorted(unknown)}; choose from {TOKENIZER_METRICS}.")
    was_training, was_checking = tokenizer.training, tokenizer.check_input_range
    tokenizer.eval()
    tokenizer.check_input_range = False  # inputs are built from uint8: no per-batch host sync for the range check
    l1, psnr, ssim_sum, num_images, feats_gt, feats_rec = [], [], torch.zeros((), dtype=torch.float64), 0, [], []
    try:
        with strict_fp32():
            for batch in tqdm(batches, desc="reconstruction metrics", disable=not progress):
                if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
                    raise ValueError(f"Expected uint8 (B, 3, H, W) image batches, got {batch.dtype} "
                                     f"{tuple(batch.shape)}.")
                x = to_signed_unit(batch.to(device))
                recon = tokenizer(x).reconstruction.clamp(-1, 1).float()
                r, g = (recon + 1.0) / 2.0, (x.clamp(-1, 1) + 1.0) / 2.0
                batch_l1, batch_psnr, batch_ssim = batch_reconstruction_stats(r, g, with_ssim="ssim" in metrics)
                l1.append(batch_l1)
                psnr.append(batch_psnr)
                if batch_ssim is not None:
                    ssim_sum = ssim_sum + batch_ssim.sum().cpu()
                if "rfid" in metrics and extractor is not None:
                    feats_gt.append(extractor.pytorch_fid_pool(g))
                    feats_rec.append(extractor.pytorch_fid_pool(r))
                num_images += len(batch)
    finally:
        tokenizer.train(was_training)
        tokenizer.check_input_range = was_checking
    if num_images == 0:
        raise ValueError("The evaluation set is empty.")
    result = dict.fromkeys(TOKENIZER_METRICS)
    if "l1" in metrics:
        result["l1"] = float(torch.stack(l1).mean())
    if "psnr" in metrics:
        result["psnr"] = float(torch.stack(psnr).mean())
    if "ssim" in metrics:
        result["ssim"] = float(ssim_sum / num_images)
    if feats_gt:
        import numpy as np

        if num_images < 2:
            raise ValueError("rFID needs at least 2 images (a covariance).")
        result["rfid"] = fid_from_features(np.concatenate(feats_gt), np.concatenate(feats_rec), method=fd_method)
    result["num_images"] = num_images
    return result


__all__ = ["EvalImages", "EvalTransform", "RESIZE_MODES", "TOKENIZER_METRICS", "batch_reconstruction_stats",
           "eval_image_loader", "psnr_l1_ssim", "reconstruction_metrics", "ssim"]
