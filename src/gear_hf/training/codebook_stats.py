"""Codebook health statistics, computed on device with no host synchronisation (spec §7.3, expectations 4.5).

* `CodebookUsage` accumulates a histogram of hard indices over a window of steps (one `index_add_` per step) and,
  when asked, reports usage = used codes / K, dead codes, the entropy H of the usage histogram and the
  effective codebook size exp(H). Histograms are summed across ranks, which equals taking the unique indices
  of the all-gathered batch.
* `assignment_statistics` summarises per-token assignment distributions softmax(A/τ): mean entropy, exp of
  it, and the cumulative probability mass of the top-{1, 10, 100, 1000} codes. The official logs use τ = 1
  ("codebook/…", the natural assignment) and the training τ ("soft/…", what the AR's soft branch sees).

All values are 0-dim tensors; call `.item()` (one sync) only when logging.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last axis, with 0·log 0 = 0."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)


class CodebookUsage:
    """Histogram of code indices accumulated since the last `compute(reset=True)`."""

    def __init__(self, codebook_size: int, device: torch.device | str | None = None):
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        indices = indices.detach().reshape(-1).long()
        if self.counts.device != indices.device:
            self.counts = self.counts.to(indices.device)
        # index_add_ into the fixed-size histogram: bincount would sync on CUDA to size its output.
        self.counts.index_add_(0, indices, torch.ones_like(indices))

    @torch.no_grad()
    def compute(self, accelerator=None, reset: bool = True) -> dict[str, torch.Tensor]:
        """Usage statistics over the window; with an `accelerator`, over all ranks (collective: call on every rank)."""
        counts = self.counts
        if accelerator is not None and accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.clone(), reduction="sum")
        stats = usage_statistics(counts)
        if reset:
            self.counts.zero_()
        return stats


def usage_statistics(counts: torch.Tensor, top_k: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """Statistics of a code-count histogram (K,): usage (used codes / K), dead codes, entropy H (nats) of the
    usage distribution and exp(H) (`usage_perplexity`, the effective codebook size); with `top_k`, also
    `usage_top{k}_mass`, the share of all tokens taken by the k most used codes (k capped at K)."""
    used = (counts > 0).sum()
    probs = counts.double() / counts.sum().clamp_min(1)
    entropy = _entropy(probs).float()
    stats = {
        "usage": used.float() / counts.numel(),
        "dead_codes": counts.numel() - used,
        "usage_entropy": entropy,
        "usage_perplexity": entropy.exp(),
    }
    if top_k:
        cumulative = probs.sort(descending=True).values.cumsum(0).float()
        for k in top_k:
            stats[f"usage_top{k}_mass"] = cumulative[min(k, counts.numel()) - 1]
    return stats


@torch.no_grad()
def assignment_statistics(
    assignment_logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Sequence[int] = (1, 10, 100, 1000),
    prefix: str = "",
    accelerator=None,
) -> dict[str, torch.Tensor]:
    """Mean per-token statistics of softmax(A/τ) for assignment logits A (…, K) (A = −d for VQ), in fp32.

    Returns `{prefix}entropy` (nats), `{prefix}effective_size` (exp of the mean entropy) and
    `{prefix}top{k}_mass` (mean cumulative probability of the k most likely codes; k is capped at K).
    With an `accelerator`, the means are averaged over ranks (equal local batches assumed; collective).
    """
    logits = assignment_logits.detach().float().reshape(-1, assignment_logits.shape[-1])
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(dim=-1).mean()
    k_max = min(max(top_k), logits.shape[-1])
    cumulative = probs.topk(k_max, dim=-1, sorted=True).values.cumsum(dim=-1).mean(dim=0)
    if accelerator is not None and accelerator.num_processes > 1:
        reduced = accelerator.reduce(torch.cat([entropy[None], cumulative]), reduction="mean")
        entropy, cumulative = reduced[0], reduced[1:]
    stats = {f"{prefix}entropy": entropy, f"{prefix}effective_size": entropy.exp()}
    for k in top_k:
        stats[f"{prefix}top{k}_mass"] = cumulative[min(k, k_max) - 1]
    return stats
