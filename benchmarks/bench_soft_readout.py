"""Benchmark the row-chunked soft read-out and entropy regulariser against their dense formulas (CPU, fp32).

With assignment logits A (N, K) and the AR's embedding table E (K, D), for both paths (`chunked=False / True`):

* `soft_embed`: u = softmax(A / tau) E, forward + backward to A and E, and to A only (E frozen, as in GEAR's
  soft branch);
* `entropy_loss`: the quantizer's entropy regulariser (T = 0.01), forward + backward to A.

Memory (`activation_mib`): the peak, over the forward and backward, of the bytes allocated and still live,
replayed exactly from the allocator events the PyTorch profiler records (`gear_hf.testing_utils.
peak_allocated_bytes`; deterministic, unlike RSS). A, E and the upstream gradient exist before and are not counted;
the returned gradients are excluded for as long as they live; the output u (N x D) is counted. `saved_mib` is what
autograd keeps between forward and backward beyond A and E. Allocations outside PyTorch's allocator (BLAS
workspaces) are not seen. Time: best of `--repeats` forward+backward runs with the profiler off; on CPU the dense
path also pays page faults on its fresh (N, K) buffers. `cpu_seconds` is the process CPU time (all threads): on a
shared machine it tracks the work done better than wall time. `max_rel_diff`: max |chunked - dense| / max |dense| over
the outputs and gradients. `sweep`: both paths' times at growing N*K (the basis of `CHUNKED_MIN_ELEMENTS`).

    python benchmarks/bench_soft_readout.py [--rows 8192] [--codebook-size 16384] [--dim 1024] [--repeats 2]
                                            [--threads N] [--no-sweep] [--output f.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from gear_hf.models import quantizers
from gear_hf.models.chunked_softmax import BLOCK_ELEMENTS
from gear_hf.models.quantizers import entropy_loss, soft_embed
from gear_hf.testing_utils import peak_allocated_bytes, saved_tensor_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import emit_report  # noqa: E402

MIB = 1 << 20
SWEEP = [(64, 1024, 256), (256, 4096, 256), (1024, 4096, 256), (512, 16384, 256), (1024, 16384, 256),
         (2048, 16384, 256), (4096, 16384, 256)]


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def soft_embed_run(logits, weight, grad_out, temperature, chunked, weight_grad):
    inputs = (logits, weight) if weight_grad else (logits,)
    weight = weight if weight_grad else weight.detach()

    def run():
        out = soft_embed(logits, weight, temperature, chunked=chunked)
        return (out.detach(),), torch.autograd.grad(out, inputs, grad_out)

    return run


def entropy_run(logits, chunked):
    def run():
        loss, sample, avg = entropy_loss(logits, temperature=0.01, chunked=chunked)
        return (loss.detach(), sample.detach(), avg.detach()), torch.autograd.grad(loss, logits)

    return run


def seconds(run, repeats: int) -> dict:
    """Best wall time and best process CPU time (all threads) of `repeats` runs."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall = min(wall, time.perf_counter() - start_wall)
        cpu = min(cpu, time.process_time() - start_cpu)
    return {"seconds": round(wall, 4), "cpu_seconds": round(cpu, 4)}


def max_rel_diff(result, reference) -> float:
    pairs = zip((*result[0], *result[1]), (*reference[0], *reference[1]))
    return max(((r - d).abs().max() / d.abs().max().clamp_min(1e-30)).item() for r, d in pairs)


def compare(make_run, saved_fn, exclude, repeats: int) -> dict:
    """Dense and chunked figures of one case; `make_run(chunked)` gives a zero-argument forward+backward
    returning `(outputs, gradients)`."""
    paths, outputs = {}, {}
    for name, chunked in (("dense", False), ("chunked", True)):
        peak, outputs[name] = peak_allocated_bytes(make_run(chunked), ignore=lambda result: result[1])
        saved, _ = saved_tensor_bytes(lambda: saved_fn(chunked), exclude=exclude)
        paths[name] = {"activation_mib": round(peak / MIB, 1), "saved_mib": round(saved / MIB, 1),
                       **seconds(make_run(chunked), repeats)}
    return {**paths, "memory_ratio": round(paths["chunked"]["activation_mib"] / paths["dense"]["activation_mib"], 4),
            **time_ratios(paths["chunked"], paths["dense"]), "max_rel_diff": max_rel_diff(outputs["chunked"],
                                                                                          outputs["dense"])}


