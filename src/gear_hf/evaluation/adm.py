"""ImageNet generation metrics exactly as the ADM evaluator (guided-diffusion `evaluations/evaluator.py`, which
GEAR's `tools/evaluator.py` copies): FID and sFID against the reference batch's `mu/sigma` and `mu_s/sigma_s`,
the Inception Score over contiguous splits of 5,000, and improved Precision / Recall (Kynkäänniemi et al.) with
ADM's `ManifoldEstimator` (k = 3, squared distances in fp16 with an fp32 fallback per 10,000 × 10,000 block, `≤`),
computed in PyTorch with `FIDInceptionV3` (see `inception.py`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .files import savez_atomically
from .frechet import FIDStatistics, frechet_distance_stats
from .inception import SUPPLY_WEIGHTS_HINT, InceptionExtractor
from .npz import NpzBatches, npz_array_info, npz_keys

ADM_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
MIN_UNBIASED_FID_SAMPLES = 2048  # fewer samples than feature dims: a rank-deficient covariance, FID biased high
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3


# ---------------------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------------------


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over contiguous, unshuffled splits of `split_size` of exp(E_i KL(p_i ‖ mean_i p_i)), in float32 (ADM).

    `probs` (N, C) are the softmax predictions in file order; the last split may be shorter. Only the mean is
    returned, as ADM does (no std).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"inception_score expects (N >= 1, classes) probabilities, got shape {probs.shape}.")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------------------------
# Precision / Recall: ADM's ManifoldEstimator
# ---------------------------------------------------------------------------------------------------------------


def _norm_expansion(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((u * u).sum(1, keepdim=True) - 2 * (u @ v.T) + (v * v).sum(1)[None]).clamp_min(0)


def pairwise_squared_distances(u: torch.Tensor, v: torch.Tensor, dtype: str = "float16") -> torch.Tensor:
    """ADM's `DistanceBlock`: max(‖u‖² − 2u·v + ‖v‖², 0) on fp16-cast inputs, or fp32 if any entry is not finite.

    fp16 is emulated the same way on every device, following TF's fp16 graph on GPU: inputs rounded to fp16,
    elementwise squares rounded to fp16, sums and the matmul accumulated in fp32 and rounded to fp16, the
    expansion evaluated in fp16.
    """
    u, v = u.float(), v.float()
    if dtype == "float16":
        u16, v16 = u.half().float(), v.half().float()
        norm_u = (u16 * u16).half().float().sum(1, keepdim=True).half()
        norm_v = (v16 * v16).half().float().sum(1)[None].half()
        products = (u16 @ v16.T).half()
        distances = torch.clamp_min(norm_u - 2 * products + norm_v, 0)
        if bool(torch.isfinite(distances).all()):
            return distances.float()
    elif dtype != "float32":
        raise ValueError(f"distance dtype must be 'float16' (ADM) or 'float32', got {dtype!r}.")
    return _norm_expansion(u, v)


@dataclass
class ManifoldEstimator:
    """k-NN manifolds of feature sets, blockwise as ADM (`row_batch_size` × `col_batch_size` distance blocks)."""

    k: int = PR_NEIGHBOURHOOD
    row_batch_size: int = 10000
    col_batch_size: int = 10000
    distance_dtype: str = "float16"
    device: str | torch.device = "cpu"

    def _blocks(self, n: int, size: int):
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    def _distances(self, u, v):
        return pairwise_squared_distances(u.to(self.device), v.to(self.device), self.distance_dtype)

    def manifold_radii(self, features: torch.Tensor) -> torch.Tensor:
        """Squared distance of every point to its k-th nearest neighbour in its own set (self included as the
        0-th, so the (k+1)-th smallest entry of its distance row), as ADM's `np.partition(..)[:, k]`."""
        n = len(features)
        if n < self.k + 1:
            raise ValueError(f"Precision/recall need at least k + 1 = {self.k + 1} feature vectors per set to "
                             f"define k-NN radii (k = {self.k}); got {n}.")
        from tqdm.auto import tqdm

        radii = []
        rows = self._blocks(n, self.row_batch_size)
        for r0, r1 in tqdm(rows, desc="k-NN radii", disable=len(rows) < 2):
            smallest = None
            for c0, c1 in self._blocks(n, self.col_batch_size):
                block = self._distances(features[r0:r1], features[c0:c1])
                candidates = block if smallest is None else torch.cat([smallest, block], dim=1)
                smallest = candidates.topk(min(self.k + 1, candidates.shape[1]), dim=1, largest=False).values
            radii.append(smallest.sort(dim=1).values[:, self.k])
        return torch.cat(radii).cpu()

    def evaluate_pr(self, reference: torch.Tensor, samples: torch.Tensor) -> tuple[float, float]:
        """(precision, recall): the fraction of samples inside some reference ball, and of references inside
        some sample ball (distance ≤ radius)."""
        from tqdm.auto import tqdm

        radii_ref, radii_sample = self.manifold_radii(reference), self.manifold_radii(samples)
        ref_in = torch.zeros(len(reference), dtype=torch.bool)
        sample_in = torch.zeros(len(samples), dtype=torch.bool)
        blocks = [(r, c) for r in self._blocks(len(reference), self.row_batch_size)
                  for c in self._blocks(len(samples), self.col_batch_size)]
        for (r0, r1), (c0, c1) in tqdm(blocks, desc="precision/recall", disable=len(blocks) < 4):
            block = self._distances(reference[r0:r1], samples[c0:c1]).cpu()
            ref_in[r0:r1] |= (block <= radii_sample[None, c0:c1]).any(dim=1)
            sample_in[c0:c1] |= (block <= radii_ref[r0:r1, None]).any(dim=0)
        return float(sample_in.double().mean()), float(ref_in.double().mean())


