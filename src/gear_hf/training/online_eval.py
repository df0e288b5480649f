"""FID of the EMA models during training (the official trainer's online FID), every `eval.every` steps.

Every rank samples its share of `eval.num_samples` images — image i's class label (or prompt) and generator seed
depend only on i and `eval.seed`, as in `scripts/evaluate.py sample` — decodes them, extracts their Inception
pool_3 features, and the features are gathered: all ranks work, none waits for a rank-0-only pass. The main
process computes the FID against the cached reference statistics (`eval.reference`: an ADM-style `.npz` with
`mu`/`sigma`, or with `arr_0` images whose statistics are computed once and cached). Sampling follows the official
online protocol: guidance `eval.guidance_scale` (1.0), temperature 1, top-k 0, top-p 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..evaluation.adm import load_reference_statistics
from ..evaluation.cli import read_prompts as read_prompt_file
from ..evaluation.frechet import FIDStatistics, frechet_distance_stats
from ..evaluation.inception import InceptionExtractor
from ..evaluation.sampler import class_labels_for, image_seed
from ..pipelines.pipeline_gear import to_uint8
from .builders import TrainingSetupError
from .gear_step import unwrap


def read_prompts(path: str | None) -> list[str]:
    """The prompts of `eval.prompts` (a text file, one per line, or a GPIC `.jsonl`), as `evaluate.py` reads them."""
    if not path or not Path(path).is_file():
        raise TrainingSetupError(f"eval.prompts: a text-to-image run needs a prompt file (one prompt per line) for "
                                 f"its in-training FID; {path!r} is not a file.")
    try:
        prompts = read_prompt_file(path)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingSetupError(f"eval.prompts: {error}") from error
    if not prompts:
        raise TrainingSetupError(f"eval.prompts: {path} holds no prompt.")
    return prompts


class OnlineFID:
    """Built once at set-up (fails early on a missing reference or weights file); `__call__` is collective."""

    def __init__(self, cfg, accelerator, text_to_image: bool):
        e = cfg.eval
        self.cfg, self.accelerator = cfg, accelerator
        if not e.reference or not Path(e.reference).is_file():
            raise TrainingSetupError(f"eval.reference: {e.reference!r} is not a file; eval.every > 0 needs the "
                                     "reference batch (an ADM .npz with mu/sigma, or arr_0 uint8 images).")
        try:
            self.extractor = InceptionExtractor(inception_path=e.inception, device=accelerator.device,
                                                batch_size=e.batch_size, progress=False)
        except (FileNotFoundError, ValueError) as error:
            raise TrainingSetupError(f"eval.inception: {error}") from error
        with accelerator.main_process_first():  # the first computes and caches the reference statistics
            self.reference: FIDStatistics = load_reference_statistics(e.reference, self.extractor)
        self.prompts = read_prompts(e.prompts) if text_to_image else None

    def _my_indices(self) -> np.ndarray:
        acc = self.accelerator
        return np.arange(acc.process_index, self.cfg.eval.num_samples, acc.num_processes)

    @torch.no_grad()
    def _features(self, ar, tokenizer, conditioner) -> np.ndarray:
        """pool_3 features (n, 2048) of this rank's samples."""
        e, device = self.cfg.eval, self.accelerator.device
        indices = self._my_indices()
        labels = None if self.prompts else class_labels_for(e.num_samples, ar.config.num_classes, e.seed)
        features = []
        for start in range(0, len(indices), e.batch_size):
            batch = indices[start:start + e.batch_size]
            generators = [torch.Generator(device=device).manual_seed(image_seed(e.seed, int(i))) for i in batch]
            sampling = dict(guidance_scale=e.guidance_scale, temperature=1.0, top_k=0, top_p=1.0,
                            generator=generators)
            if self.prompts:
                condition = conditioner.encode([self.prompts[int(i) % len(self.prompts)] for i in batch])
                null = conditioner.null_condition()
                tokens = ar.generate_images(**condition.model_kwargs(), null_text_embeds=null.text_embeds,
                                            null_text_attention_mask=null.text_attention_mask, **sampling)
            else:
                tokens = ar.generate_images(torch.as_tensor(labels[batch], device=device), **sampling)
            with torch.autocast(device_type=device.type, enabled=False):
                images = to_uint8(tokenizer.decode(tokens).float().clamp(-1, 1))
            features.append(self.extractor.adm_features(images)["pool"])
        return np.concatenate(features) if features else np.zeros((0, 2048), np.float32)

    def __call__(self, ar, tokenizer, conditioner=None) -> float | None:
        """FID of `eval.num_samples` samples of `ar` + `tokenizer` (the EMAs); the value on the main process, None
        elsewhere. Collective: every rank must call it."""
        acc = self.accelerator
        tokenizer = unwrap(tokenizer).eval()
        features = torch.from_numpy(self._features(ar, tokenizer, conditioner)).to(acc.device)
        share = math.ceil(self.cfg.eval.num_samples / acc.num_processes)  # pad to equal shapes for the gather
        padded = torch.zeros(share, features.shape[1], device=acc.device)
        padded[: len(features)] = features
        gathered = acc.gather(padded).reshape(acc.num_processes, share, -1)
        if not acc.is_main_process:
            return None
        counts = [len(np.arange(r, self.cfg.eval.num_samples, acc.num_processes)) for r in range(acc.num_processes)]
        pool = torch.cat([gathered[r, :n] for r, n in enumerate(counts)]).cpu().double().numpy()
        return frechet_distance_stats(FIDStatistics.from_features(pool), self.reference, method="eigh")[0]


__all__ = ["OnlineFID", "read_prompts"]
