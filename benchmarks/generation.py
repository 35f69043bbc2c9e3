"""Time and memory of whole generations: the onnxruntime bundle beside the PyTorch reference, same run.

Each measurement runs in its own process, so its peak resident memory (max RSS) is its own:

    python benchmarks/generation.py --bundle BUNDLE --model MODEL_DIR --sizes 512 1024 --steps 3 \
        --out benchmarks/reports/onnx-fp32-meissonic

writes `report.json` and `report.md` into --out. Seconds per step are the median (min, max) over the
steps of one guided generation (batch 2), including the numpy sampler's share of the step.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM). getrusage's ru_maxrss is inherited across exec on Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(backend: str, path: str, size: int, steps: int, threads: int | None) -> dict:
    """One generation in this process; returns phase timings and the process's peak RSS."""
    start = time.perf_counter()
    if backend == "onnx":
        from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline

        pipe = OnnxPipeline(path, threads=threads)
    else:
        import torch

        from meissonic_edge.model.reference import ReferencePipeline

        if threads:
            torch.set_num_threads(threads)
        pipe = ReferencePipeline.from_model_dir(path)
    load_s = time.perf_counter() - start

    phases = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            phases[name] = time.perf_counter() - t0
            return out

        return wrapper

    pipe.encode_text = timed("text_encoder_s", pipe.encode_text)
    pipe.decode = timed("vq_decode_s", pipe.decode)
    marks = []
    t0 = time.perf_counter()
    pipe.generate(
        "a photo of a red fox in the snow",
        steps=steps,
        seed=0,
        height=size,
        width=size,
        guidance_scale=9.0,
        callback=lambda i, tokens: marks.append(time.perf_counter()),
    )
    total = time.perf_counter() - t0
    step_start = t0 + phases["text_encoder_s"]
    step_times = [b - a for a, b in zip([step_start, *marks[:-1]], marks, strict=True)]
    return {
        "backend": backend,
        "size": size,
        "steps": steps,
        "load_s": round(load_s, 3),
        **{k: round(v, 3) for k, v in phases.items()},
        "step_s_median": round(statistics.median(step_times), 3),
        "step_s_min": round(min(step_times), 3),
        "step_s_max": round(max(step_times), 3),
        "generation_s": round(total, 3),
        "peak_rss_mb": round(peak_rss_kb() / 1024),
    }


def run_child(backend: str, path: str, size: int, steps: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, path, str(size), str(steps), str(threads or 0)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{backend} at {size} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Generation: onnxruntime bundle vs PyTorch reference",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
        "",
        "| backend | size | load s | text s | step s median (min-max) | VQ decode s | peak RSS MB "
        "| step ratio vs torch | RSS ratio vs torch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    torch_rows = {r["size"]: r for r in rows if r["backend"] == "torch"}
    for r in rows:
        ref = torch_rows.get(r["size"])
        step_ratio = f"{r['step_s_median'] / ref['step_s_median']:.2f}" if ref and ref["step_s_median"] else "-"
        rss_ratio = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref else "-"
        lines.append(
            f"| {r['backend']} | {r['size']} | {r['load_s']} | {r['text_encoder_s']} | {r['step_s_median']} "
            f"({r['step_s_min']}-{r['step_s_max']}) | {r['vq_decode_s']} | {r['peak_rss_mb']} "
            f"| {step_ratio} | {rss_ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        backend, path, size, steps, threads = sys.argv[2:7]
        print(json.dumps(measure(backend, path, int(size), int(steps), int(threads) or None)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--model", required=True, help="the model directory the bundle came from")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        for backend, path in (("torch", args.model), ("onnx", args.bundle)):
            rows.append(run_child(backend, path, size, args.steps, args.threads))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/generation.py " + " ".join(sys.argv[1:])
    (out / "report.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    (out / "report.md").write_text(markdown(rows, command))


if __name__ == "__main__":
    main()
