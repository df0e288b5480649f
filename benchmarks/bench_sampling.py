"""Benchmark KV-cached classifier-free-guidance sampling of GEARForCausalImageLM (random weights).

Models: `small`, LlamaGen presets (class-conditional, 256 px), and `t2i-small` / `t2i-<preset>` (text-conditional:
a 300-position text prefix of caption_dim 2048, 20 valid tokens, the null prompt all padding). For each it reports,
as JSON:
* cached sampling: wall time, image tokens/s, peak extra RSS during sampling (MiB), and the prefill time;
* per-token decode time across raster positions (bucketed medians; must stay flat with the static cache);
* uncached sampling (full forward recomputed each step): measured for the small model, and for large models
  either measured (`--full-uncached`) or estimated from the step time at a few positions (trapezoid rule).

Each case runs in a fresh subprocess so peak-RSS numbers do not leak between cases. Timings on a shared CPU are
noisy: the small model reports the best of 3 runs, LlamaGen-B a single run (compare with the per-token medians).

    python benchmarks/bench_sampling.py [--models small LlamaGen-B t2i-small t2i-LlamaGen-B] [--batch-size 2]
                                        [--guidance-scale 4] [--output bench.json] [--full-uncached]

See `bench_decode_compile.py` for the decode step eager vs `torch.compile`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch

SMALL = dict(vocab_size=1024, num_classes=10, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
             image_size=128, downsample_factor=16)


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


TEXT = dict(condition_type="text", caption_dim=2048, text_length=300)


def build_model(name: str):
    from gear_hf import GEARConfig, GEARForCausalImageLM

    text = name.startswith("t2i-")
    size = name.removeprefix("t2i-")
    extra = TEXT if text else {}
    config = (GEARConfig(**{**SMALL, **extra}) if size == "small" else
              GEARConfig.from_preset(size, vocab_size=16384, image_size=256, **extra))
    torch.manual_seed(0)
    model = GEARForCausalImageLM(config).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)  # zero-init head would make every step argmax-trivial
    return model


def conditions(config, batch_size: int):
    """(condition, unconditional condition, generate_images kwargs) of a benchmark batch."""
    from gear_hf.conditioning import GEARCondition

    if not config.is_text_conditional:
        labels = torch.arange(batch_size) % config.num_classes
        null = GEARCondition(class_labels=torch.full((1,), config.null_class_id))
        return GEARCondition(class_labels=labels), null, {"class_labels": labels}
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch_size, config.text_length, config.caption_dim, generator=g)
    mask = torch.zeros(batch_size, config.text_length, dtype=torch.long)
    mask[:, :20] = 1
    null = GEARCondition(text_embeds=torch.zeros(1, config.text_length, config.caption_dim),
                         text_attention_mask=torch.zeros(1, config.text_length, dtype=torch.long))
    kwargs = {"text_embeds": embeds, "text_attention_mask": mask, "null_text_embeds": null.text_embeds,
              "null_text_attention_mask": null.text_attention_mask}
    return GEARCondition(text_embeds=embeds, text_attention_mask=mask), null, kwargs


def run_case(name: str, batch_size: int, guidance_scale: float, full_uncached: bool, queue) -> None:
    from gear_hf.sampling import TokenPicker, decode_one_token, guide_logits, prefill, resolve_sampling_config

    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(name)
    config = model.config
    cond, null, generate_kwargs = conditions(config, batch_size)
    condition = cond if guidance_scale <= 1 else cond.with_unconditional(null)
    num_tokens = config.num_image_tokens
    result = {"model": name, "parameters_M": round(model.num_parameters() / 1e6, 2), "grid": config.grid_size,
              "image_tokens": num_tokens, "prefix_length": config.prefix_length, "batch_size": batch_size,
              "guidance_scale": guidance_scale, "rows_per_step": condition.batch_size}
    with torch.no_grad():  # warm-up: a prefill and a few cached steps
        warm = model.allocate_kv_cache(condition.batch_size)
        t0 = time.perf_counter()
        prefill(model, condition, warm)
        result["prefill_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        for _ in range(4):
            model(input_ids=torch.zeros(condition.batch_size, 1, dtype=torch.long), cache=warm)

    # 1. Cached sampling, end to end, with peak RSS.
    # The machine may be shared: take the best of a few runs when they are cheap.
    repeats = 3 if name.endswith("small") else 1
    peak_tracked = _reset_peak_rss()
    rss_before = _rss_mib("VmRSS")
    elapsed = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate_images(**generate_kwargs, guidance_scale=guidance_scale,
                              generator=torch.Generator().manual_seed(0))
        elapsed = min(elapsed, time.perf_counter() - start)
    result["cached"] = {
        "seconds": round(elapsed, 3),
        "image_tokens_per_s": round(batch_size * num_tokens / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / num_tokens, 2),
        "peak_extra_rss_MiB": round(_rss_mib("VmHWM") - rss_before, 1) if peak_tracked else None,
        "kv_cache_MiB": round(2 * config.num_hidden_layers * result["rows_per_step"] * model.max_sequence_length
                              * config.hidden_size * 4 / 2**20, 1),
    }

    # 2. Per-token decode time across positions (same building blocks as generate_images).
    settings = resolve_sampling_config(guidance_scale=guidance_scale)
    pick = TokenPicker(settings, batch_size, config.vocab_size, torch.device("cpu"), None)
    step_ms = []
    with torch.no_grad():
        cache = model.allocate_kv_cache(condition.batch_size)
        token = pick(guide_logits(prefill(model, condition, cache), batch_size, guidance_scale))
        feed = torch.empty(condition.batch_size, 1, dtype=torch.long)
        for _ in range(num_tokens - 1):
            feed.view(-1, batch_size)[:] = token
            t0 = time.perf_counter()
            token = pick(guide_logits(decode_one_token(model, feed, cache), batch_size, guidance_scale))
            step_ms.append(1000 * (time.perf_counter() - t0))
    buckets = 8
    size = len(step_ms) // buckets
    medians = [round(statistics.median(step_ms[i * size : (i + 1) * size]), 3) for i in range(buckets)]
    result["per_token_ms_by_position"] = {
        "bucket_positions": [f"{1 + i * size}-{(i + 1) * size}" for i in range(buckets)],
        "median_ms": medians,
        "last_over_first": round(medians[-1] / medians[0], 3),
    }

    # 3. Uncached: full forward over the whole prefix at every step.
    if name.endswith("small") or full_uncached:
        elapsed = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate_images(**generate_kwargs, guidance_scale=guidance_scale, use_cache=False,
                                  generator=torch.Generator().manual_seed(0))
            elapsed = min(elapsed, time.perf_counter() - start)
        result["uncached"] = {"seconds": round(elapsed, 3), "measured": True,
                              "image_tokens_per_s": round(batch_size * num_tokens / elapsed, 1)}
    else:
        positions = [1, num_tokens // 4, num_tokens // 2, 3 * num_tokens // 4, num_tokens - 1]
        tokens = torch.randint(0, config.vocab_size, (condition.batch_size, num_tokens))
        times = []
        with torch.no_grad():
            for t in positions:
                t0 = time.perf_counter()
                model(input_ids=tokens[:, :t], **condition.model_kwargs())
                times.append(time.perf_counter() - t0)
        # trapezoid over positions 0..num_tokens-1
        estimate = sum((times[i] + times[i + 1]) / 2 * (positions[i + 1] - positions[i])
                       for i in range(len(times) - 1))
        estimate += times[0] * positions[0]
        result["uncached"] = {"seconds": round(estimate, 2), "measured": False,
                              "step_ms_at_positions": dict(zip(map(str, positions), [round(1000 * x, 1) for x in times])),
                              "image_tokens_per_s": round(batch_size * num_tokens / estimate, 1)}
    result["speedup_cached_vs_uncached"] = round(result["uncached"]["seconds"] / result["cached"]["seconds"], 1)
    queue.put(result)


def run_isolated(target, *args):
    """`target(*args, queue)` in a fresh spawned process (peak RSS and compile caches do not leak between cases);
    returns what it put on the queue."""
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def emit_report(report: dict, output: str | None) -> None:
    """Print the JSON report and, with `output`, write it atomically (a killed run leaves no truncated file)."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        partial = f"{output}.partial"
        with open(partial, "w") as f:
            f.write(text + "\n")
        os.replace(partial, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small", "LlamaGen-B", "t2i-small", "t2i-LlamaGen-B"],
                        help="'small', LlamaGen presets, or 't2i-' + either (text-conditional)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--full-uncached", action="store_true", help="measure (not estimate) uncached large models")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()

    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
              platform.machine(), "dtype": "float32", "results": []}
    for name in args.models:
        report["results"].append(run_isolated(run_case, name, args.batch_size, args.guidance_scale,
                                              args.full_uncached))
        print(f"done: {name}", file=sys.stderr)
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
