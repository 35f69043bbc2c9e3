"""The `meissonic-edge bench` subcommand: a thin argparse layer over `meissonic_edge.bench.runner.bench`.

meissonic-edge bench MODEL_DIR OUT_DIR --variants fp32 fp16 --sizes 512 1024 --steps 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meissonic_edge.cli.args import integer


def shapes_adherence(image, prompt: str):
    """The demo model's evaluator: does the image show the prompt's shape, colour and position (`satisfied`),
    and how close is its outline to the ideal shape (`outline_iou`)?"""
    from meissonic_edge.demo.adherence import judge

    return judge(image, prompt)


def cmd_bench(args) -> None:
    from meissonic_edge.bench.runner import bench

    model_dir = args.model_dir
    if model_dir == "demo" and not Path(model_dir).exists():
        from meissonic_edge.demo.run import demo_model_dir

        model_dir = demo_model_dir()
    prompts, adherence_fn = args.prompts, None
    if args.adherence == "shapes":
        from meissonic_edge.demo.shapes import evaluation_scenes

        adherence_fn = shapes_adherence
        prompts = prompts or [scene.caption for scene in evaluation_scenes()]
    report = bench(
        model_dir,
        args.variants,
        args.out_dir,
        sizes=args.sizes,
        steps=args.steps,
        repeats=args.repeats,
        prompts=prompts,
        adherence_fn=adherence_fn,
        seed=args.seed,
        threads=args.threads,
        low_memory=args.low_memory,
        include_reference=not args.no_reference,
        progress=not args.quiet,
    )
    for variant in report["variants"]:
        if not variant["exported"]:
            print(f"reused the existing bundle {Path(args.out_dir) / variant['bundle']} for {variant['spec']}")
    out = Path(args.out_dir)
    print(f"wrote {out / 'report.md'} ({out / 'report.json'}, grid.png, step_time.png, peak_rss.png, size_on_disk.png)")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on the CLI's subparsers (built with `parser_class=Parser`)."""
    p = subparsers.add_parser(
        "bench", help="size, speed, memory and fidelity of exported variants against fp32 and PyTorch"
    )
    p.add_argument("model_dir", help="the model directory to export and measure ('demo': the shipped demo model)")
    p.add_argument("out_dir", help="where the bundles, the runs and the report go (existing bundles are reused)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["fp32", "fp16"],
        metavar="SPEC",
        help="precisions or recipes, as export --precision takes them (default: fp32 fp16; fp32 is always added)",
    )
    p.add_argument("--sizes", type=integer, nargs="+", default=[512], metavar="PX", help="square sizes (default: 512)")
    p.add_argument("--steps", type=integer, default=4, help="sampling steps per generation (default: 4)")
    p.add_argument("--repeats", type=integer, default=1, help="generations per prompt, for steadier timings")
    p.add_argument("--prompts", nargs="+", metavar="PROMPT", help="prompts to generate (default: one fixed prompt)")
    p.add_argument(
        "--adherence",
        choices=["shapes"],
        help="score prompt adherence with the shapes evaluator (demo model; default prompts: its 45 held-out ones)",
    )
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--threads", type=integer, help="onnxruntime and torch intra-op threads (default: theirs)")
    p.add_argument("--low-memory", action="store_true", help="ONNX variants load one graph at a time")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference (no ratios)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)
    return p
