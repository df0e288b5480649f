"""Running statistics of the representation analysis: per-image patch-level and locality values, and image-level
CKA / CKNNA over chunks of mean-pooled features that close as soon as a chunk of images is buffered (so memory
stays at one chunk of pooled vectors, whatever the number of images). State dicts make a run resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .similarity import (
    AlignmentKernel,
    high_frequency_ratio,
    kernel_cka,
    kernel_cknna,
    morans_i,
    prepare_features,
)

PATCH_METRICS = ("cknna_patch", "cka_patch", "morans_i", "hf_ratio")
IMAGE_METRICS = ("cknna_image", "cka_image")
LOCALITY_METRICS = ("morans_i", "hf_ratio")


def _finite_or_none(values):
    """JSON has no NaN: undefined values (e.g. CKNNA of a degenerate kernel) become null."""
    if isinstance(values, list):
        return [_finite_or_none(v) for v in values]
    return values if math.isfinite(values) else None


def _summary(values: torch.Tensor) -> dict:
    """mean/std over dim 0 of (N,) or (N, F) values; std is null for a single value."""
    mean = values.mean(dim=0)
    std = values.std(dim=0, correction=0) if values.shape[0] > 1 else None
    return {"mean": _finite_or_none(mean.tolist()), "std": _finite_or_none(std.tolist()) if std is not None else None}


@dataclass
class FeatureGroupStats:
    """Running statistics of F feature maps of one model part (the tokenizer's pre/post, or the AR's layers)."""

    labels: list
    per_image: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {m: [] for m in PATCH_METRICS})
    per_chunk: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {m: [] for m in IMAGE_METRICS})
    pooled: list[list[torch.Tensor]] = field(default_factory=list)  # [feature][batch] (B, D), awaiting a chunk

    def __post_init__(self):
        self.pooled = self.pooled or [[] for _ in self.labels]

    def add_batch(self, features, teacher_kernel: AlignmentKernel, grid: int, topk: int, q: float) -> None:
        values = {m: [] for m in PATCH_METRICS}
        for f, feature in enumerate(features):  # over feature maps (layers), each batched over images
            kernel = AlignmentKernel.from_features(prepare_features(feature, q), topk)
            values["cka_patch"].append(kernel_cka(kernel, teacher_kernel))
            values["cknna_patch"].append(kernel_cknna(kernel, teacher_kernel))
            feature_map = feature.unflatten(1, (grid, grid))
            values["morans_i"].append(morans_i(feature_map))
            values["hf_ratio"].append(high_frequency_ratio(feature_map))
            self.pooled[f].append(feature.float().mean(dim=1).cpu())
        for metric, per_feature in values.items():
            self.per_image[metric].append(torch.stack(per_feature, dim=1).cpu())

    def add_chunk(self, size: int, teacher_kernel: AlignmentKernel, topk: int, q: float) -> None:
        """Image-level metrics on the first `size` buffered images; they leave the buffer."""
        cka, knn = [], []
        for f, batches in enumerate(self.pooled):
            pooled = torch.cat(batches)
            self.pooled[f] = [pooled[size:]]
            kernel = AlignmentKernel.from_features(prepare_features(pooled[:size], q), topk)
            cka.append(kernel_cka(kernel, teacher_kernel))
            knn.append(kernel_cknna(kernel, teacher_kernel))
        self.per_chunk["cka_image"].append(torch.stack(cka))
        self.per_chunk["cknna_image"].append(torch.stack(knn))

    def summary(self) -> dict:
        out = {m: _summary(torch.cat(v)) for m, v in self.per_image.items()}
        out.update({m: _summary(torch.stack(v)) if v else None for m, v in self.per_chunk.items()})
        return out

    def state_dict(self) -> dict:
        return {"per_image": {m: torch.cat(v) if v else None for m, v in self.per_image.items()},
                "per_chunk": {m: torch.stack(v) if v else None for m, v in self.per_chunk.items()},
                "pooled": [torch.cat(b) if b else None for b in self.pooled]}

    def load_state_dict(self, state: dict) -> None:
        self.per_image = {m: [v] if v is not None else [] for m, v in state["per_image"].items()}
        self.per_chunk = {m: list(v) if v is not None else [] for m, v in state["per_chunk"].items()}
        self.pooled = [[b] if b is not None else [] for b in state["pooled"]]


class RepresentationStats:
    """Statistics of every model part and of the teacher, fed batch by batch; image-level chunks close as soon as
    `chunk_size` images are buffered, so memory stays at one chunk of pooled vectors."""

    def __init__(self, group_labels: dict[str, list], grid: int, topk: int, outlier_quantile: float,
                 chunk_size: int):
        self.grid, self.topk, self.q, self.chunk_size = grid, topk, outlier_quantile, chunk_size
        self.groups = {name: FeatureGroupStats(labels) for name, labels in group_labels.items()}
        self.teacher_locality: dict[str, list[torch.Tensor]] = {m: [] for m in LOCALITY_METRICS}
        self.teacher_pooled: list[torch.Tensor] = []
        self.buffered = 0

    def add_batch(self, teacher_features: torch.Tensor, group_features: dict[str, tuple[torch.Tensor, ...]]) -> None:
        teacher_map = teacher_features.unflatten(1, (self.grid, self.grid))
        self.teacher_locality["morans_i"].append(morans_i(teacher_map).cpu())
        self.teacher_locality["hf_ratio"].append(high_frequency_ratio(teacher_map).cpu())
        self.teacher_pooled.append(teacher_features.float().mean(dim=1).cpu())
        teacher_kernel = AlignmentKernel.from_features(prepare_features(teacher_features, self.q), self.topk)
        for name, features in group_features.items():
            self.groups[name].add_batch(features, teacher_kernel, self.grid, self.topk, self.q)
        self.buffered += teacher_features.shape[0]
        while self.buffered >= self.chunk_size:
            pooled = torch.cat(self.teacher_pooled)
            self.teacher_pooled = [pooled[self.chunk_size:]]
            kernel = AlignmentKernel.from_features(prepare_features(pooled[: self.chunk_size], self.q), self.topk)
            for group in self.groups.values():
                group.add_chunk(self.chunk_size, kernel, self.topk, self.q)
            self.buffered -= self.chunk_size

    def summary(self) -> dict:
        return {"teacher": {m: _summary(torch.cat(v)) for m, v in self.teacher_locality.items()},
                "groups": {name: g.summary() for name, g in self.groups.items()}}

    def state_dict(self) -> dict:
        return {"groups": {name: g.state_dict() for name, g in self.groups.items()},
                "teacher_locality": {m: torch.cat(v) if v else None for m, v in self.teacher_locality.items()},
                "teacher_pooled": torch.cat(self.teacher_pooled) if self.teacher_pooled else None,
                "buffered": self.buffered}

    def load_state_dict(self, state: dict) -> None:
        for name, group_state in state["groups"].items():
            self.groups[name].load_state_dict(group_state)
        self.teacher_locality = {m: [v] if v is not None else [] for m, v in state["teacher_locality"].items()}
        pooled = state["teacher_pooled"]
        self.teacher_pooled = [pooled] if pooled is not None else []
        self.buffered = state["buffered"]
