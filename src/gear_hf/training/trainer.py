"""The accelerate training loop for GEAR stages 0, 1 and 2.

    stage 0  tokenizer warm-up          tokenizer (+EMA) + discriminator          `gear_step.tokenizer_step`
    stage 1  GEAR joint training        tokenizer (+EMA) + discriminator + AR (+EMA) + projector, teacher
                                                                                   `gear_step.gear_step`
    stage 2  AR on a frozen tokenizer   AR (+EMA) + projector, teacher             `gear_step.ar_step`

`GEARTrainer(cfg).train()` builds everything from a `TrainingConfig` (see `configs/`), runs the loop and exports
`from_pretrained` directories at the end (layout: `checkpointing.py`). The pieces live in one place each:
`builders.py` (data, models, losses, optimizers), `engines.py` (accelerator, DDP / DeepSpeed / FSDP2
preparation, precision, compile, EMAs), `distributed.py` (engine choice and checks, engine specifics),
`checkpointing.py` (checkpoints, resume, exports), `monitoring.py` (logs, alarms, previews).

`train.init_from=<output_dir of the previous stage>` chains the stages like the official scripts: stage 1 takes
the stage-0 tokenizer, tokenizer EMA and discriminator; stage 2 takes the stage-1 tokenizer EMA (frozen) and, with
`train.init_ar_from_previous`, the AR EMA and the projector (optimizer states are never carried over).

Batch semantics: `train.train_batch_size` is the GLOBAL batch (official 256); per device it is
global / (processes × gradient_accumulation_steps), which must divide exactly. Both are logged.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpointing as ckpt
from .builders import TrainingSetupError, build_data, build_models, build_optimization
from .config import TrainingConfig, flat_config
from .data import collate
from .engines import TrainingEngines, build_accelerator
from .gear_step import ar_step, gear_step, tokenizer_step, unwrap
from .monitoring import TrainingMonitor, save_previews
from .online_eval import OnlineFID

logger = logging.getLogger(__name__)

STEP_FUNCTIONS = {0: tokenizer_step, 1: gear_step, 2: ar_step}
STOP_CHECK_EVERY = 10  # steps between the multi-process SIGTERM checks (each a reduce + host sync)
# Text-to-image previews on streaming data (no fixed captions), unless train.sample_prompts is set.
DEFAULT_SAMPLE_PROMPTS = ("a photo of a cat", "a red car on a street", "a bowl of fruit on a table",
                          "a mountain lake at sunset")


class StopRequest:
    """SIGTERM → save a checkpoint at the next step boundary (several processes: within `STOP_CHECK_EVERY` steps,
    see `GEARTrainer._stop_now`) and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        try:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            pass
        return self

    def _handle(self, signum, frame):
        logger.warning("Received signal %s: saving a checkpoint at the next step boundary (several processes: the "
                       "next multiple of %d steps), then exiting.", signum, STOP_CHECK_EVERY)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class GEARTrainer:
    """Builds accelerator, models, losses, optimizers, data from a `TrainingConfig`; `train()` runs the loop.

    After `build()`: `accelerator`, `components` (the prepared modules, optimizers, schedulers, EMAs and loader,
    see `engines.TrainingComponents`), `data`, `per_device_batch_size`."""

    def __init__(self, cfg: TrainingConfig):
        cfg.validate()
        if cfg.train.stage not in (0, 1, 2):
            raise TrainingSetupError(f"train.stage must be 0, 1 or 2, got {cfg.train.stage!r}.")
        self.cfg = cfg
        self.stage = cfg.train.stage
        self.output_dir = Path(cfg.train.output_dir)
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches each process consumed in the current epoch
        self.last_eval: dict[str, float] = {}
        self._built = False

    # ----------------------------------------------------------------------------------------------- build
    def build(self) -> GEARTrainer:
        if self._built:
            return self
        cfg = self.cfg
        self.accelerator, engine, zero_stage = build_accelerator(cfg, self.output_dir)
        acc = self.accelerator
        n_proc, accum = acc.num_processes, cfg.train.gradient_accumulation_steps
        if cfg.train.train_batch_size % (n_proc * accum):
            raise TrainingSetupError(
                f"train.train_batch_size={cfg.train.train_batch_size} is the GLOBAL batch; it must be divisible by "
                f"processes ({n_proc}) × gradient_accumulation_steps ({accum})."
            )
        self.per_device_batch_size = cfg.train.train_batch_size // (n_proc * accum)
        if cfg.train.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Same seed on every rank for construction (identical initial weights and data order), per-rank after.
        set_seed(cfg.train.seed)
        self.data = build_data(cfg, self.per_device_batch_size, acc.process_index, n_proc)
        models = build_models(cfg, self.data.class_names, n_proc)
        self.engines = TrainingEngines(cfg, acc, engine, zero_stage)
        optim = build_optimization(cfg, models, self.engines.scheduler_steps_per_update)
        self.components = self.engines.prepare(self.data, models, optim)
        self.signature = models.signature
        self.online_fid = None
        if cfg.eval.every and self.components.ar is not None:
            self.online_fid = OnlineFID(cfg, acc, text_to_image=self.components.text_conditioner is not None)
        set_seed(cfg.train.seed, device_specific=True)  # official: seed + rank (dropout, class dropout)
        self._built = True
        return self

    # ---------------------------------------------------------------------------------------------- resume
    def resume(self, spec: str | None) -> Path | None:
        """Load a checkpoint (`latest` or a path). Returns the checkpoint used, or None (fresh start)."""
        try:
            path, state = ckpt.resume_training(self.accelerator, spec, self.output_dir, self.signature,
                                               self.engines.extra_accelerators)
        except FileNotFoundError as error:
            raise TrainingSetupError(str(error)) from error
        if path is not None:
            self.global_step = int(state["global_step"])
            self.epoch = int(state["epoch"])
            self.batches_in_epoch = int(state["batches_in_epoch"])
            self.accelerator.print(f"Resumed from {path} at step {self.global_step} "
                                   f"(epoch {self.epoch}, batch {self.batches_in_epoch}).")
        return path

    def save_checkpoint(self) -> Path:
        state = {
            "global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
            "num_processes": self.accelerator.num_processes, "per_device_batch_size": self.per_device_batch_size,
            "signature": self.signature, "config": self.cfg.to_dict(),
        }
        return ckpt.save_checkpoint(self.accelerator, self.output_dir / ckpt.CHECKPOINT_DIR, self.global_step, state,
                                    self.cfg.train.checkpoints_total_limit, self.engines.extra_accelerators)

    def export(self) -> dict[str, str]:
        """Write the from_pretrained directories. Collective: under ZeRO-3 every rank gathers the live weights while
        the main process writes them."""
        acc, c = self.accelerator, self.components
        acc.wait_for_everyone()
        written: dict[str, str] = {}
        live = (None if self.stage == 2 else c.tokenizer, c.ar, c.projector, c.discriminator)
        with self.engines.full_parameters(*live):
            if acc.is_main_process:
                written = ckpt.export_models(
                    self.output_dir, stage=self.stage, global_step=self.global_step, tokenizer=c.tokenizer,
                    tokenizer_ema=c.tokenizer_ema, ar=c.ar, ar_ema=c.ar_ema, projector=c.projector,
                    discriminator=c.discriminator, class_names=self.data.class_names,
                    export_pipeline=self.cfg.train.export_pipeline, text_conditioner=c.text_conditioner)
                acc.print(f"Exported {', '.join(written)} to {self.output_dir}.")
        return written

    def save_samples(self) -> None:
        """Preview PNGs (main process only: nothing here is collective, so the other ranks skip reading data)."""
        if not self.accelerator.is_main_process:
            return
        c, n = self.components, self.cfg.train.num_sample_images
        tokenizer = c.tokenizer_ema.model if c.tokenizer_ema is not None else c.tokenizer
        fixed = self._fixed_samples(n)
        prompts = None
        if c.text_conditioner is not None:
            prompts = self.cfg.train.sample_prompts or (fixed or {}).get("captions") or list(DEFAULT_SAMPLE_PROMPTS)
        save_previews(self.accelerator, self.cfg, self.global_step, tokenizer,
                      c.ar_ema.model if c.ar_ema is not None else None,
                      None if fixed is None else fixed["pixel_values"], c.text_conditioner, prompts)

    def evaluate(self) -> float | None:
        """In-training FID of the EMA models (collective); logged as `eval/fid`. The value on the main process."""
        c = self.components
        tokenizer = c.tokenizer_ema.model if c.tokenizer_ema is not None else c.tokenizer
        fid = self.online_fid(c.ar_ema.model, tokenizer, c.text_conditioner)
        if self.accelerator.is_main_process:
            self.last_eval = {"eval/fid": fid, "eval/num_samples": self.cfg.eval.num_samples}
            self.accelerator.print(f"step {self.global_step}: FID of {self.cfg.eval.num_samples} samples = {fid:.3f}")
            if self.accelerator.log_with:
                self.accelerator.log(self.last_eval, step=self.global_step)
        return fid

    def _fixed_samples(self, n: int) -> dict | None:
        """The first `n` samples of epoch 0 (map-style data only): the preview images (and their captions)."""
        dataset = self.data.dataset
        if self.data.streaming:
            return None
        dataset.set_epoch(0)
        samples = [dataset[i] for i in range(min(max(1, n), len(dataset)))]
        dataset.set_epoch(self.epoch)
        return collate(samples)

    # ------------------------------------------------------------------------------------------------ loop
    def _epoch_batches(self):
        """Yield micro-batches forever, tracking (epoch, batches_in_epoch); skips what a resumed run consumed."""
        acc, dataset = self.accelerator, self.data.dataset
        while True:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.epoch)  # augmentation depends on (seed, epoch, index)
            loader = self.components.train_loader
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch)  # sampler order depends on (seed, epoch)
            skip = self.batches_in_epoch
            if skip:
                if self.data.streaming:
                    iterator = iter(loader)
                    for _ in range(skip):
                        next(iterator, None)
                    loader = iterator
                else:
                    loader = acc.skip_first_batches(loader, skip)
            got_any = False
            for batch in loader:
                got_any = True
                self.batches_in_epoch += 1  # counted when handed out: a checkpoint after this step skips it
                yield batch
            if not got_any and skip == 0:
                raise TrainingSetupError("The data loader yielded no batch (is the dataset empty?).")
            self.epoch += 1
            self.batches_in_epoch = 0

    def train(self, resume_from_checkpoint: str | None = None) -> dict[str, Any]:
        """Run to `train.max_train_steps`. Returns {"global_step", "status": "finished"|"interrupted", ...}."""
        self.build()
        cfg, acc, c = self.cfg, self.accelerator, self.components
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else cfg.train.resume_from_checkpoint
        resumed_from = self.resume(resume)
        max_steps = cfg.train.max_train_steps
        step_fn = STEP_FUNCTIONS[self.stage]

        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "training_config.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        if acc.log_with:
            acc.init_trackers("gear", config=flat_config(cfg))
        acc.print(
            f"GEAR stage {self.stage}: global batch {cfg.train.train_batch_size} = per-device "
            f"{self.per_device_batch_size} × {acc.num_processes} processes × {cfg.train.gradient_accumulation_steps} "
            f"accumulation; {max_steps} steps; engine {self.engines.engine} ({acc.distributed_type}), precision "
            f"{cfg.train.mixed_precision}{', compiled' if cfg.train.compile else ''}."
        )
        self.monitor = TrainingMonitor(cfg, acc, unwrap(c.tokenizer).config.codebook_size,
                                       self.per_device_batch_size)
        schedulers = {"tokenizer": c.sched_tok, "ar": c.sched_ar, "discriminator": c.sched_disc}
        progress = tqdm(total=max_steps, initial=self.global_step, disable=not acc.is_local_main_process,
                        desc=f"stage {self.stage}", dynamic_ncols=True)
        status = "finished"
        last_saved = self.global_step if resumed_from is not None else None
        with StopRequest() as stop:
            batches = self._epoch_batches()
            while self.global_step < max_steps:
                t0 = time.perf_counter()
                batch = next(batches)
                self.monitor.data_wait += time.perf_counter() - t0
                if self.data.streaming:
                    batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in batch.items()}
                want_stats = self._is_due(cfg.train.stats_every, self.global_step + 1)
                extras = {"with_assignment": want_stats and self.stage != 2}
                with acc.accumulate(*c.trainable), self.engines.autocast():
                    logs = step_fn(c.step_modules, batch, cfg, step=self.global_step, extras=extras)
                self.monitor.accumulate(logs, batch)
                if "indices" in extras:
                    self.monitor.usage.update(extras["indices"])
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                progress.update(1)
                self.monitor.track_zero_grads(logs)
                if want_stats:
                    self.monitor.log_codebook_stats(self.global_step, extras.get("assignment_logits"))
                del extras
                if self._is_due(cfg.train.log_every, self.global_step) or self.global_step == max_steps:
                    self.monitor.flush(self.global_step, self.epoch, schedulers, progress)
                if self._is_due(cfg.train.sample_every, self.global_step):
                    self.save_samples()
                if self.online_fid is not None and self._is_due(cfg.eval.every, self.global_step):
                    self.evaluate()
                if self._stop_now(stop):
                    self.save_checkpoint()
                    last_saved = self.global_step
                    status = "interrupted"
                    acc.print(f"Stopped by signal: checkpoint saved at step {self.global_step}.")
                    break
                if self._is_due(cfg.train.checkpointing_steps, self.global_step):
                    self.save_checkpoint()
                    last_saved = self.global_step
        progress.close()
        if status == "finished":
            if last_saved != self.global_step:
                self.save_checkpoint()
            self.export()
        acc.wait_for_everyone()
        acc.end_training()
        return {"global_step": self.global_step, "status": status, "output_dir": str(self.output_dir)}

    def _stop_now(self, stop: StopRequest) -> bool:
        """Whether every rank stops at this step after a SIGTERM. One process: the Python flag, no sync. Several:
        the flag must be reduced across ranks (`check_trigger`: a reduce + `.item()`), so it is checked every
        `STOP_CHECK_EVERY` steps, a schedule all ranks share; the stop lands at the next of them."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return stop.requested
        if stop.requested:
            acc.set_trigger()
        return self.global_step % STOP_CHECK_EVERY == 0 and acc.check_trigger()

    @property
    def last_logs(self) -> dict[str, float]:
        return self.monitor.last_logs

    @staticmethod
    def _is_due(every: int | None, step: int) -> bool:
        return bool(every) and every > 0 and step % every == 0


def run_training(cfg: TrainingConfig, resume_from_checkpoint: str | None = None) -> dict[str, Any]:
    """Build a `GEARTrainer` from `cfg` and train; the entry point of the scripts."""
    return GEARTrainer(cfg).train(resume_from_checkpoint)


__all__ = ["GEARTrainer", "TrainingSetupError", "run_training", "STEP_FUNCTIONS"]