def precision_recall(reference_features, sample_features, k: int = PR_NEIGHBOURHOOD, distance_dtype: str = "float16",
                     device: str | torch.device = "cpu", row_batch_size: int = 10000,
                     col_batch_size: int = 10000) -> tuple[float, float]:
    """ADM precision and recall of pool_3 features (reference = the 10k `arr_0` images, samples = all samples)."""
    estimator = ManifoldEstimator(k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size,
                                  distance_dtype=distance_dtype, device=device)
    return estimator.evaluate_pr(torch.as_tensor(np.asarray(reference_features, np.float32)),
                                 torch.as_tensor(np.asarray(sample_features, np.float32)))


# ---------------------------------------------------------------------------------------------------------------
# Files: sample batches and the reference batch
# ---------------------------------------------------------------------------------------------------------------


def check_sample_batch(path: str | os.PathLike, key: str = "arr_0") -> tuple[int, ...]:
    """Validate an ADM sample `.npz` (uint8 N×H×W×3 under `arr_0`) from its header; returns its shape."""
    if key not in npz_keys(path):
        raise KeyError(f"{path} has no {key!r} array (it has {npz_keys(path)}); ADM sample batches store the "
                       f"images as arr_0 (np.savez(path, images) or `scripts/evaluate.py sample`).")
    info = npz_array_info(path, key)
    if len(info.shape) != 4 or info.shape[-1] != 3:
        raise ValueError(f"{path}: {key} must be uint8 images (N, H, W, 3), got shape {info.shape}.")
    if info.dtype != np.uint8:
        raise ValueError(f"{path}: {key} has dtype {info.dtype}; samples must be uint8 in [0, 255]. Quantise float "
                         "images in [-1, 1] with gear_hf.pipelines.to_uint8 (the GEAR sampler's rounding).")
    return info.shape


@dataclass
class ADMReference:
    """An ADM reference batch: `path`, `image_shape` of `arr_0` (None if absent), `stats` (`mu`/`sigma`) and
    `spatial_stats` (`mu_s`/`sigma_s`), each None if absent."""

    path: str
    image_shape: tuple[int, ...] | None
    stats: FIDStatistics | None
    spatial_stats: FIDStatistics | None


