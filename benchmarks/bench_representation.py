"""Benchmark the representation analysis (`gear_hf.evaluation.representation.analyse`) on this machine: images/s,
random weights, fp32. Prints JSON.

Two configurations:

* `tiny`: the test models (VQ K=64 at 32 px → 8×8 tokens, 3-layer 64-d AR, 1-layer DINOv2 with 4 px patches);
* `B`:    the full VQ-16 tokenizer (K = 16384) at 256 px → 16×16 tokens, LlamaGen-B (12 × 768), a DINOv2-base-sized
          teacher (ViT-B/14, random init; 224 px input), i.e. the per-image work of the paper's analysis for a B model
          (Figure 5 uses L: 24 × 1024, about 3× the AR compute).

`analyse` runs unmodified over a `datasets.Dataset` of PNG-encoded random images (decode, resize/crop, DataLoader
included) with one image-level chunk of all images. Its phases are timed by wrapping what it calls:

| phase      | what                                                                                  |
|------------|---------------------------------------------------------------------------------------|
| teacher    | teacher forward (patch tokens on the token grid)                                      |
| tokenizer  | `encode(return_latent=True)`: pre- and post-quantization features, tokens             |
| ar         | teacher-forced AR forward returning the hidden state of every layer                   |
| statistics | PRH preprocessing, CKA + CKNNA (patch and image level), Moran's I, FFT ratio, all maps |

`other` = wall time − the phases (data loading, host copies, progress bar).

    python benchmarks/bench_representation.py [--configs tiny B] [--images-tiny 64] [--images-b 8]
                                              [--batch-size-b 4] [--threads N] [--output f.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from collections import defaultdict

import numpy as np
import torch


def build_models(name: str):
    from transformers import Dinov2Config, Dinov2Model

    from gear_hf import GEARConfig, GEARForCausalImageLM, GEARTokenizerConfig, GEARTokenizerModel
    from gear_hf.training.alignment import DINOv2Teacher

    torch.manual_seed(0)
    if name == "tiny":
        tokenizer = GEARTokenizerModel(GEARTokenizerConfig(
            quantizer="vq", codebook_size=64, image_size=32, base_channels=32, channel_multipliers=[1, 1, 2],
            num_res_blocks=1, z_channels=16, codebook_embed_dim=8))
        ar = GEARForCausalImageLM(GEARConfig(vocab_size=64, num_classes=10, hidden_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=32, downsample_factor=4))
        teacher = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, patch_size=4, image_size=32))
        grid = 8
    else:
        tokenizer = GEARTokenizerModel(GEARTokenizerConfig.from_preset("VQ-16"))
        ar = GEARForCausalImageLM(GEARConfig.from_preset("LlamaGen-B", vocab_size=16384, image_size=256))
        teacher = Dinov2Model(Dinov2Config())  # ViT-B/14 sizes
        grid = 16
    tokenizer.eval().check_input_range = False
    return tokenizer, ar.eval(), DINOv2Teacher(teacher.eval(), grid), grid


def random_image_dataset(num_images: int, size: int, num_classes: int):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(num_images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "label": datasets.ClassLabel(num_classes=num_classes)})
    labels = rng.integers(0, num_classes, num_images).tolist()
    return datasets.Dataset.from_dict({"image": pngs, "label": labels}, features=features)


def bench(name: str, num_images: int, batch_size: int) -> dict:
    from gear_hf.evaluation import representation
    from gear_hf.evaluation.representation import AnalysedModel, AnalysisSettings, EvalImageDataset, analyse

    tokenizer, ar, teacher, grid = build_models(name)
    size = tokenizer.config.image_size
    dataset = EvalImageDataset(random_image_dataset(num_images, size, ar.config.num_classes), size)
    settings = AnalysisSettings(chunk_size=num_images, batch_size=batch_size, progress=False)
    phases = defaultdict(float)

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            phases[phase] += time.perf_counter() - start
            return out
        return wrapper

    originals = (representation.tokenizer_features, representation.ar_hidden_features,
                 representation.RepresentationStats.add_batch, teacher.forward)
    representation.tokenizer_features = timed(originals[0], "tokenizer")
    representation.ar_hidden_features = timed(originals[1], "ar")
    representation.RepresentationStats.add_batch = timed(originals[2], "statistics")
    teacher.forward = timed(originals[3], "teacher")
    try:
        start = time.perf_counter()
        analyse([AnalysedModel(name, "random", tokenizer, ar)], teacher, dataset, grid, settings)
        wall = time.perf_counter() - start
    finally:
        (representation.tokenizer_features, representation.ar_hidden_features,
         representation.RepresentationStats.add_batch) = originals[:3]
    phases["other"] = wall - sum(phases.values())
    return {
        "images": num_images, "batch_size": batch_size, "image_size": size, "token_grid": grid,
        "ar_layers": ar.config.num_hidden_layers, "ar_hidden_size": ar.config.hidden_size,
        "wall_s": round(wall, 3), "images_per_s": round(num_images / wall, 4),
        "s_per_image": {k: round(v / num_images, 5) for k, v in phases.items()},
        "share": {k: round(v / wall, 4) for k, v in phases.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "B"], choices=["tiny", "B"])
    parser.add_argument("--images-tiny", type=int, default=64)
    parser.add_argument("--batch-size-tiny", type=int, default=16)
    parser.add_argument("--images-b", type=int, default=12)
    parser.add_argument("--batch-size-b", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "configs": {}}
    for name in args.configs:
        images, batch = (args.images_tiny, args.batch_size_tiny) if name == "tiny" else (args.images_b,
                                                                                        args.batch_size_b)
        result["configs"][name] = bench(name, images, batch)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
