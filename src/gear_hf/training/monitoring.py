"""What a run reports while it trains: windowed scalar logs (one host sync per `log_every` steps), NaN/Inf and
zero-gradient alarms, periodic codebook statistics, and sample / reconstruction preview grids."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from .codebook_stats import CodebookUsage, assignment_statistics
from .gear_step import to_signed_unit, unwrap

logger = logging.getLogger(__name__)

PROGRESS_KEYS = ("tokenizer/loss", "ar/ntp_loss", "discriminator/loss")


class TrainingMonitor:
    """Accumulates a step's detached scalars on the device and reports them every `train.log_every` steps."""

    def __init__(self, cfg, accelerator, codebook_size: int, per_device_batch_size: int):
        self.cfg, self.accelerator = cfg, accelerator
        self.per_device_batch_size = per_device_batch_size
        self.usage = CodebookUsage(codebook_size, device=accelerator.device)
        self.last_logs: dict[str, float] = {}
        self.last_codebook_stats: dict[str, float] = {}
        self._zero_runs: dict[str, torch.Tensor] = {}
        self._reset_window()

    def _reset_window(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._window_start, self._window_images, self.data_wait = time.perf_counter(), 0, 0.0

    def accumulate(self, logs: dict[str, Any], batch: dict[str, torch.Tensor]) -> None:
        """Device-side sums of detached scalars; no host sync."""
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # DeepSpeed grad norms
                value = torch.tensor(float(value), device=self.accelerator.device)
            if value is None or not torch.is_tensor(value) or value.numel() != 1:
                continue
            value = value.detach().float().reshape(())
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._counts[key] = self._counts.get(key, 0) + 1
        if "num_skipped" in batch:
            skipped = batch["num_skipped"].float().sum().reshape(())
            key = "data/skipped_images"
            self._sums[key] = self._sums[key] + skipped if key in self._sums else skipped
            self._counts[key] = 1  # a sum, not a mean
        self._window_images += batch["pixel_values"].shape[0]

    def track_zero_grads(self, logs: dict[str, Any]) -> None:
        """Per module, the number of consecutive steps whose gradient norm was exactly 0 (on the device)."""
        for key, value in logs.items():
            if key.startswith("grad_norm/") and torch.is_tensor(value):
                run = self._zero_runs.get(key)
                zero = (value.detach().reshape(()) == 0).long()
                self._zero_runs[key] = zero if run is None else (run + 1) * zero

    def flush(self, step: int, epoch: int, schedulers: dict[str, Any], progress=None) -> dict[str, float]:
        """Reduce the window's sums across ranks and log them: one host sync per `log_every` steps."""
        acc, cfg = self.accelerator, self.cfg
        keys, zero_keys = sorted(self._sums), sorted(self._zero_runs)
        values = [self._sums[k] / self._counts[k] for k in keys] + [self._zero_runs[k].float() for k in zero_keys]
        result: dict[str, float] = {}
        zero_runs: dict[str, float] = {}
        if values:
            stacked = torch.stack(values)
            if acc.num_processes > 1:
                stacked = acc.reduce(stacked, reduction="mean")
            host = stacked.tolist()
            result = dict(zip(keys, host[: len(keys)]))
            zero_runs = dict(zip(zero_keys, host[len(keys):]))
        if "data/skipped_images" in result:
            result["data/skipped_images"] *= acc.num_processes  # mean → total over ranks
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        result["perf/images_per_second"] = self._window_images * acc.num_processes / elapsed
        result["perf/images_per_second_per_device"] = self._window_images / elapsed
        result["perf/data_wait_fraction"] = self.data_wait / elapsed
        result["train/epoch"] = epoch
        result["train/global_batch_size"] = cfg.train.train_batch_size
        result["train/per_device_batch_size"] = self.per_device_batch_size
        for name, scheduler in schedulers.items():
            if scheduler is not None:
                result[f"lr/{name}"] = scheduler.get_last_lr()[0]

        bad = [k for k, v in result.items() if not math.isfinite(v)]
        if bad:
            message = f"Non-finite values at step {step}: {', '.join(bad)}."
            logger.error(message)
            acc.print("ALARM: " + message)
            if cfg.train.abort_on_nonfinite:
                raise FloatingPointError(message)
        k_zero = cfg.train.zero_grad_alarm_steps
        for key, run in zero_runs.items():
            if k_zero and run >= k_zero:
                message = (f"{key} has been exactly 0 for {int(run)} consecutive steps (step {step}): "
                           "that module is not learning (frozen by mistake / detached graph?).")
                logger.warning(message)
                acc.print("ALARM: " + message)
        if acc.log_with:
            acc.log(result, step=step)
        if progress is not None:
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in result.items() if k in PROGRESS_KEYS}
            progress.set_postfix(shown, refresh=False)
        self._reset_window()
        self.last_logs = result
        return result

    def log_codebook_stats(self, step: int, assignment_logits: torch.Tensor | None) -> dict[str, float]:
        """Codebook usage over the window since the last call + assignment statistics of this step (collective)."""
        acc = self.accelerator
        stats = {f"codebook/{k}": v for k, v in self.usage.compute(acc).items()}
        if assignment_logits is not None:
            for prefix, temperature in (("codebook", 1.0), ("soft", self.cfg.gear.temperature)):
                stats.update({f"{prefix}/{k}": v for k, v in
                              assignment_statistics(assignment_logits, temperature, accelerator=acc).items()})
        host = torch.stack([v.float().reshape(()) for v in stats.values()]).tolist()
        result = dict(zip(stats, host))
        if acc.log_with:
            acc.log(result, step=step)
        self.last_codebook_stats = result
        return result


