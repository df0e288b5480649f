"""Codebook statistics over a dataset: usage, usage entropy H, effective size exp(H), cumulative top-k mass of the
most used codes, and a sorted-usage plot. The histogram and its statistics are the training-time ones
(`gear_hf.training.codebook_stats`), accumulated here over every token of an evaluation set."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..training.codebook_stats import CodebookUsage, usage_statistics
from ..training.gear_step import to_signed_unit
from .files import save_atomically

TOP_K = (1, 10, 100, 1000)


@torch.no_grad()
def codebook_counts(tokenizer, batches, device: str | torch.device = "cpu", progress: bool = True) -> torch.Tensor:
    """Histogram (K,) of the hard token indices of `tokenizer` over uint8 (B, 3, H, W) `batches`."""
    from tqdm.auto import tqdm

    usage = CodebookUsage(tokenizer.config.codebook_size, device=device)
    was_training, was_checking = tokenizer.training, tokenizer.check_input_range
    tokenizer.eval()
    tokenizer.check_input_range = False  # inputs are built from uint8: no per-batch host sync for the range check
    try:
        for batch in tqdm(batches, desc="codebook usage", disable=not progress):
            usage.update(tokenizer.encode(to_signed_unit(batch.to(device))).indices)
    finally:
        tokenizer.train(was_training)
        tokenizer.check_input_range = was_checking
    return usage.counts.cpu()


def codebook_report(counts: torch.Tensor, top_k=TOP_K) -> dict[str, float | int]:
    """JSON-ready statistics of a histogram: `usage`, `dead_codes`, `usage_entropy` (nats), `effective_size`
    (exp H), `usage_top{k}_mass`, `codebook_size`, `num_tokens`."""
    stats = {k: v.item() for k, v in usage_statistics(counts, top_k=top_k).items()}
    stats["effective_size"] = stats.pop("usage_perplexity")
    stats.update(codebook_size=int(counts.numel()), num_tokens=int(counts.sum()))
    return stats


def plot_sorted_usage(counts: torch.Tensor, path: str | os.PathLike, title: str | None = None) -> None:
    """PNG of code frequencies sorted by rank (log scale) and their cumulative mass, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freq = np.sort(counts.double().numpy())[::-1] / max(int(counts.sum()), 1)
    ranks = np.arange(1, len(freq) + 1)
    fig, left = plt.subplots(figsize=(6, 3.5), dpi=120)
    left.plot(ranks, np.where(freq > 0, freq, np.nan), color="C0")
    left.set(xscale="log", yscale="log", xlabel="code rank", ylabel="frequency", title=title or "codebook usage")
    right = left.twinx()
    right.plot(ranks, np.cumsum(freq), color="C1")
    right.set(ylabel="cumulative mass", ylim=(0, 1.02))
    fig.tight_layout()
    save_atomically(fig.savefig, path)
    plt.close(fig)


__all__ = ["TOP_K", "codebook_counts", "codebook_report", "plot_sorted_usage"]
