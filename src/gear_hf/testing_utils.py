"""Exact CPU memory accounting for tests and benchmarks (no CUDA needed).

`peak_allocated_bytes` replays the allocator events the PyTorch profiler records (every tensor allocation and free
through PyTorch's CPU allocator, with its address and size), so its figure is deterministic, unlike RSS deltas.
Memory that libraries allocate outside PyTorch's allocator (e.g. BLAS packing buffers) is not seen.
`saved_tensor_bytes` counts what autograd keeps between forward and backward.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(
    fn: Callable[[], Any], ignore: Callable[[Any], Iterable[torch.Tensor]] = lambda result: ()
) -> tuple[int, Any]:
    """`(peak, fn())`: the peak over time of the CPU tensor bytes allocated by `fn` and still live.

    Tensors that `ignore(result)` returns (e.g. the gradients fn computes) are left out of the count for as long
    as they live, so `peak` is the working memory fn needed beyond what it hands back.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    ignored = {t.untyped_storage().data_ptr() for t in ignore(result)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    allocations = sorted((e["ts"], e["args"]["Ev Idx"], e["args"]["Addr"], e["args"]["Bytes"])
                         for e in events if e.get("name") == "[memory]" and e["args"]["Device Type"] == 0)
    # An address can be reused: only the last allocation at an ignored address is the returned tensor.
    last_at = {addr: i for i, (_, _, addr, size) in enumerate(allocations) if size > 0 and addr in ignored}
    skip = set(last_at.values())
    live = peak = 0
    for i, (*_, size) in enumerate(allocations):
        if i not in skip:
            live += size
            peak = max(peak, live)
    return peak, result


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """`(bytes, fn())`: the bytes of distinct storages autograd saves for the backward while fn runs,
    storages of `exclude` (e.g. the inputs, which exist anyway) left out."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return total, result
