"""Benchmark the decode step of GEARForCausalImageLM eager vs `torch.compile`d (inductor), random weights.

For each model (`LlamaGen-B` class-conditional, `t2i-LlamaGen-B` text-conditional with a 300-position prefix; see
`bench_sampling.py` for the sizes) and batch size B with classifier-free guidance (`[cond; uncond]`, 2B rows per
step), it reports as JSON:
* compile time of the static-shape step (first call: dynamo trace + inductor codegen + C++ build, with an empty
  inductor cache), and again after `torch._dynamo.reset()` with inductor's FX-graph cache warm (a later process);
* decode-step time over the whole raster, teacher-forced with the same tokens for every variant: the eager cached
  forward (`decode_one_token` without a position: attends over the valid prefix), the static step run eagerly and
  the compiled static step; wall ms per step (median, mean), CPU ms per step (median; all threads, less sensitive
  to other load), image tokens/s (B tokens per step), the per-position medians (flat for a static step), and the
  largest logit difference to the eager forward;
* end-to-end greedy `generate_images` eager vs `compile=True` (compiled graph already built): seconds, image
  tokens/s, and whether the token grids are identical; and how many graphs dynamo built after the first call (0:
  every later position and call reuses it) and graph breaks (0).

Variants are timed in alternating rounds and the best round is kept (the CPU may be shared); each model runs in a
fresh subprocess with its own empty inductor cache directory.

    python benchmarks/bench_decode_compile.py [--models LlamaGen-B t2i-LlamaGen-B] [--batch-sizes 8 1]
                                              [--guidance-scale 4] [--rounds 2] [--threads 1] [--output bench.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import build_model, conditions, emit_report, run_isolated  # noqa: E402  (same models)


def _filled_cache(model, condition):
    from gear_hf.sampling import prefill

    cache = model.allocate_kv_cache(condition.batch_size)
    prefill(model, condition, cache)
    return cache


def _time_raster(step, model, condition, tokens) -> tuple[list[float], list[float], torch.Tensor]:
    """Per-step wall and CPU milliseconds of `step(token, cache, position)` over every image position, and the
    logits. The token goes through a contiguous `(rows, 1)` buffer, as in `decode_n_tokens` (same strides, so the
    compiled graph is the one `generate_images` uses)."""
    cache = _filled_cache(model, condition)
    position = torch.tensor([model.config.prefix_length])
    feed = torch.empty(tokens.shape[0], 1, dtype=torch.long)
    wall, cpu, logits = [], [], []
    for t in range(tokens.shape[1]):
        feed.copy_(tokens[:, t : t + 1])
        start, start_cpu = time.perf_counter(), time.process_time()
        logits.append(step(feed, cache, position))
        wall.append(1000 * (time.perf_counter() - start))
        cpu.append(1000 * (time.process_time() - start_cpu))
        position += 1
    return wall, cpu, torch.stack(logits)


def _summary(wall: list[float], cpu: list[float], batch_size: int) -> dict:
    buckets = 8
    size = len(wall) // buckets
    medians = [round(statistics.median(wall[i * size : (i + 1) * size]), 2) for i in range(buckets)]
    median = statistics.median(wall)
    return {"ms_per_step_median": round(median, 2), "ms_per_step_mean": round(statistics.fmean(wall), 2),
            "cpu_ms_per_step_median": round(statistics.median(cpu), 2),
            "image_tokens_per_s": round(1000 * batch_size / median, 1), "median_ms_by_position_bucket": medians}


def run_case(name: str, batch_size: int, guidance_scale: float, rounds: int, threads: int | None, queue) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from gear_hf.sampling import compiled_decode_one_token, decode_one_token

    if threads:
        torch.set_num_threads(threads)
    model = build_model(name)
    config = model.config
    cond, null, generate_kwargs = conditions(config, batch_size)
    condition = cond.with_unconditional(null)
    rows = condition.batch_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (rows, config.num_image_tokens - 1), generator=g)
    compiled = compiled_decode_one_token()
    steps = {
        "eager_forward": lambda token, cache, position: decode_one_token(model, token, cache),
        "static_eager": lambda token, cache, position: decode_one_token(model, token, cache, position),
        "static_compiled": lambda token, cache, position: compiled(model, token, cache, position),
    }
    result = {"model": name, "parameters_M": round(model.num_parameters() / 1e6, 2), "batch_size": batch_size,
              "threads": torch.get_num_threads(),
              "guidance_scale": guidance_scale, "rows_per_step": rows, "cache_length": model.max_sequence_length,
              "decode_steps": tokens.shape[1]}

    with torch.no_grad():
        # 1. Compile time: the first call of the compiled step (cold inductor cache), then a re-trace after
        #    torch._dynamo.reset() that finds inductor's FX-graph cache warm.
        compile_seconds = []
        for _ in range(2):
            torch._dynamo.reset()
            cache = _filled_cache(model, condition)
            start = time.perf_counter()
            compiled(model, tokens[:, :1].contiguous(), cache, torch.tensor([config.prefix_length]))
            compile_seconds.append(time.perf_counter() - start)
        result["compile_seconds"] = round(compile_seconds[0], 1)
        result["compile_seconds_fx_cache_warm"] = round(compile_seconds[1], 1)
        graphs_before = counters["stats"]["unique_graphs"]

        # 2. Decode steps over the raster, variants in alternating rounds, best round kept.
        best, logits = {}, {}
        for _ in range(rounds):
            for variant, step in steps.items():
                wall, cpu, out = _time_raster(step, model, condition, tokens)
                if variant not in best or statistics.median(wall) < statistics.median(best[variant][0]):
                    best[variant] = wall, cpu
                logits[variant] = out
        result["decode_step"] = {variant: _summary(*times, batch_size) for variant, times in best.items()}
        for variant in ("static_eager", "static_compiled"):
            diff = (logits[variant] - logits["eager_forward"]).abs().max().item()
            result["decode_step"][variant]["max_abs_logit_diff_vs_eager_forward"] = float(f"{diff:.3g}")
        step_results = result["decode_step"]
        result["speedup_compiled_vs_eager_step"] = {
            key: round(step_results["eager_forward"][key] / step_results["static_compiled"][key], 2)
            for key in ("ms_per_step_median", "cpu_ms_per_step_median")
        }

    # 3. End to end, greedy: eager vs compile=True (graph already built above).
    end_to_end, grids = {}, {}
    for _ in range(rounds):
        for variant, flag in (("eager", False), ("compiled", True)):
            start = time.perf_counter()
            grids[variant] = model.generate_images(**generate_kwargs, guidance_scale=guidance_scale,
                                                   do_sample=False, compile=flag)
            end_to_end[variant] = min(end_to_end.get(variant, float("inf")), time.perf_counter() - start)
    image_tokens = batch_size * config.num_image_tokens
    result["generate_images"] = {
        variant: {"seconds": round(s, 2), "image_tokens_per_s": round(image_tokens / s, 1)}
        for variant, s in end_to_end.items()
    }
    result["generate_images"]["speedup"] = round(end_to_end["eager"] / end_to_end["compiled"], 2)
    result["generate_images"]["grids_identical"] = bool(torch.equal(grids["eager"], grids["compiled"]))
    result["graphs_compiled_after_first_call"] = counters["stats"]["unique_graphs"] - graphs_before
    result["graph_breaks"] = sum(counters["graph_break"].values())
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # others' load on the shared CPU
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["LlamaGen-B", "t2i-LlamaGen-B"],
                        help="'small', LlamaGen presets, or 't2i-' + either (text-conditional)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="images per batch (2x rows)")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds per variant (best kept)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's); 1 is steadier on a shared CPU")
    parser.add_argument("--output", default=None, help="also write the JSON here (atomically)")
    args = parser.parse_args()
    if args.guidance_scale <= 1:
        parser.error("--guidance-scale must be > 1 (the benchmark measures the [cond; uncond] CFG step)")

    report = {"torch": torch.__version__, "machine": platform.processor() or
              platform.machine(), "dtype": "float32", "backend": "inductor", "load_average": os.getloadavg(),
              "results": []}
    for name in args.models:
        for batch_size in args.batch_sizes:
            with tempfile.TemporaryDirectory() as inductor_cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache  # cold compile; inherited by the subprocess
                report["results"].append(run_isolated(run_case, name, batch_size, args.guidance_scale, args.rounds,
                                                      args.threads))
            print(f"done: {name} batch {batch_size}", file=sys.stderr)
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