@torch.no_grad()
def save_previews(accelerator, cfg, step: int, tokenizer, ar, fixed_images: torch.Tensor | None,
                  text_conditioner=None, prompts: list[str] | None = None) -> None:
    """Reconstruction grid (`tokenizer`, the EMA) and samples (`ar`, the EMA: one per class, or one per prompt of a
    text-to-image AR) as PNGs under `<output_dir>/samples/`, and to TensorBoard. Main process only; uses its own
    generator, so the training RNG streams are untouched."""
    if not accelerator.is_main_process:
        return
    from torchvision.utils import make_grid, save_image

    tokenizer = unwrap(tokenizer).eval()
    out_dir = Path(cfg.train.output_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    n, device = max(1, cfg.train.num_sample_images), accelerator.device
    grids = {}
    if fixed_images is not None:
        images = fixed_images.to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            recon = tokenizer(to_signed_unit(images)).reconstruction
        pair = torch.cat([images.float() / 255.0, (recon.clamp(-1, 1) + 1) / 2], dim=0)
        grids["reconstructions"] = make_grid(pair.cpu(), nrow=len(images))
    if ar is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
        sampling = dict(top_k=min(cfg.train.sample_top_k, ar.config.vocab_size), generator=generator)
        if text_conditioner is not None:
            condition, null = text_conditioner.encode(list(prompts)[:n]), text_conditioner.null_condition()
            tokens = ar.generate_images(**condition.model_kwargs(), null_text_embeds=null.text_embeds,
                                        null_text_attention_mask=null.text_attention_mask,
                                        guidance_scale=cfg.train.sample_guidance_scale, **sampling)
        else:
            labels = torch.arange(n, device=device) % ar.config.num_classes
            guidance = cfg.train.sample_guidance_scale if ar.config.has_null_class else 1.0
            tokens = ar.generate_images(labels, guidance_scale=guidance, **sampling)
        samples = tokenizer.decode(tokens)
        grids["samples"] = make_grid(((samples.clamp(-1, 1) + 1) / 2).cpu(), nrow=min(len(samples), 8))
    for name, grid in grids.items():
        save_image(grid, out_dir / f"step_{step:08d}_{name}.png")
    if accelerator.log_with:
        try:
            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            for name, grid in grids.items():
                tracker.add_image(f"images/{name}", grid, step)
        except Exception as error:  # noqa: BLE001 - image logging is best effort
            logger.debug("Could not log images to the tracker: %s", error)


__all__ = ["TrainingMonitor", "save_previews"]