def load_reference_batch(path: str | os.PathLike) -> ADMReference:
    """Read (lazily for `arr_0`) an ADM reference batch such as `VIRTUAL_imagenet256_labeled.npz`."""
    keys = npz_keys(path)
    image_shape = check_sample_batch(path) if "arr_0" in keys else None
    if image_shape is None and "mu" not in keys:
        raise ValueError(f"{path} is not an ADM reference batch: it has neither images (arr_0) nor statistics "
                         f"(mu, sigma); it has {keys}.")

    def stats(arrays, mu: str, sigma: str) -> FIDStatistics | None:
        if mu in keys and sigma in keys:
            return FIDStatistics(mu=arrays[mu], sigma=arrays[sigma])
        if mu in keys or sigma in keys:
            raise ValueError(f"{path} has only one of {mu!r} / {sigma!r}; a reference needs both or neither.")
        return None

    with np.load(path) as arrays:  # reads only the statistics; arr_0 is streamed when needed
        return ADMReference(path=str(path), image_shape=image_shape, stats=stats(arrays, "mu", "sigma"),
                            spatial_stats=stats(arrays, "mu_s", "sigma_s"))


def default_cache_dir() -> str:
    return os.environ.get("GEAR_HF_EVAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gear_hf", "eval"))


def _cache_key(path: str, extractor: InceptionExtractor) -> str:
    stat = os.stat(path)
    weights = extractor.weights_path or "in-memory"
    weights_size = os.path.getsize(weights) if os.path.isfile(weights) else 0
    identity = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{os.path.abspath(weights)}|{weights_size}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def batch_activations(path: str | os.PathLike, extractor: InceptionExtractor, cache_dir: str | None = None,
                      desc: str = "Inception features") -> dict[str, np.ndarray | None]:
    """ADM activations of an `.npz` image batch, cached in `cache_dir` (keyed by the file's path, size and mtime
    and the weights file) when given. Use it for the reference batch, whose activations ADM always recomputes."""
    path = str(path)
    cache_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        stem = os.path.splitext(os.path.basename(path))[0]
        cache_file = os.path.join(cache_dir, f"{stem}-{_cache_key(path, extractor)}.npz")
        if os.path.isfile(cache_file):
            cached = np.load(cache_file)
            return {"pool": cached["pool"], "spatial": cached["spatial"],
                    "probs": cached["probs"] if "probs" in cached else None}
    check_sample_batch(path)
    activations = extractor.adm_features(NpzBatches(path, batch_size=extractor.batch_size), desc=desc)
    if cache_file is not None:
        savez_atomically(cache_file, **{k: v for k, v in activations.items() if v is not None})
    return activations


def load_reference_statistics(path: str | os.PathLike, extractor: InceptionExtractor | None = None,
                              cache_dir: str | None = None, spatial: bool = False) -> FIDStatistics:
    """The reference statistics for FID (or sFID): the stored `mu/sigma` (`mu_s/sigma_s`) when present, else
    computed once from the batch's `arr_0` with `extractor` and cached (default cache: `default_cache_dir()`)."""
    reference = load_reference_batch(path)
    stored = reference.spatial_stats if spatial else reference.stats
    if stored is not None:
        return stored
    if extractor is None:
        raise ValueError(f"{path} stores no {'mu_s/sigma_s' if spatial else 'mu/sigma'}: pass an extractor to "
                         "compute them from its arr_0 images.")
    activations = batch_activations(path, extractor, cache_dir or default_cache_dir(), desc="reference features")
    return FIDStatistics.from_features(activations["spatial" if spatial else "pool"])


# ---------------------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------------------


def _warn_small(n: int, what: str) -> None:
    if n < MIN_UNBIASED_FID_SAMPLES:
        warnings.warn(f"{what} from {n} images (< {MIN_UNBIASED_FID_SAMPLES}): the covariance is rank-deficient and "
                      "the value is biased high and not comparable with the 50,000-sample protocol. The ADM "
                      "evaluator computes it all the same.", UserWarning, stacklevel=3)


def fid_of_samples(images_uint8_or_features, reference_stats: FIDStatistics,
                   extractor: InceptionExtractor | None = None, method: str = "sqrtm") -> float:
    """FID of N samples against reference statistics: the samples as uint8 NHWC images (needs `extractor`) or
    as precomputed pool_3 features (N, 2048). For in-training tracking and small reference sets."""
    data = images_uint8_or_features
    if getattr(data, "ndim", 0) == 4:
        if extractor is None:
            raise ValueError("fid_of_samples got images: pass an InceptionExtractor to compute their features.")
        data = extractor.adm_features(data)["pool"]
    stats = FIDStatistics.from_features(np.asarray(data))
    _warn_small(len(data), "FID")
    return frechet_distance_stats(stats, reference_stats, method=method)[0]


