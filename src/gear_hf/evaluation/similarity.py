"""Representation similarity and locality statistics of the paper's Table 4 and Figure 5 (evaluation spec §5).

* `prepare_features`: PRH preprocessing (clamp at the q-quantile of |x|, then L2-normalise rows).
* `linear_cka`: biased linear CKA (Kornblith et al. 2019) as PRH's `cka(kernel_metric="ip", unbiased=False)`;
  `unbiased=True` is PRH's `unbiased_cka`.
* `cknna`: PRH's `AlignmentMetrics.cknna(topk, unbiased=True)` (Huh et al. 2024).
* `morans_i`: Moran's I of a feature map on its token grid, rook adjacency, vector form.
* `high_frequency_ratio`: share of the map's non-DC spectral power above a radial frequency (0.25 cycles/token).

Every function is batched over leading dimensions: a feature set is `(..., n, d)` (n samples or patches of one
problem), a feature map `(..., h, w, d)`. Kernel statistics are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CKA_EPS = 1e-6  # PRH adds it to the normaliser of CKA and CKNNA


def prepare_features(features: torch.Tensor, outlier_quantile: float = 0.95) -> torch.Tensor:
    """PRH `prepare_features(exact=True)` + row normalisation, per problem (the last two dims).

    |x| is sorted over the whole (n, d) problem and the value at index `int(q · n · d)` is the clamp threshold;
    `q = 1` skips the clamp, like PRH. Rows are then L2-normalised, so the linear kernel is the cosine similarity.
    """
    if not 0 < outlier_quantile <= 1:
        raise ValueError(f"outlier_quantile must be in (0, 1], got {outlier_quantile}.")
    x = features.float()
    if outlier_quantile < 1:
        flat = x.abs().flatten(-2)
        index = int(outlier_quantile * flat.shape[-1])  # sorted(|x|)[index], as PRH
        threshold = flat.kthvalue(index + 1, dim=-1).values[..., None, None]
        x = x.clamp(-threshold, threshold)
    return F.normalize(x, p=2, dim=-1)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Linear kernel K = X Xᵀ, (..., n, n), in float64."""
    x = features.double()
    return x @ x.mT


