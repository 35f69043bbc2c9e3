"""Peak memory per phase of whole generations from one bundle, normal against `--low-memory`, and the
PyTorch reference (fp32) of the same model beside them.

Each generation runs in a process of its own (the `bench` child), so its peak resident memory is its own:

    python benchmarks/low_memory.py BUNDLE --model MODEL_DIR --sizes 512 1024 --steps 4 --out OUT

writes `report.json` and `report.md` into --out: per size and mode, seconds per step (median, and the
steady state: the median without the first step, which also sets up the session's buffers), and peak RSS
per phase (load, text encoding, sampling, VQ decode) and for the whole process (VmHWM), in MiB and in GB
(10^9 bytes, the unit of issue 7's targets).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

from meissonic_edge.bench.results import PHASES
from meissonic_edge.bench.runner import generation_job, run_child

PROMPT = "a photo of a red fox in the snow"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--model", help="the model directory the bundle was exported from: adds PyTorch rows")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    modes = [("normal", "onnx", False), ("low-memory", "onnx", True)]
    if args.model:
        modes.append(("pytorch fp32", "torch", False))
    for size in args.sizes:
        for mode, backend, low_memory in modes:
            folder = out / "runs" / f"{size}px-{mode.replace(' ', '-')}"
            settings = dict(
                steps=args.steps, repeats=1, prompts=[PROMPT], seed=0, threads=args.threads, low_memory=low_memory
            )
            source = Path(args.model if backend == "torch" else args.bundle)
            job = generation_job(backend, source, folder, size, settings, record=False)
            measure = run_child(job, folder, f"{mode} at {size} px")
            steps = measure["step_s"]["all"]
            measure["steady_step_s"] = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
            rows.append({"size": size, "mode": mode, **measure})
            print(f"{size} {mode}: step {measure['steady_step_s']:.2f} s, peak {measure['max_rss_mib']:.0f} MiB")
    command = "python benchmarks/low_memory.py " + " ".join(sys.argv[1:])
    (out / "report.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Peak memory per phase: normal against low-memory",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
        "",
        "| size | mode | step s (median) | step s (without the first) | "
        + " | ".join(f"{p} MiB" for p in PHASES)
        + " | process peak MiB | process peak GB |",
        "|---|---|---|---|" + "---|" * len(PHASES) + "---|---|",
    ]
    for r in rows:
        phases = " | ".join(f"{r['peak_rss_mib'][p]:.0f}" for p in PHASES)
        peak_gb = r["max_rss_mib"] * 2**20 / 1e9
        lines.append(
            f"| {r['size']} | {r['mode']} | {r['step_s']['median']:.2f} | {r['steady_step_s']:.2f} | {phases} "
            f"| {r['max_rss_mib']:.0f} | {peak_gb:.3f} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