def evaluate_sample_batch(samples: str | os.PathLike, reference: str | os.PathLike, extractor: InceptionExtractor,
                          metrics=ADM_METRICS, fd_method: str = "sqrtm", distance_dtype: str = "float16",
                          cache_dir: str | None = None) -> dict:
    """The ADM evaluator on a sample `.npz` against a reference `.npz`: a dict with `fid`, `sfid`,
    `inception_score`, `precision`, `recall` (None for a metric not requested, or IS without a classifier)."""
    unknown = set(metrics) - set(ADM_METRICS)
    if unknown:
        raise ValueError(f"Unknown metrics {sorted(unknown)}; choose from {ADM_METRICS}.")
    shape = check_sample_batch(samples)
    ref = load_reference_batch(reference)
    if ref.image_shape is not None and ref.image_shape[1:3] != shape[1:3]:
        raise ValueError(f"The samples are {shape[1]}×{shape[2]} but the reference images are {ref.image_shape[1]}×"
                         f"{ref.image_shape[2]}: evaluate at the reference's resolution (GEAR resizes 384/512 px "
                         "samples to 256 before saving: `scripts/evaluate.py sample --image-size-eval 256`).")
    needs_images = {"precision", "recall"} & set(metrics)
    if needs_images and ref.image_shape is None:
        raise ValueError(f"{reference} has no reference images (arr_0), which precision/recall need; it has "
                         f"{npz_keys(reference)}. Pass --metrics fid,sfid,inception_score to skip them.")
    if "inception_score" in metrics and len(metrics) == 1 and not extractor.has_classifier:
        raise ValueError(f"The Inception Score needs the Inception classifier, which these weights lack: "
                         f"{SUPPLY_WEIGHTS_HINT}.")
    acts = batch_activations(samples, extractor, desc="sample features")
    n = len(acts["pool"])
    ref_acts = None
    if needs_images or (ref.stats is None and "fid" in metrics) or (ref.spatial_stats is None and "sfid" in metrics):
        ref_acts = batch_activations(reference, extractor, cache_dir, desc="reference features")
    result = dict.fromkeys(ADM_METRICS)
    for name, key, stored in (("fid", "pool", ref.stats), ("sfid", "spatial", ref.spatial_stats)):
        if name not in metrics:
            continue
        if n < 2:
            raise ValueError(f"{name.upper()} needs at least 2 samples (a covariance); got {n}.")
        _warn_small(n, name.upper())
        target = stored or FIDStatistics.from_features(ref_acts[key])
        result[name] = frechet_distance_stats(FIDStatistics.from_features(acts[key]), target, method=fd_method)[0]
    if "inception_score" in metrics:
        if acts["probs"] is None:
            warnings.warn(f"inception_score is null: the Inception weights have no classifier. {SUPPLY_WEIGHTS_HINT}.",
                          UserWarning, stacklevel=2)
        else:
            if n < IS_SPLIT_SIZE:
                warnings.warn(f"Inception Score from {n} samples (< one split of {IS_SPLIT_SIZE}): not comparable "
                              "with the 50,000-sample protocol (10 splits).", UserWarning, stacklevel=2)
            result["inception_score"] = inception_score(acts["probs"])
    if needs_images:
        precision, recall = precision_recall(ref_acts["pool"], acts["pool"], distance_dtype=distance_dtype,
                                             device=extractor.device)
        result["precision"] = precision if "precision" in metrics else None
        result["recall"] = recall if "recall" in metrics else None
    return result


__all__ = [
    "ADM_METRICS",
    "ADMReference",
    "ManifoldEstimator",
    "batch_activations",
    "check_sample_batch",
    "default_cache_dir",
    "evaluate_sample_batch",
    "fid_of_samples",
    "inception_score",
    "load_reference_batch",
    "load_reference_statistics",
    "pairwise_squared_distances",
    "precision_recall",
]
