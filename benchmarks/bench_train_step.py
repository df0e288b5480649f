"""Benchmark one stage-1 GEAR step (`gear_step`) and its parts on this machine, random weights, fp32.

Two configurations:

* `tiny`: the `configs/tiny/stage1.yaml` models (VQ K=64 at 32 px, 2-layer 64-d AR, 1-layer DINOv2, ℓ=1), batch 4;
* `B`:    LlamaGen-B AR (12 × 768, K = 16384), the full VQ-16 tokenizer, a DINOv2-base-sized teacher (random
          init), the official PatchGAN, LPIPS-VGG16 (random trunk: same compute as the calibrated one), ℓ = 4,
          τ = 0.1, λ = 0.5 (the `train_gear.sh` B recipe), at `--b-image-size` (256 px by default), batch 1.

The real `gear_step` runs unmodified; its phases are timed by wrapping the functions and updates it calls:

| part                  | what                                                                                 |
|-----------------------|--------------------------------------------------------------------------------------|
| teacher               | frozen teacher forward (`teacher_targets`)                                           |
| tokenizer_forward     | encoder → quantizer (A, argmax) → decoder, train mode                                |
| soft_branch_forward   | softmax(A/τ) → π·E → AR blocks 1..ℓ (eval, frozen) → projector → REPA                |
| generator_loss        | L1 + LPIPS + GAN term forward                                                        |
| tokenizer_update      | backward of L_VQ + λ·L_align^s (through soft branch and tokenizer), clip, AdamW step |
| discriminator_update  | hinge loss forward on (x, sg(x̂)), backward, clip, AdamW step                        |
| ar_hard_step          | hard tokens → full AR forward → NTP + λ·L_align^h → backward, clip, AdamW step       |
| ema                   | tokenizer (with buffers) and AR EMA updates                                          |
| stats_logging         | what the trainer adds on a stats step: log scalars to host, codebook usage histogram, |
|                       | assignment statistics at τ = 1 and τ (the trainer does this every `stats_every` steps) |

`soft_branch_isolated` is measured after every timed step on that step's tensors (forward as above, and forward
plus its backward down to the assignment logits A): the soft branch's own cost, since in the step its backward
is fused into `tokenizer_update`. Overhead ratios: soft branch / full step and / AR hard step. Warm-up steps are
excluded; each figure is the median over the timed steps (mean and min also given). `cpu_utilisation` is process
CPU time / wall time of the step (≈ torch threads when the cores are not shared; lower means contention).

`precision_compile` (with `--precision-compile`): the whole step under the four set-ups the trainer offers, fresh
modules each (same seed): eager / `torch.compile` (`engines.compile_modules`: tokenizer, AR, discriminator in
place) × fp32 / bf16 autocast (`train.mixed_precision=bf16`). Per set-up: the first step (compilation included),
the median of the timed steps, graph breaks and compiled graphs (dynamo counters); ratios within the run. On a
CPU without native bf16 (no AVX512-BF16 / AMX, see `machine.cpu_bf16_flags`) bf16 matmuls are emulated, so bf16
is slower there; the ratios that matter for the paper's set-up come from a GPU run of the same script.

    python benchmarks/bench_train_step.py [--configs tiny B] [--steps-tiny 10] [--steps-b 2] [--warmup 1]
                                          [--b-image-size 256] [--b-batch-size 1] [--threads N] [--output f.json]
                                          [--precision-compile] [--skip-parts]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("teacher", "tokenizer_forward", "soft_branch_forward", "generator_loss", "tokenizer_update",
         "discriminator_update", "ar_hard_step", "ema")


# ---------------------------------------------------------------------------------------------------------------
# Building the modules (mirrors GEARTrainer._build_models / _build_optimization, without data or accelerate DDP)
# ---------------------------------------------------------------------------------------------------------------


def build(name: str, image_size: int | None, batch_size: int | None):
    from accelerate import Accelerator
    from transformers import Dinov2Config, Dinov2Model

    from gear_hf.models.configuration_gear_ar import GEARConfig
    from gear_hf.models.configuration_gear_tokenizer import GEARTokenizerConfig
    from gear_hf.models.modeling_gear_ar import GEARForCausalImageLM
    from gear_hf.models.modeling_gear_tokenizer import GEARTokenizerModel
    from gear_hf.training.alignment import DINOv2Teacher, ProjectorBank
    from gear_hf.training.config import TrainingConfig
    from gear_hf.training.ema import EMA
    from gear_hf.training.gear_step import GEARModules, ModuleUpdate
    from gear_hf.training.losses import LPIPS, PatchGANDiscriminator, TokenizerLoss

    torch.manual_seed(0)
    if name == "tiny":
        cfg = TrainingConfig.from_yaml(REPO / "configs" / "tiny" / "stage1.yaml")
        image_size = image_size or cfg.data.image_size
        batch_size = batch_size or cfg.train.train_batch_size
        tok_config = GEARTokenizerConfig(**{**cfg.tokenizer.config, "image_size": image_size})
        ar_overrides = dict(cfg.ar.config)
        num_classes = 10
        teacher_config = Dinov2Config(**cfg.teacher.config)
        lpips = None
    else:
        cfg = TrainingConfig()  # official defaults: τ 0.1, λ 0.5 / 0.5, projector 2048, L1 1, LPIPS 1, GAN 0.1
        cfg.gear.align_layer = 4  # B in train_gear.sh
        cfg.train.ema_decay = 0.9999
        image_size = image_size or 256
        batch_size = batch_size or 1
        tok_config = GEARTokenizerConfig.from_preset("VQ-16", image_size=image_size)
        ar_overrides = dict(GEARConfig.presets["LlamaGen-B"])
        num_classes = 1000
        teacher_config = Dinov2Config()  # dinov2-base architecture: 12 × 768, patch 14
        lpips = LPIPS(random_backbone=True)  # the VGG16 ImageNet file is not available offline; same FLOPs
    tokenizer = GEARTokenizerModel(tok_config)
    ar_config = GEARConfig(**{**ar_overrides, "vocab_size": tok_config.codebook_size, "num_classes": num_classes,
                              "image_size": image_size, "downsample_factor": tok_config.downsample_factor})
    ar = GEARForCausalImageLM(ar_config)
    grid = image_size // tok_config.downsample_factor
    teacher = DINOv2Teacher(Dinov2Model(teacher_config).eval(), grid)
    projector = ProjectorBank(ar_config.hidden_size, [teacher.hidden_size], cfg.gear.projector_dim)
    lp = cfg.loss
    tokenizer_loss = TokenizerLoss(l1_weight=lp.l1_weight, lpips_weight=lp.lpips_weight if lpips else 0.0,
                                   quantizer_weight=lp.quantizer_weight, gan_weight=lp.gan_weight,
                                   discriminator_start=lp.discriminator_start, lpips=lpips)
    discriminator = PatchGANDiscriminator(3, lp.discriminator_channels, lp.discriminator_layers)

    accelerator = Accelerator(cpu=True)
    o = cfg.optim

    def update(model, params, lr):
        opt = torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return ModuleUpdate(accelerator, model, opt, sched, o.max_grad_norm)

    m = GEARModules(
        tokenizer=tokenizer, ar=ar, projector=projector, teacher=teacher, tokenizer_loss=tokenizer_loss,
        discriminator=discriminator,
        tokenizer_update=update(tokenizer, tokenizer.parameters(), o.tokenizer_lr),
        ar_update=update(ar, list(ar.parameters()) + list(projector.parameters()), o.ar_lr),
        discriminator_update=update(discriminator, discriminator.parameters(), o.discriminator_lr),
        tokenizer_ema=EMA(tokenizer, cfg.train.ema_decay, include_buffers=True),
        ar_ema=EMA(ar, cfg.train.ema_decay),
    )
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8,
                                           generator=generator),
             "labels": torch.randint(0, num_classes, (batch_size,), generator=generator)}

    def count(module):
        return sum(p.numel() for p in module.parameters())

    info = {
        "image_size": image_size, "batch_size": batch_size, "token_grid": grid, "codebook_size":
        tok_config.codebook_size, "quantizer": tok_config.quantizer, "align_layer": cfg.gear.align_layer,
        "ar_layers": ar_config.num_hidden_layers, "ar_hidden_size": ar_config.hidden_size,
        "temperature": cfg.gear.temperature, "lpips": "vgg16 (random trunk)" if lpips else "off (weight 0)",
        "params_M": {"tokenizer": count(tokenizer) / 1e6, "ar": count(ar) / 1e6, "projector": count(projector) / 1e6,
                     "teacher": count(teacher) / 1e6, "discriminator": count(discriminator) / 1e6},
    }
    return m, cfg, batch, info


# ---------------------------------------------------------------------------------------------------------------
# Instrumentation of the real gear_step
# ---------------------------------------------------------------------------------------------------------------


class _TimedUpdate:
    """Stands in for a `ModuleUpdate` (same attributes) and times its call."""

    def __init__(self, update, timer, part):
        self._update, self._timer, self._part = update, timer, part

    def __call__(self, *args, **kwargs):
        with self._timer.span(self._part):
            return self._update(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._update, name)


class StepTimer:
    def __init__(self):
        self.current: dict[str, float] = {}
        self.marks: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, part):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.current[part] = self.current.get(part, 0.0) + time.perf_counter() - start


def instrument(m, timer: StepTimer):
    """Wrap what `gear_step` calls. Returns an undo function."""
    from gear_hf.training import gear_step as gs

    saved = {name: getattr(gs, name) for name in ("teacher_targets", "tokenizer_and_discriminator_updates",
                                                  "ar_updates", "update_emas")}

    def timed(fn, part):
        def wrapper(*args, **kwargs):
            with timer.span(part):
                return fn(*args, **kwargs)
        return wrapper

    def tok_and_disc(*args, **kwargs):
        # Everything between the end of the tokenizer forward and this call is the soft branch (lines 3-4 soft).
        timer.current["soft_branch_forward"] = time.perf_counter() - timer.marks["tokenizer_forward_end"]
        return saved["tokenizer_and_discriminator_updates"](*args, **kwargs)

    gs.teacher_targets = timed(saved["teacher_targets"], "teacher")
    gs.tokenizer_and_discriminator_updates = tok_and_disc
    gs.ar_updates = timed(saved["ar_updates"], "ar_hard_step")
    gs.update_emas = timed(saved["update_emas"], "ema")

    def pre(module, args, kwargs):
        timer.marks["tokenizer_forward_start"] = time.perf_counter()

    def post(module, args, kwargs, output):
        now = time.perf_counter()
        timer.marks["tokenizer_forward_end"] = now
        timer.current["tokenizer_forward"] = now - timer.marks["tokenizer_forward_start"]

    handles = [m.tokenizer.register_forward_pre_hook(pre, with_kwargs=True),
               m.tokenizer.register_forward_hook(post, with_kwargs=True)]
    loss = m.tokenizer_loss
    orig_gen, orig_disc = loss.generator_loss, loss.discriminator_loss
    loss.generator_loss = timed(orig_gen, "generator_loss")
    loss.discriminator_loss = timed(orig_disc, "discriminator_update")
    orig_updates = (m.tokenizer_update, m.discriminator_update)
    m.tokenizer_update = _TimedUpdate(m.tokenizer_update, timer, "tokenizer_update")
    m.discriminator_update = _TimedUpdate(m.discriminator_update, timer, "discriminator_update")

    def undo():
        for name, fn in saved.items():
            setattr(gs, name, fn)
        for h in handles:
            h.remove()
        del loss.generator_loss, loss.discriminator_loss  # back to the bound methods
        m.tokenizer_update, m.discriminator_update = orig_updates

    return undo


def stats_and_logging(logs, extras, usage, temperature):
    """What the trainer does on a stats/log step: host sync of the scalars, codebook usage, assignment stats."""
    from gear_hf.training.codebook_stats import assignment_statistics

    host = torch.stack([v.detach().float().reshape(()) for v in logs.values() if v is not None]).tolist()
    usage.update(extras["indices"])
    stats = usage.compute()
    stats.update(assignment_statistics(extras["assignment_logits"], 1.0))
    stats.update(assignment_statistics(extras["assignment_logits"], temperature, prefix="soft/"))
    torch.stack([v.float().reshape(()) for v in stats.values()]).tolist()
    return host


def soft_branch_isolated(m, batch, cfg) -> tuple[float, float]:
    """The soft branch alone: (forward seconds, forward + backward down to A seconds)."""
    from gear_hf.models.quantizers import soft_readout
    from gear_hf.training.gear_step import align_loss, frozen, teacher_targets, to_signed_unit

    target = teacher_targets(m, batch["pixel_values"], cfg)
    with torch.no_grad():
        logits = m.tokenizer(to_signed_unit(batch["pixel_values"]), return_assignment=True).assignment_logits
    logits = logits.detach().requires_grad_(True)
    m.ar.eval()
    start = time.perf_counter()
    with frozen(m.ar, m.projector):
        pi = soft_readout(logits, cfg.gear.temperature)
        h = m.ar(input_probs=pi[:, :-1], class_labels=batch["labels"],
                 stop_at_layer=cfg.gear.align_layer).last_hidden_state
        loss = cfg.gear.tokenizer_align_weight * align_loss(h, target, m.projector)
    forward = time.perf_counter() - start
    loss.backward()
    return forward, time.perf_counter() - start


def summarize(values):
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values)}


def bench(name: str, steps: int, warmup: int, image_size: int | None, batch_size: int | None,
          max_step_seconds: float | None = None) -> dict:
    from gear_hf.training.codebook_stats import CodebookUsage
    from gear_hf.training.gear_step import gear_step

    t0 = time.perf_counter()
    m, cfg, batch, info = build(name, image_size, batch_size)
    build_seconds = time.perf_counter() - t0
    timer = StepTimer()
    undo = instrument(m, timer)
    usage = CodebookUsage(info["codebook_size"])
    per_step, warmup_times = [], []
    try:
        for i in range(warmup + steps):
            timer.current, timer.marks = {}, {}
            extras = {"with_assignment": True}
            start, cpu_start = time.perf_counter(), time.process_time()
            logs = gear_step(m, batch, cfg, step=i, extras=extras)
            step_seconds = time.perf_counter() - start
            cpu_utilisation = (time.process_time() - cpu_start) / step_seconds
            start = time.perf_counter()
            stats_and_logging(logs, extras, usage, cfg.gear.temperature)
            stats_seconds = time.perf_counter() - start
            if i < warmup:
                warmup_times.append(step_seconds)
                if max_step_seconds and step_seconds > max_step_seconds:
                    return {"aborted": True, "warmup_step_seconds": step_seconds, **info}
                continue
            record = {part: timer.current.get(part, 0.0) for part in PARTS}
            record["stats_logging"] = stats_seconds
            record["step"] = step_seconds
            record["unaccounted"] = step_seconds - sum(record[p] for p in PARTS)
            record["cpu_utilisation"] = cpu_utilisation
            undo()
            record["soft_branch_isolated_forward"], record["soft_branch_isolated_fwd_bwd"] = \
                soft_branch_isolated(m, batch, cfg)
            undo = instrument(m, timer)
            per_step.append(record)
    finally:
        undo()

    keys = list(per_step[0])
    parts = {k: summarize([r[k] for r in per_step]) for k in keys}
    step = parts["step"]["median"]
    soft_fwd = parts["soft_branch_forward"]["median"]
    soft_fb = parts["soft_branch_isolated_fwd_bwd"]["median"]
    ar_hard = parts["ar_hard_step"]["median"]
    return {
        **info,
        "build_seconds": build_seconds,
        "warmup_steps": warmup, "timed_steps": steps, "warmup_step_seconds": warmup_times,
        "step_seconds": step,
        "step_plus_stats_seconds": step + parts["stats_logging"]["median"],
        "parts_seconds": parts,
        "parts_fraction_of_step": {k: parts[k]["median"] / step for k in PARTS + ("stats_logging",)},
        "soft_branch_overhead": {
            "in_step_soft_forward_over_step": soft_fwd / step,
            "in_step_soft_forward_over_ar_hard_step": soft_fwd / ar_hard,
            "isolated_soft_fwd_bwd_over_step": soft_fb / step,
            "isolated_soft_fwd_bwd_over_ar_hard_step": soft_fb / ar_hard,
        },
        "images_per_second": info["batch_size"] / step,
    }


SETUPS = (("eager", "fp32"), ("eager", "bf16"), ("compiled", "fp32"), ("compiled", "bf16"))


def bench_precision_compile(name: str, steps: int, warmup: int, image_size: int | None,
                            batch_size: int | None) -> dict:
    """Whole-step seconds of `gear_step` for eager / compiled × fp32 / bf16 (see the module docstring)."""
    import torch._dynamo

    from gear_hf.training.engines import compile_modules
    from gear_hf.training.gear_step import gear_step

    out, info = {}, None
    for mode, precision in SETUPS:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        m, cfg, batch, info = build(name, image_size, batch_size)
        if mode == "compiled":
            compile_modules(m.tokenizer, m.ar, m.discriminator)
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logs = gear_step(m, batch, cfg, step=i)
            torch.stack([v.detach().float().reshape(()) for v in logs.values() if v is not None]).tolist()
            times.append(time.perf_counter() - start)
        counters = torch._dynamo.utils.counters
        out[f"{mode}_{precision}"] = {
            "first_step_seconds": times[0], "warmup_step_seconds": times[:warmup],
            "step_seconds": summarize(times[warmup:]),
            "graph_breaks": sum(counters["graph_break"].values()),
            "compiled_graphs": counters["stats"].get("unique_graphs", 0),
        }
    torch._dynamo.reset()
    med = {k: v["step_seconds"]["median"] for k, v in out.items()}
    return {
        "image_size": info["image_size"], "batch_size": info["batch_size"], "timed_steps": steps,
        "warmup_steps": warmup, "setups": out,
        "ratios": {
            "bf16_over_fp32_eager": med["eager_bf16"] / med["eager_fp32"],
            "bf16_over_fp32_compiled": med["compiled_bf16"] / med["compiled_fp32"],
            "compiled_over_eager_fp32": med["compiled_fp32"] / med["eager_fp32"],
            "compiled_over_eager_bf16": med["compiled_bf16"] / med["eager_bf16"],
            "compiled_bf16_over_eager_fp32": med["compiled_bf16"] / med["eager_fp32"],
        },
        "images_per_second": {k: info["batch_size"] / v for k, v in med.items()},
    }


def cpu_bf16_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "B"], choices=["tiny", "B"])
    parser.add_argument("--steps-tiny", type=int, default=10)
    parser.add_argument("--steps-b", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--b-image-size", type=int, default=256)
    parser.add_argument("--b-batch-size", type=int, default=1)
    parser.add_argument("--b-fallback-seconds", type=float, default=120.0,
                        help="if the B warm-up step at --b-image-size takes longer, rerun B at 128 px (0: never)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", type=str, default=None, help="also write the JSON here")
    parser.add_argument("--precision-compile", action="store_true",
                        help="also time eager / compiled × fp32 / bf16 whole steps (precision_compile)")
    parser.add_argument("--skip-parts", action="store_true", help="skip the per-part fp32 breakdown")
    parser.add_argument("--pc-image-size-b", type=int, default=None,
                        help="image size of B in precision_compile (default: --b-image-size)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    result = {
        "benchmark": "gear_step (stage 1), random weights: parts in fp32; precision_compile: eager/compiled x fp32/bf16",
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cpu_bf16_flags": cpu_bf16_flags(), "load_average_at_start": os.getloadavg()},
        "results": {},
    }
    if args.precision_compile:
        result["precision_compile"] = {}
        for name in args.configs:
            tiny = name == "tiny"
            size = None if tiny else (args.pc_image_size_b or args.b_image_size)
            out = bench_precision_compile(name, args.steps_tiny if tiny else args.steps_b, args.warmup, size,
                                          None if tiny else args.b_batch_size)
            result["precision_compile"]["tiny" if tiny else f"B@{out['image_size']}px"] = out
    for name in ([] if args.skip_parts else args.configs):
        if name == "tiny":
            result["results"]["tiny"] = bench("tiny", args.steps_tiny, args.warmup, None, None)
            continue
        out = bench("B", args.steps_b, args.warmup, args.b_image_size, args.b_batch_size,
                    args.b_fallback_seconds if args.b_image_size > 128 else None)
        if out.get("aborted"):
            note = (f"B at {args.b_image_size} px took {out['warmup_step_seconds']:.0f} s for one (warm-up) step "
                    f"> {args.b_fallback_seconds:.0f} s on this CPU: measured at 128 px instead.")
            print(note, file=sys.stderr)
            out = bench("B", args.steps_b, args.warmup, 128, args.b_batch_size)
            out["note"] = note
        result["results"][f"B@{out['image_size']}px"] = out
    result["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
