"""The three GEAR quantizers and the read-outs of their assignment logits.

Every quantizer maps an encoder latent z (B, D, h, w) to

* `indices` (B, h, w): the hard token of every position (raster order when flattened),
* `quantized` (B, D, h, w): the code the decoder consumes, with a straight-through gradient to z,
* `assignment_logits` A (B, h*w, K): token-to-code affinities with `argmax A == indices`, so that
  `hard_readout(A)` gives the tokens and `soft_readout(A, tau)` the soft assignment GEAR trains the AR model on
  (paper eq. 6-8). Per family (z-hat and e-hat are L2-normalised, c_k in {-1, +1}^D):

  | quantizer | A[n, k]                                  |
  |-----------|------------------------------------------|
  | vq        | -(|z-hat|^2 + |e-hat_k|^2 - 2 <z-hat, e-hat_k>) |
  | lfq       | 2 <z, c_k>                               |
  | ibq       | <z, e_k>                                 |

The formulas (including the order of operations of the straight-through estimators) follow the official GEAR
implementation, so that converted checkpoints reproduce its outputs in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .chunked_softmax import EntropyTermsFunction, SoftEmbedFunction, at_least_fp32

ENTROPY_EPS = 1e-5

# From this many assignment logits (N * K) on, `soft_embed` and `entropy_loss` take the row-chunked path of
# `chunked_softmax` (no (N, K) tensor kept for the backward, softmax recomputed there); below it the dense formulas.
# 2^23 = two blocks of `chunked_softmax.BLOCK_ELEMENTS`; with a single block chunking only adds the recomputation
# (up to 1.2x / 1.8x the CPU time of the dense soft read-out / entropy), from four blocks on it was also faster
# (0.8x / 0.4x; `benchmarks/bench_soft_readout.py`, sweep). `chunked=True / False` overrides the choice per call.
CHUNKED_MIN_ELEMENTS = 1 << 23


def _use_chunked(assignment_logits: torch.Tensor, chunked: bool | None) -> bool:
    return assignment_logits.numel() >= CHUNKED_MIN_ELEMENTS if chunked is None else chunked


def hard_readout(assignment_logits: torch.Tensor) -> torch.Tensor:
    """Hard tokens: the argmax of the assignment logits over the codebook (last) dimension."""
    return assignment_logits.argmax(dim=-1)


def soft_readout(assignment_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft assignment `softmax(A / tau)` over the codebook, computed in fp32 (tends to one-hot as tau -> 0)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use hard_readout for tau = 0.")
    return torch.softmax(assignment_logits.float() / temperature, dim=-1)


def soft_embed(
    assignment_logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    temperature: float,
    chunked: bool | None = None,
) -> torch.Tensor:
    """GEAR's soft embedding `u = softmax(A / tau) @ E` (paper eq. 8) for A (..., K) and E (K, D) -> (..., D).

    Softmax and product run in fp32 (autocast off, bf16 inputs upcast, float64 kept); the result has E's dtype.
    Gradients flow to A and E. From `CHUNKED_MIN_ELEMENTS` logits on (or with `chunked=True`) A is walked in blocks
    of rows and each block's softmax is recomputed in the backward, so no (N, K) tensor is kept; value and
    gradients equal the dense `soft_readout(A, tau) @ E` up to fp32 rounding. The chunked path has no double
    backward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use hard_readout for tau = 0.")
    if embedding_weight.dim() != 2 or assignment_logits.shape[-1] != embedding_weight.shape[0]:
        raise ValueError(f"assignment_logits (..., K) and embedding_weight (K, D) must share K; got "
                         f"{tuple(assignment_logits.shape)} and {tuple(embedding_weight.shape)}.")
    if _use_chunked(assignment_logits, chunked):
        return SoftEmbedFunction.apply(assignment_logits, embedding_weight, temperature)
    with torch.autocast(device_type=assignment_logits.device.type, enabled=False):
        probs = torch.softmax(at_least_fp32(assignment_logits) / temperature, dim=-1)
        return (probs @ at_least_fp32(embedding_weight)).to(embedding_weight.dtype)


