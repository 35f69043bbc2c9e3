"""Seconds per step and peak memory of the Python runtime on a bundle: the baseline of the web runtime's benchmark.

    python runtimes/web/scripts/bench_python.py BUNDLE --threads 1 --steps 16 [--height 256 --width 256] [--seed 0]

Prints one JSON object: mean and median seconds per sampling step, the whole generation's seconds, and the
process's peak resident memory (ru_maxrss: numpy, onnxruntime and the sessions included) beside its resident
memory after the imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time


def rss_now() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a red triangle at the top left on a white background")
    args = parser.parse_args()

    from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline

    baseline = rss_now()
    started = time.perf_counter()
    pipe = OnnxPipeline(args.bundle, threads=args.threads)
    load_s = time.perf_counter() - started
    overrides = {"steps": args.steps, "seed": args.seed}
    if args.height:
        overrides.update(height=args.height, width=args.width)
    times = []
    last = time.perf_counter()

    def on_step(step, tokens):
        nonlocal last
        now = time.perf_counter()
        times.append(now - last)
        last = now

    started = last = time.perf_counter()
    pipe.generate(args.prompt, callback=on_step, **overrides)
    total = time.perf_counter() - started
    print(
        json.dumps(
            {
                "runtime": "python",
                "threads": args.threads,
                "steps": args.steps,
                "load_s": round(load_s, 3),
                "mean_s_per_step": statistics.mean(times),
                "median_s_per_step": statistics.median(times),
                "generate_s": total,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "baseline_rss_bytes": baseline,
            }
        )
    )


if __name__ == "__main__":
    main()
