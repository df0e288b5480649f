"""In-process evaluation, numerically faithful to the reference definitions (see the README's "Evaluate"):

* `adm` — FID, sFID, Inception Score, precision/recall exactly as the ADM evaluator (`evaluate_sample_batch`,
  `fid_of_samples`, `load_reference_statistics`), on `inception.FIDInceptionV3` (the TF FID Inception in PyTorch).
* `tokenizer_metrics` — rFID / PSNR / SSIM / L1 as GEAR's `tools/eval_tokenizer.py` (`reconstruction_metrics`).
* `codebook` — usage, entropy, effective size and top-k mass over a dataset, sorted-usage plot.
* `text_to_image` — GPIC FD-DINOv2 + PRDC + MMD, COCO FID + CLIPScore.
* `sampler` — resumable, process-count-independent sampling into an ADM `samples.npz`.
* `representation` (+ `similarity`, `representation_stats`, `representation_report`) — CKA / CKNNA / Moran's I /
  FFT high-frequency ratio of tokenizer and AR features against a teacher (paper Table 4, Figure 5).

Heavy optional dependencies (scipy, scikit-image, transformers models, evaluate) are imported where used.
"""

from .adm import (
    ADM_METRICS,
    ManifoldEstimator,
    batch_activations,
    check_sample_batch,
    evaluate_sample_batch,
    fid_of_samples,
    inception_score,
    load_reference_batch,
    load_reference_statistics,
    precision_recall,
)
from .codebook import codebook_counts, codebook_report, plot_sorted_usage
from .frechet import FIDStatistics, fid_from_features, frechet_distance, frechet_distance_stats
from .inception import FIDInceptionV3, InceptionExtractor, load_fid_inception, tf1_resize_bilinear
from .sampler import EVAL_PRESETS, class_labels_for, image_seed, sample_for_evaluation
from .text_to_image import (
    CLIPScorer,
    DINOv2Extractor,
    clip_score_summary,
    coco_metrics,
    gpic_metrics,
    polynomial_mmd,
    prdc,
)
from .tokenizer_metrics import EvalTransform, eval_image_loader, reconstruction_metrics, ssim


def metric_path(name: str = "gear_reconstruction") -> str:
    """Directory of a bundled `evaluate` metric module: `evaluate.load(metric_path("gear_reconstruction"))`."""
    import os

    path = os.path.join(os.path.dirname(__file__), "metrics", name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No bundled evaluate metric {name!r}; available: "
                                f"{sorted(os.listdir(os.path.join(os.path.dirname(__file__), 'metrics')))}.")
    return path


__all__ = [
    "ADM_METRICS",
    "CLIPScorer",
    "DINOv2Extractor",
    "EVAL_PRESETS",
    "EvalTransform",
    "FIDInceptionV3",
    "FIDStatistics",
    "InceptionExtractor",
    "ManifoldEstimator",
    "batch_activations",
    "check_sample_batch",
    "class_labels_for",
    "clip_score_summary",
    "codebook_counts",
    "codebook_report",
    "coco_metrics",
    "eval_image_loader",
    "evaluate_sample_batch",
    "fid_from_features",
    "fid_of_samples",
    "frechet_distance",
    "frechet_distance_stats",
    "gpic_metrics",
    "image_seed",
    "inception_score",
    "load_fid_inception",
    "load_reference_batch",
    "load_reference_statistics",
    "metric_path",
    "plot_sorted_usage",
    "polynomial_mmd",
    "prdc",
    "precision_recall",
    "reconstruction_metrics",
    "sample_for_evaluation",
    "ssim",
    "tf1_resize_bilinear",
]