def entropy_loss(
    assignment_logits: torch.Tensor,
    temperature: float = 0.01,
    sample_weight: float = 1.0,
    avg_weight: float = 1.0,
    sync_across_ranks: bool = False,
    chunked: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy regulariser on assignment logits (..., K): confident tokens, evenly used codebook.

    With p_n = softmax(A_n / temperature) and p-bar their mean over all tokens:
    `loss = sample_weight * mean_n H(p_n) - avg_weight * H(p-bar)`, where H(p_n) uses
    `log_softmax(A_n / temperature + 1e-5)` and `H(p-bar) = -sum p-bar log(p-bar + 1e-5)`.

    With `sync_across_ranks=True` and an initialised process group of several ranks, the value of p-bar is
    the average over all ranks while its gradient flows through the local p-bar only; after DDP averages the
    gradients this equals the gradient of one large batch. Only pass it where every rank calls this function.

    From `CHUNKED_MIN_ELEMENTS` logits on (or with `chunked=True`) the per-token terms are computed in blocks of
    rows and recomputed in the backward (`EntropyTermsFunction`): same value and gradient up to fp32 rounding,
    without the (N, K) probabilities and log-probabilities the dense formula keeps.

    Returns `(loss, sample_entropy, avg_entropy)`, all fp32 scalars (float64 for float64 logits).
    """
    if _use_chunked(assignment_logits, chunked):
        row_sums, prob_sums = EntropyTermsFunction.apply(assignment_logits, temperature, ENTROPY_EPS)
        sample_entropy = -row_sums.mean()
        avg_probs = prob_sums / row_sums.shape[0]
    else:
        logits = at_least_fp32(assignment_logits.reshape(-1, assignment_logits.shape[-1])) / temperature
        probs = torch.softmax(logits, dim=-1)
        log_probs = torch.log_softmax(logits + ENTROPY_EPS, dim=-1)
        sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
        avg_probs = probs.mean(dim=0)
    if sync_across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            global_avg_probs = avg_probs.detach().clone()
            dist.all_reduce(global_avg_probs, op=dist.ReduceOp.SUM)
            global_avg_probs /= dist.get_world_size()
        avg_probs = avg_probs + (global_avg_probs - avg_probs).detach()
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + ENTROPY_EPS))
    loss = sample_weight * sample_entropy - avg_weight * avg_entropy
    return loss, sample_entropy, avg_entropy


@dataclass
class QuantizerOutput:
    """What a quantizer returns. Loss fields are set in training mode only (None in eval mode)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    assignment_logits: torch.Tensor | None = None
    codebook_loss: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None
    entropy_loss: torch.Tensor | None = None
    sample_entropy: torch.Tensor | None = None
    avg_entropy: torch.Tensor | None = None


class Quantizer(nn.Module):
    """Shared plumbing: layout changes, the entropy term and the output record. Subclasses implement `_quantize`."""

    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        commit_loss_beta: float = 0.25,
        entropy_loss_ratio: float = 0.05,
        entropy_temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        avg_entropy_weight: float = 1.0,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.commit_loss_beta = commit_loss_beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight = sample_entropy_weight
        self.avg_entropy_weight = avg_entropy_weight

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors (..., D) of integer tokens of any shape."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor, return_assignment: bool = False) -> QuantizerOutput:
        """Quantize `z` (B, D, h, w); `return_assignment=True` also returns A as (B, h*w, K)."""
        batch, _, height, width = z.shape
        z_flat = z.permute(0, 2, 3, 1).contiguous().view(batch * height * width, self.embed_dim)
        # Distances/logits, argmax and losses in fp32 even under bf16 autocast: near-ties between codes must not
        # be decided by bf16 rounding (the official trainer ran them in bf16, so its tokens differed by stage).
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self._quantize(z_flat.float(), need_logits=return_assignment or self.training)
        logits = out["logits"]
        result = QuantizerOutput(
            quantized=self._to_channels_first(out["quantized"].reshape(batch, height, width, self.embed_dim)),
            indices=out["indices"].reshape(batch, height, width).long(),
            assignment_logits=logits.reshape(batch, height * width, -1) if return_assignment else None,
        )
        if self.training:
            total, result.sample_entropy, result.avg_entropy = entropy_loss(
                logits,
                temperature=self.entropy_temperature,
                sample_weight=self.sample_entropy_weight,
                avg_weight=self.avg_entropy_weight,
                sync_across_ranks=True,
            )
            result.entropy_loss = self.entropy_loss_ratio * total
            result.codebook_loss = out["codebook_loss"]
            result.commitment_loss = out["commitment_loss"]
        return result

    def _to_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> (B, D, h, w).

        Convolutions round differently for channels-last and contiguous inputs, so every family hands the decoder
        the memory layout the reference produces (needed for 1e-5 parity of full-size reconstructions).
        LFQ: contiguous.
        """
        return x.permute(0, 3, 1, 2).contiguous()

    def _quantize(self, z_flat: torch.Tensor, need_logits: bool) -> dict:
        """(N, D) latents -> dict(quantized (N, D), indices (N,), logits (N, K) or None, and training losses)."""
        raise NotImplementedError


class VectorQuantizer(Quantizer):
    """Nearest-neighbour VQ on the unit sphere (LlamaGen VQGAN, `codebook_l2_norm=True`).

    Both latents and codes are L2-normalised, so the decoder sees unit-norm codes and decoding from indices
    uses the normalised codebook rows. Losses: `codebook = mean((e - sg(z))^2)`,
    `commitment = beta * mean((sg(e) - z)^2)`.
    """

    def __init__(self, codebook_size: int, embed_dim: int, **loss_kwargs):
        super().__init__(codebook_size, embed_dim, **loss_kwargs)
        self.embedding = nn.Embedding(codebook_size, embed_dim)

    def _to_channels_first(self, x):
        return x.permute(0, 3, 1, 2)  # the reference permutes a (B, h, w, D) tensor: a channels-last view

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.normalized_codebook()[indices]

    def _quantize(self, z_flat, need_logits):
        z = F.normalize(z_flat, p=2, dim=-1)
        codebook = self.normalized_codebook()
        # Written out as |z|^2 + |e|^2 - 2<z, e> (not 2 - 2cos) to match the reference bit for bit.
        distance = torch.sum(z**2, dim=1, keepdim=True) + torch.sum(codebook**2, dim=1) - 2 * (z @ codebook.t())
        indices = torch.argmin(distance, dim=1)
        codes = codebook[indices]
        out = {"indices": indices, "logits": -distance}
        if self.training:
            out["codebook_loss"] = torch.mean((codes - z.detach()) ** 2)
            out["commitment_loss"] = self.commit_loss_beta * torch.mean((codes.detach() - z) ** 2)
        out["quantized"] = z + (codes - z).detach()
        return out


class LookupFreeQuantizer(Quantizer):
    """Lookup-free quantisation (Open-MAGVIT2): every latent channel becomes one bit, its sign.

    Channel i is bit i of the token, least-significant first: token = sum_i [z_i > 0] 2^i (z_i = 0 counts as
    negative). The implicit codebook row k is the +-1 pattern of k's bits; there are no parameters.
    Losses: `codebook = 0`, `commitment = beta * mean((z - sg(sign z))^2)`.
    """

    def _bit_weights(self, device) -> torch.Tensor:
        return 2 ** torch.arange(self.embed_dim, device=device, dtype=torch.long)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        bits = (indices.long().unsqueeze(-1) & self._bit_weights(indices.device)) != 0
        return bits.float() * 2.0 - 1.0

    def codebook(self, device=None) -> torch.Tensor:
        """All K sign patterns as a (K, D) float tensor."""
        return self.codes_from_indices(torch.arange(self.codebook_size, device=device))

    def _quantize(self, z_flat, need_logits):
        one = torch.ones((), device=z_flat.device, dtype=z_flat.dtype)
        signs = torch.where(z_flat > 0, one, -one)
        indices = ((signs > 0).long() * self._bit_weights(z_flat.device)).sum(dim=-1)
        out = {"indices": indices, "logits": None}
        if need_logits:
            out["logits"] = 2.0 * (z_flat @ self.codebook(z_flat.device).to(z_flat.dtype).t())
        if self.training:
            out["codebook_loss"] = torch.zeros((), device=z_flat.device, dtype=z_flat.dtype)
            out["commitment_loss"] = self.commit_loss_beta * F.mse_loss(z_flat, signs.detach())
        out["quantized"] = z_flat + (signs - z_flat).detach()
        return out


class IndexBackpropQuantizer(Quantizer):
    """Index backpropagation quantisation (IBQ): inner-product logits against an unnormalised codebook.

    The forward value is the code of the argmax token; the gradient reaches all codes through the softmax
    of the logits (`one_hot - sg(softmax) + softmax`). Without gradients the dense one-hot product is
    replaced by the equal, cheaper gather of the selected rows. Losses (the reference's single quantiser
    loss, reported as `codebook_loss`; `commitment = 0`):
    `mean((e_st - z)^2) + mean((sg(e) - z)^2) + beta * mean((e - sg(z))^2)`.
    """

    def __init__(self, codebook_size: int, embed_dim: int, **loss_kwargs):
        super().__init__(codebook_size, embed_dim, **loss_kwargs)
        self.embedding = nn.Embedding(codebook_size, embed_dim)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding.weight[indices]

    def _to_channels_first(self, x):
        # The reference's einsum returns a channels-last result for batches, a contiguous one for a single image.
        x = x.permute(0, 3, 1, 2)
        return x if x.shape[0] > 1 else x.contiguous()

    def _quantize(self, z_flat, need_logits):
        codebook = self.embedding.weight
        logits = z_flat @ codebook.t()
        soft = torch.softmax(logits, dim=-1)
        # The reference picks the argmax of the softmax, not of the logits (they differ only on float ties).
        indices = soft.argmax(dim=-1)
        out = {"indices": indices, "logits": logits}
        needs_grad = torch.is_grad_enabled() and (z_flat.requires_grad or codebook.requires_grad)
        if needs_grad or self.training:
            hard = torch.zeros_like(logits).scatter_(-1, indices[:, None], 1.0)
            codes_st = (hard - soft.detach() + soft) @ codebook
            codes = hard @ codebook
            out["quantized"] = codes_st
        else:
            out["quantized"] = codebook[indices]
        if self.training:
            out["codebook_loss"] = (
                torch.mean((codes_st - z_flat) ** 2)
                + torch.mean((codes.detach() - z_flat) ** 2)
                + self.commit_loss_beta * torch.mean((codes - z_flat.detach()) ** 2)
            )
            out["commitment_loss"] = torch.zeros((), device=z_flat.device, dtype=z_flat.dtype)
        return out


QUANTIZER_CLASSES = {"vq": VectorQuantizer, "lfq": LookupFreeQuantizer, "ibq": IndexBackpropQuantizer}


def build_quantizer(config) -> Quantizer:
    """The quantizer described by a `GEARTokenizerConfig`."""
    return QUANTIZER_CLASSES[config.quantizer](
        codebook_size=config.codebook_size,
        embed_dim=config.codebook_embed_dim,
        commit_loss_beta=config.commit_loss_beta,
        entropy_loss_ratio=config.entropy_loss_ratio,
        entropy_temperature=config.entropy_temperature,
        sample_entropy_weight=config.sample_entropy_weight,
        avg_entropy_weight=config.avg_entropy_weight,
    )


__all__ = [
    "IndexBackpropQuantizer",
    "LookupFreeQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "build_quantizer",
    "entropy_loss",
    "hard_readout",
    "soft_embed",
    "soft_readout",
]