def double_center(K: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/n."""
    return K - K.mean(dim=-1, keepdim=True) - K.mean(dim=-2, keepdim=True) + K.mean(dim=(-2, -1), keepdim=True)


def hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """tr(K H L H) with H = I − 11ᵀ/n (PRH `hsic_biased`), written as Σ (HKH) ⊙ Lᵀ."""
    return (double_center(K) * L.mT).sum(dim=(-2, -1))


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) eq. 5 (PRH `hsic_unbiased`), for n > 3:

    [Σ K̃ ⊙ L̃ᵀ + ΣK̃ ΣL̃ / ((n−1)(n−2)) − 2 Σ K̃L̃ / (n−2)] / (n(n−3)), with K̃, L̃ = K, L with zero diagonal.
    Σ K̃L̃ (the sum of all entries of the product) is computed as colsum(K̃) · rowsum(L̃).
    """
    n = K.shape[-1]
    if n < 4:
        raise ValueError(f"The unbiased HSIC needs n > 3 samples, got n = {n}.")
    off_diagonal = 1.0 - torch.eye(n, dtype=K.dtype, device=K.device)
    K, L = K * off_diagonal, L * off_diagonal
    trace_term = (K * L.mT).sum(dim=(-2, -1))
    mean_term = K.sum(dim=(-2, -1)) * L.sum(dim=(-2, -1)) / ((n - 1) * (n - 2))
    cross_term = 2 * (K.sum(dim=-2) * L.sum(dim=-1)).sum(dim=-1) / (n - 2)
    return (trace_term + mean_term - cross_term) / (n * (n - 3))


def check_topk(topk: int, n: int) -> None:
    """CKNNA needs 2 <= topk <= n − 1 (every row has topk other rows)."""
    if topk < 2:
        raise ValueError(f"CKNNA needs topk >= 2 (PRH), got {topk}.")
    if topk > n - 1:
        raise ValueError(
            f"CKNNA with topk={topk} needs at least topk + 1 = {topk + 1} samples per problem, got {n}. Use more "
            "images (image level) or a larger token grid (patch level), or lower --topk."
        )


@dataclass
class AlignmentKernel:
    """One feature set's side of CKA and CKNNA, computed once and compared with many others.

    `gram` K = X Xᵀ (..., n, n); `centered` H K H; `neighbors` the 0/1 mask of each row's `topk` most similar
    other rows (self excluded: PRH's unbiased mode); `hsic_self` = HSIC_b(K, K); `knn_self` =
    HSIC_u(M_K ⊙ K, M_K ⊙ K).
    """

    gram: torch.Tensor
    centered: torch.Tensor
    neighbors: torch.Tensor
    hsic_self: torch.Tensor
    knn_self: torch.Tensor

    @classmethod
    def from_features(cls, features: torch.Tensor, topk: int) -> AlignmentKernel:
        """`features` (..., n, d), usually `prepare_features(x)`."""
        K = gram(features)
        n = K.shape[-1]
        check_topk(topk, n)
        diagonal = torch.eye(n, dtype=torch.bool, device=K.device)
        nearest = K.masked_fill(diagonal, float("-inf")).topk(topk, dim=-1).indices
        neighbors = torch.zeros_like(K).scatter_(-1, nearest, 1.0)
        masked = neighbors * K
        centered = double_center(K)
        return cls(gram=K, centered=centered, neighbors=neighbors, hsic_self=centered.square().sum(dim=(-2, -1)),
                   knn_self=hsic_unbiased(masked, masked))


def kernel_cka(a: AlignmentKernel, b: AlignmentKernel) -> torch.Tensor:
    """Biased linear CKA: HSIC_b(K, L) / (sqrt(HSIC_b(K, K) HSIC_b(L, L)) + 1e-6), with
    HSIC_b(K, L) = tr(KHLH) = Σ (HKH) ⊙ (HLH) for symmetric K, L (H is idempotent)."""
    hsic = (a.centered * b.centered).sum(dim=(-2, -1))
    return hsic / (torch.sqrt(a.hsic_self * b.hsic_self) + CKA_EPS)


def kernel_cknna(a: AlignmentKernel, b: AlignmentKernel) -> torch.Tensor:
    """CKNNA: HSIC_u on the pairs that are top-k neighbours in both spaces (row-wise mask M = M_K ⊙ M_L),
    normalised by the same quantity of each space with itself."""
    mask = a.neighbors * b.neighbors
    return hsic_unbiased(mask * a.gram, mask * b.gram) / (torch.sqrt(a.knn_self * b.knn_self) + CKA_EPS)


def linear_cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Linear CKA of feature sets x (..., n, d1) and y (..., n, d2) (no preprocessing applied here)."""
    K, L = gram(x), gram(y)
    hsic = hsic_unbiased if unbiased else hsic_biased
    return hsic(K, L) / (torch.sqrt(hsic(K, K) * hsic(L, L)) + CKA_EPS)


def cknna(x: torch.Tensor, y: torch.Tensor, topk: int = 10) -> torch.Tensor:
    """CKNNA of feature sets x (..., n, d1) and y (..., n, d2) (no preprocessing applied here)."""
    return kernel_cknna(AlignmentKernel.from_features(x, topk), AlignmentKernel.from_features(y, topk))


def morans_i(feature_map: torch.Tensor) -> torch.Tensor:
    """Moran's I of feature maps (..., h, w, d) with rook (4-neighbour) weights, no wrap-around:

    I = (N / S0) · Σ_ij w_ij ⟨z_i, z_j⟩ / Σ_i ‖z_i‖², z = x minus its per-channel spatial mean, N = h·w,
    S0 = Σ w_ij = 2 (h(w−1) + w(h−1)). Equals the variance-weighted mean of the per-channel Moran's I.
    A map without spatial variance has no defined I; it gets 0.
    """
    x = feature_map.double()
    h, w = x.shape[-3], x.shape[-2]
    if h * (w - 1) + w * (h - 1) == 0:
        raise ValueError(f"Moran's I needs a grid with at least two cells, got {h}x{w}.")
    z = x - x.mean(dim=(-3, -2), keepdim=True)
    # Each unordered neighbour pair appears twice in Σ_ij w_ij.
    horizontal = (z[..., :, 1:, :] * z[..., :, :-1, :]).sum(dim=(-3, -2, -1))
    vertical = (z[..., 1:, :, :] * z[..., :-1, :, :]).sum(dim=(-3, -2, -1))
    s0 = 2 * (h * (w - 1) + w * (h - 1))
    variance = (z * z).sum(dim=(-3, -2, -1))
    value = (h * w / s0) * 2 * (horizontal + vertical) / variance.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(variance > 0, value, torch.zeros_like(value))


def high_frequency_ratio(feature_map: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Σ_{ρ > cutoff} P / Σ_{ρ > 0} P of feature maps (..., h, w, d).

    P(u, v) = Σ_d |FFT2(x_d − mean x_d)|², ρ = sqrt(f_u² + f_v²) with f = fftfreq(h), fftfreq(w) in cycles per token
    (Nyquist 0.5; the default cut-off is half of it). A map without spatial variance has no non-DC power; it
    gets 0.
    """
    x = feature_map.double()
    h, w = x.shape[-3], x.shape[-2]
    x = (x - x.mean(dim=(-3, -2), keepdim=True)).movedim(-1, -3).contiguous()  # (..., d, h, w): fast FFT layout
    spectrum = torch.view_as_real(torch.fft.rfft2(x))  # (..., d, h, w//2 + 1, 2); real input: half the columns
    # Σ_d over a flattened (d, h·(w//2+1)·2) view: reducing the strided d axis in place is ~25x slower on CPU.
    power = spectrum.flatten(-3).square().sum(dim=-2).unflatten(-1, (h, -1, 2)).sum(dim=-1)  # (..., h, w//2 + 1)
    fu = torch.fft.fftfreq(h, dtype=torch.float64, device=x.device)
    fv = torch.fft.rfftfreq(w, dtype=torch.float64, device=x.device)
    # Each stored column v stands for v and −v, except v = 0 and (even w) the Nyquist column.
    multiplicity = torch.full_like(fv, 2.0)
    multiplicity[0] = 1.0
    if w % 2 == 0:
        multiplicity[-1] = 1.0
    radius_sq = fu[:, None] ** 2 + fv[None, :] ** 2
    high = (power * (multiplicity * (radius_sq > cutoff**2))).sum(dim=(-2, -1))
    total = (power * (multiplicity * (radius_sq > 0))).sum(dim=(-2, -1))
    return torch.where(total > 0, high / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(total))

__all__ = [
    "AlignmentKernel",
    "check_topk",
    "cknna",
    "double_center",
    "gram",
    "high_frequency_ratio",
    "hsic_biased",
    "hsic_unbiased",
    "kernel_cka",
    "kernel_cknna",
    "linear_cka",
    "morans_i",
    "prepare_features",
]
