"""The encode phase of editing: seconds and peak resident memory of the VQ encoder graph per size and mode.

    python benchmarks/editing.py --preset meissonic --sizes 512 1024 --out benchmarks/reports/editing-encode-meissonic

Editing (img2img, inpainting, outpainting) adds one phase before text-to-image's: the image through
`vq_encoder`. The exporter leaves the VQ graphs fp32 under a plain `int8` or `int4` precision and under
`export/recipes/low-memory.json`, so the int8 bundle and the low-memory int4 bundle run the same fp32 encoder
graph; what differs is the runtime's session policy (`runtime.onnx_pipeline.session_options`: low-memory mode runs the
single-run graphs without onnxruntime's arena) and, in low-memory mode, the tiled encoder (`tiled_encoder.py`)
that bundles exported with it carry. This script exports the preset's VQ encoder alone (random weights, the
exporter's own `export_graph` and tiled-encoder writer, fp32 and optionally fp16), then encodes one image
per size, precision and mode, each in a fresh process, and records the session's load seconds, the encode's
seconds, the peak resident memory of the encode phase (sampled every 5 ms, `bench.memory.RssMonitor`) and of the
process (VmHWM).
Writes `report.json` and `report.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("normal", "low-memory", "low-memory, tiled")  # the last: the tiled encoder (fp32 bundles' low-memory mode)


def export_encoders(preset: str, folder: Path, precisions: list[str]) -> dict[str, Path]:
    """The preset's VQ encoder graph (random weights) per precision, as the exporter writes it, and its tiled
    encoder (`folder/vq_encoder_tiled/`, its manifest entry in `folder/tiled.json`)."""
    import torch

    from meissonic_edge.export.graphs import VQEncoderGraph, export_graph
    from meissonic_edge.export.tiled import VQEncoderTail, write_encoder_layer_graphs
    from meissonic_edge.model.presets import PRESETS, build_vqvae
    from meissonic_edge.runtime.tiled_encoder import TILED_ENCODER_GRAPH

    torch.manual_seed(0)
    vqvae = build_vqvae(PRESETS[preset].vqvae).eval()
    entry = write_encoder_layer_graphs(vqvae, folder)
    channels = vqvae.encoder.down_blocks[-1].resnets[0].in_channels
    grid = torch.export.Dim("h", min=1, max=512), torch.export.Dim("w", min=1, max=512)
    dynamic = {"features": {0: torch.export.Dim("batch", min=1, max=64), 2: grid[0], 3: grid[1]}}
    tail = folder / TILED_ENCODER_GRAPH / "tail.onnx"
    export_graph(VQEncoderTail(vqvae), (torch.randn(2, channels, 3, 2),), tail, ["features"], ["tokens"], dynamic,
                 TILED_ENCODER_GRAPH, "fp32")  # fmt: skip
    (folder / "tiled.json").write_text(json.dumps({**entry, "file": f"{TILED_ENCODER_GRAPH}/tail.onnx"}))
    paths = {}
    for precision in precisions:
        torch.manual_seed(0)
        graph = VQEncoderGraph(build_vqvae(PRESETS[preset].vqvae)).eval()
        batch = torch.export.Dim("batch", min=1, max=64)
        height, width = torch.export.Dim("grid_h", min=1, max=512), torch.export.Dim("grid_w", min=1, max=512)
        sample = (torch.rand(1, 3, 48, 32),)
        dynamic = {"image": {0: batch, 2: 16 * height, 3: 16 * width}}
        path = folder / f"vq_encoder-{precision}.onnx"
        export_graph(graph, sample, path, ["image"], ["tokens"], dynamic, "vq_encoder", precision)
        paths[precision] = path
    return paths


def child(job: dict) -> dict:
    """One encode in this process: load the session with the runtime's policy, encode a size x size image."""
    import onnxruntime as ort

    from meissonic_edge.bench.memory import RssMonitor, max_rss_bytes, mib
    from meissonic_edge.runtime.heap import trim_heap
    from meissonic_edge.runtime.onnx_pipeline import session_options
    from meissonic_edge.runtime.tiled_encoder import TILED_ENCODER_GRAPH, TiledEncoder

    monitor = RssMonitor()
    size = job["size"]
    rng = np.random.default_rng(0)  # a smooth random picture: noise upsampled, in [0, 1]
    image = np.kron(rng.random((1, 3, size // 16, size // 16)), np.ones((16, 16))).astype(np.float32)
    monitor.enter("load")
    start = time.perf_counter()
    low_memory = job["mode"] != "normal"
    if job["mode"] == "low-memory, tiled":  # as OnnxPipeline.encode runs it: a session per layer, while it runs
        options = session_options(TILED_ENCODER_GRAPH, job["threads"], low_memory)
        folder = Path(job["graph"]).parent
        open_layer = lambda path: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])  # noqa: E731
        encoder = TiledEncoder(folder, json.loads((folder / "tiled.json").read_text()), open_layer, release=trim_heap)
        run = encoder
    else:
        options = session_options("vq_encoder", job["threads"], low_memory)
        session = ort.InferenceSession(job["graph"], options, providers=["CPUExecutionProvider"])
        run = lambda pixels: session.run(["tokens"], {"image": pixels})[0]  # noqa: E731
    load_s = time.perf_counter() - start
    monitor.enter("vq_encode")
    start = time.perf_counter()
    tokens = run(image)
    encode_s = time.perf_counter() - start
    monitor.stop()
    if tokens.shape != (1, size // 16, size // 16):
        raise SystemExit(f"the encoder gave tokens of shape {tokens.shape}")
    return {
        "load_s": load_s,
        "encode_s": encode_s,
        "load_peak_mib": mib(monitor.peaks.get("load")),
        "vq_encode_peak_mib": mib(monitor.peaks.get("vq_encode")),
        "max_rss_mib": mib(max_rss_bytes()),
    }


def run_child(job: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_markdown(report: dict) -> str:
    lines = [
        f"# Encode phase of editing, `{report['preset']}` preset (random weights)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpus_usable']} cores usable, onnxruntime "
        f"{report['machine']['onnxruntime']}. One fresh process per row; threads: {report['threads'] or 'default'}.",
        "The int8 bundle and the low-memory int4 bundle (`export/recipes/low-memory.json`) both carry the fp32",
        "encoder and the tiled encoder: their encode phase is the fp32 `normal` row (int8, `generate` without",
        "`--low-memory`) and the `low-memory, tiled` row (int4 with `--low-memory`); `low-memory` is a bundle",
        "exported with `--no-tiled-decoder` (no tiled graphs) run with `--low-memory`.",
        "",
        "| size | encoder | mode | load s | encode s | encode phase peak MiB | process peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['size']} | {row['precision']} | {row['mode']} | {row['load_s']:.2f} | {row['encode_s']:.2f} "
            f"| {row['vq_encode_peak_mib']:.0f} | {row['max_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="meissonic", choices=["tiny", "meissonic"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "fp16"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from meissonic_edge.bench.runner import machine_info

    rows = []
    with tempfile.TemporaryDirectory() as work:
        graphs = export_encoders(args.preset, Path(work), args.precisions)
        for size in args.sizes:
            for precision, graph in graphs.items():
                for mode in MODES if precision == "fp32" else MODES[:2]:  # the tiled encoder is fp32's
                    job = {"graph": str(graph), "size": size, "threads": args.threads, "mode": mode}
                    rows.append({"size": size, "precision": precision, "mode": mode, **run_child(job)})
                    print(json.dumps(rows[-1]), flush=True)
    report = {
        "preset": args.preset,
        "command": "python benchmarks/editing.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "threads": args.threads,
        "rows": rows,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    print(report_markdown(report))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