def time_ratios(chunked: dict, dense: dict, prefix: str = "") -> dict:
    return {f"{prefix}time_ratio": round(chunked["seconds"] / dense["seconds"], 3),
            f"{prefix}cpu_time_ratio": round(chunked["cpu_seconds"] / dense["cpu_seconds"], 3)}


def headline(n: int, k: int, d: int, tau: float, repeats: int, generator: torch.Generator) -> dict:
    """Dense vs chunked soft_embed (trainable and frozen embedding table) and entropy_loss at (N, K, D)."""
    logits = (3 * torch.randn(n, k, generator=generator)).requires_grad_()
    weight = (0.02 * torch.randn(k, d, generator=generator)).requires_grad_()
    grad_out = torch.randn(n, d, generator=generator)
    report = {}
    for name, weight_grad in (("soft_embed", True), ("soft_embed_frozen_embedding", False)):
        report[name] = compare(
            lambda chunked: soft_embed_run(logits, weight, grad_out, tau, chunked, weight_grad),
            lambda chunked: soft_embed(logits, weight if weight_grad else weight.detach(), tau, chunked=chunked),
            (logits, weight), repeats)
        print(f"done: {name}", file=sys.stderr)
    report["entropy_loss"] = compare(lambda chunked: entropy_run(logits, chunked),
                                     lambda chunked: entropy_loss(logits, chunked=chunked), (logits,), repeats)
    print("done: entropy_loss", file=sys.stderr)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192, help="N = batch x tokens (32 x 256)")
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=1024, help="D of the AR embedding table")
    parser.add_argument("--temperature", type=float, default=0.1, help="soft read-out tau (train_gear.sh: 0.1)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, k, d = args.rows, args.codebook_size, args.dim
    # A, its gradient, the dense entropy's ~5 (N, K) buffers, E and its gradient, with a margin
    needed = int(1.3 * (7 * n * k + 3 * k * d) * 4)
    if available_bytes() < needed:
        sys.exit(f"needs about {needed / 2**30:.1f} GiB free, {available_bytes() / 2**30:.1f} GiB available; "
                 f"lower --rows or --codebook-size.")

    generator = torch.Generator().manual_seed(0)
    tau = args.temperature
    report = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "dtype": "float32",
        "shape": {"N": n, "K": k, "D": d}, "dense_nk_tensor_mib": round(n * k * 4 / MIB, 1),
        "block_rows": max(1, BLOCK_ELEMENTS // k), "chunked_min_elements": quantizers.CHUNKED_MIN_ELEMENTS,
        **headline(n, k, d, tau, args.repeats, generator),  # its (N, K) tensors are freed on return
    }

    if not args.no_sweep:
        report["sweep"] = []
        for rows, size, dim in SWEEP:
            a = (3 * torch.randn(rows, size, generator=generator)).requires_grad_()
            e = (0.02 * torch.randn(size, dim, generator=generator)).requires_grad_()
            g = torch.randn(rows, dim, generator=generator)
            row = {"N": rows, "K": size, "D": dim, "elements": rows * size}
            for case, make_run in (("soft_embed", lambda c: soft_embed_run(a, e, g, tau, c, True)),
                                   ("entropy", lambda c: entropy_run(a, c))):
                dense, chunked = (seconds(make_run(c), args.repeats + 1) for c in (False, True))
                row.update({f"{case}_dense": dense, f"{case}_chunked": chunked,
                            **time_ratios(chunked, dense, prefix=f"{case}_")})
            report["sweep"].append(row)
            print(f"done: sweep {rows}x{size}", file=sys.stderr)

    emit_report(report, args.output)

if __name__ == "__main__":
    main()
