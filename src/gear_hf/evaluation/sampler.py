"""Resumable, process-count-independent sampling for evaluation: a `GEARPipeline` → an ADM-format `samples.npz`.

* Image i's condition (class label or prompt) and its sampling generator are fixed by i alone: labels are drawn
  once for the whole run from `seed`, and image i's generator is seeded from `SeedSequence([seed, i])`. With the
  pipeline's per-image generators, the set is the same whatever the number of processes or the batch size.
* Work is split into shards of `shard_size` consecutive indices, shard s on process s mod world_size. Each
  finished shard is written atomically (temporary name, then `os.replace`), so a killed run resumes with its
  finished shards kept; a run with other settings in the same directory is refused.
* Images are decoded from the sampled tokens, optionally bicubic-resized (on the [-1, 1] floats, no antialias, as
  GEAR's `--image-size-eval`), then quantised exactly as the GEAR sampler (`to_uint8`), and packed in index order
  into `samples.npz` (`arr_0`: uint8 N×H×W×3; `arr_1`: class labels) with `samples.json` beside it.

Class labels: `"uniform"` (default) draws each label uniformly at random from the seed, as GEAR's
`src/inference.py` does for the paper's numbers (its draws depend on the number of processes; ours do not);
`"balanced"` gives every class N / num_classes images (±1), in a seeded random order so the contiguous
Inception-Score splits stay unbiased.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile

import numpy as np
import torch

from .files import save_atomically, savez_atomically
from .npz import npz_array_info

logger = logging.getLogger(__name__)

LABEL_MODES = ("uniform", "balanced")
# Evaluation presets: the official protocol (Table 1, w/o CFG) and the paper's guided columns (w/ CFG 1.5).
EVAL_PRESETS = {
    "fid": {"preset": "fid"},
    "fid-cfg1.5": {"preset": "fid", "guidance_scale": 1.5},
}
PLAN_FILE = "plan.json"


def class_labels_for(num_images: int, num_classes: int, seed: int = 0, mode: str = "uniform") -> np.ndarray:
    """The class label of every image index (int64, (num_images,)); depends only on the arguments."""
    if mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {LABEL_MODES}, got {mode!r}.")
    if num_images < 1 or num_classes < 1:
        raise ValueError(f"num_images and num_classes must be >= 1, got {num_images} and {num_classes}.")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    if mode == "uniform":
        return rng.integers(0, num_classes, size=num_images, dtype=np.int64)
    labels = np.tile(np.arange(num_classes, dtype=np.int64), -(-num_images // num_classes))[:num_images]
    return rng.permutation(labels)


def image_seed(seed: int, index: int) -> int:
    """The 63-bit seed of image `index`'s sampling generator."""
    state = np.random.SeedSequence([seed, 0, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2 ** 63 - 1)


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def _write_json(path: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True)
    save_atomically(lambda tmp: tmp.write_text(text, encoding="utf-8"), path)


def _check_plan(shard_dir: str, plan: dict) -> None:
    path = os.path.join(shard_dir, PLAN_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    changed = {k: (previous.get(k), v) for k, v in plan.items() if previous.get(k) != v}
    if changed:
        raise ValueError(f"{shard_dir} holds shards of a run with other settings ({changed}, as (old, new)); "
                         "resume with the same settings, or use another --output-dir.")


def _shard_ok(path: str, indices: np.ndarray) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        with np.load(path) as shard:  # the images' row count from their header, not by decompressing them
            return (np.array_equal(shard["indices"], indices)
                    and npz_array_info(path, "images").shape[0] == len(indices))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        logger.warning("Shard %s is unreadable; sampling it again.", path)
        return False


def _save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    save_atomically(Image.fromarray(image).save, path)


@torch.no_grad()
def sample_batch(pipe, conditions: list, seeds: list[int], sampling: dict, image_size_eval: int | None,
                  device: torch.device) -> tuple[np.ndarray, dict]:
    """uint8 NHWC images of one batch, and the pipeline's resolved sampling settings."""
    from ..pipelines.pipeline_gear import to_uint8

    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    if isinstance(conditions[0], str):  # text-to-image: the pipeline's own defaults apart from the guidance
        out = pipe(prompt=conditions, guidance_scale=sampling.get("guidance_scale", 1.0), generator=generators,
                   output_type="latent")
    else:
        out = pipe(conditions, generator=generators, output_type="latent", **sampling)
    images = pipe.vq_model.decode(out.images).float()
    if image_size_eval is not None and image_size_eval != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(image_size_eval, image_size_eval), mode="bicubic")
    config = getattr(out, "sampling_config", None)
    return to_uint8(images).cpu().numpy(), (config.to_dict() if hasattr(config, "to_dict") else dict(config or {}))


def _write_samples_npz(path: str, shard_paths: list[str], shape: tuple[int, ...], labels: np.ndarray | None) -> None:
    """Stream the shards into one ADM `.npz` (arr_0 images, arr_1 labels) without holding all images in memory."""

    def write(tmp) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_2_0(member, header)
                for shard_path in shard_paths:
                    with np.load(shard_path) as shard:
                        member.write(np.ascontiguousarray(shard["images"]).tobytes())
            if labels is not None:
                with archive.open("arr_1.npy", "w") as member:
                    np.lib.format.write_array(member, labels)

    save_atomically(write, path)


def sample_for_evaluation(pipe, output_dir: str | os.PathLike, *, num_images: int | None = None,
                          prompts: list[str] | None = None, label_mode: str = "uniform", seed: int = 0,
                          batch_size: int = 32, shard_size: int = 1000, preset: str = "fid",
                          guidance_scale: float | None = None, image_size_eval: int | None = None,
                          save_png: bool = False, accelerator=None, record: dict | None = None) -> str:
    """Sample `num_images` class-conditional images (or one per prompt of `prompts`) into
    `output_dir/samples.npz` (see module docstring); returns its path. Call it on every process."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator()
    if preset not in EVAL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(EVAL_PRESETS)}, got {preset!r}.")
    sampling = dict(EVAL_PRESETS[preset])
    if guidance_scale is not None:
        sampling["guidance_scale"] = float(guidance_scale)
    if prompts is not None:
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings.")
        if num_images is not None and num_images != len(prompts):
            raise ValueError(f"num_images={num_images} but {len(prompts)} prompts were given (one image each).")
        conditions, labels, num_images = list(prompts), None, len(prompts)
    else:
        if num_images is None:
            raise ValueError("Pass num_images (class-conditional) or prompts (text-to-image).")
        labels = class_labels_for(num_images, pipe.transformer.config.num_classes, seed, label_mode)
        conditions = labels.tolist()
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")

    output_dir = str(output_dir)
    shard_dir = os.path.join(output_dir, "shards")
    png_dir = os.path.join(output_dir, "png")
    plan = {"num_images": num_images, "seed": seed, "shard_size": shard_size, "label_mode": label_mode,
            "conditions_sha256": _digest(conditions), "sampling": sampling, "image_size_eval": image_size_eval}
    if accelerator.is_main_process:
        os.makedirs(shard_dir, exist_ok=True)
        if save_png:
            os.makedirs(png_dir, exist_ok=True)
        _check_plan(shard_dir, plan)
        _write_json(os.path.join(shard_dir, PLAN_FILE), plan)
    accelerator.wait_for_everyone()
    _check_plan(shard_dir, plan)  # every rank: a stale plan must stop all of them

    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    num_shards = -(-num_images // shard_size)
    shard_paths = [os.path.join(shard_dir, f"shard_{s:06d}.npz") for s in range(num_shards)]
    mine = [s for s in range(accelerator.process_index, num_shards, accelerator.num_processes)]
    todo = [s for s in mine if not _shard_ok(shard_paths[s], np.arange(s * shard_size,
                                                                        min((s + 1) * shard_size, num_images)))]
    if accelerator.is_main_process and len(todo) < len(mine):
        logger.info("Resuming: %d of this process's %d shards are done.", len(mine) - len(todo), len(mine))
    started = time.time()
    total = sum(min(shard_size, num_images - s * shard_size) for s in todo)
    with tqdm(total=total, desc="sampling", unit="img", disable=not accelerator.is_local_main_process) as bar:
        for s in todo:
            indices = np.arange(s * shard_size, min((s + 1) * shard_size, num_images))
            parts = []
            for start in range(0, len(indices), batch_size):
                batch = indices[start:start + batch_size]
                images, config = sample_batch(pipe, [conditions[i] for i in batch],
                                              [image_seed(seed, int(i)) for i in batch], sampling,
                                              image_size_eval, accelerator.device)
                parts.append(images)
                bar.update(len(batch))
            images = np.concatenate(parts)
            if save_png:
                for index, image in zip(indices, images):
                    _save_png(os.path.join(png_dir, f"{index:06d}.png"), image)
            savez_atomically(shard_paths[s], images=images, indices=indices, sampling_config=json.dumps(config))
    accelerator.wait_for_everyone()

    samples_path = os.path.join(output_dir, "samples.npz")
    if accelerator.is_main_process:
        shape = (num_images, *npz_array_info(shard_paths[0], "images").shape[1:])
        with np.load(shard_paths[0]) as first:
            sampling_config = json.loads(str(first["sampling_config"]))
        _write_samples_npz(samples_path, shard_paths, shape, labels)
        _write_json(os.path.join(output_dir, "samples.json"), {
            **plan, "num_processes": accelerator.num_processes, "batch_size": batch_size,
            "sampling_config": sampling_config, "image_shape": list(shape[1:]),
            "png_dir": png_dir if save_png else None,
            "seconds_this_run": round(time.time() - started, 3),
            "class_label_counts": np.bincount(labels).tolist() if labels is not None else None, **(record or {})})
    accelerator.wait_for_everyone()
    return samples_path


__all__ = ["EVAL_PRESETS", "LABEL_MODES", "class_labels_for", "image_seed", "sample_batch", "sample_for_evaluation"]
