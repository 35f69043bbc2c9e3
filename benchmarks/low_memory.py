"""Peak memory per phase of whole generations from one bundle, normal against `--low-memory`.

Each generation runs in a process of its own (the `bench` child), so its peak resident memory is its own:

    python benchmarks/low_memory.py BUNDLE --sizes 512 1024 --steps 2 --out benchmarks/reports/low-memory-int4

writes `report.json` and `report.md` into --out: per size and mode, seconds per step, and peak RSS (MiB)
per phase (load, text encoding, sampling, VQ decode) and for the whole process (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from meissonic_edge.bench import PHASES, generation_job, run_child

PROMPT = "a photo of a red fox in the snow"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for size in args.sizes:
        for low_memory in (False, True):
            mode = "low-memory" if low_memory else "normal"
            folder = out / "runs" / f"{size}px-{mode}"
            settings = dict(
                steps=args.steps, repeats=1, prompts=[PROMPT], seed=0, threads=args.threads, low_memory=low_memory
            )
            job = generation_job("onnx", Path(args.bundle), folder, size, settings, record=False)
            measure = run_child(job, folder, f"{mode} at {size} px")
            rows.append({"size": size, "mode": mode, **measure})
            print(f"{size} {mode}: step {measure['step_s']['median']:.2f} s, peak {measure['max_rss_mib']:.0f} MiB")
    command = "python benchmarks/low_memory.py " + " ".join(sys.argv[1:])
    (out / "report.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Peak memory per phase: normal against low-memory",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
        "",
        "| size | mode | step s median | " + " | ".join(f"{p} MiB" for p in PHASES) + " | process peak MiB |",
        "|---|---|---|" + "---|" * len(PHASES) + "---|",
    ]
    for r in rows:
        phases = " | ".join(f"{r['peak_rss_mib'][p]:.0f}" for p in PHASES)
        lines.append(f"| {r['size']} | {r['mode']} | {r['step_s']['median']:.2f} | {phases} | {r['max_rss_mib']:.0f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
