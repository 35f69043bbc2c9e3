"""The `demo` and `train-demo` commands (argparse only; the work is in demo.py and train_demo.py)."""

from __future__ import annotations

from pathlib import Path

from meissonic_edge.cli.args import integer
from meissonic_edge.errors import OptionsError


def cmd_demo(args) -> None:
    from meissonic_edge.demo.run import run_demo

    if args.steps is not None and args.steps < 1:
        raise OptionsError(f"--steps must be >= 1, got {args.steps}")
    result = run_demo(
        args.output,
        precision=args.precision,
        prompts=args.prompt,
        seed=args.seed,
        steps=args.steps,
        threads=args.threads,
        progress=not args.quiet,
    )
    judged = [v for v in result.verdicts if v is not None]
    print(f"bundle ({args.precision}): {result.bundle}")
    print(f"images: {Path(result.images[0]).parent}/ ({len(result.images)} images)")
    if judged:
        print(f"prompt adherence (shape, colour and position all right): {sum(judged)}/{len(judged)}")
    for edit in result.edits:
        verdict = "shows" if edit.satisfied else "MISSES"
        print(f"{edit.name}: {verdict} {edit.prompt!r} (outline IoU {edit.outline_iou:.3f}); ", end="")
        print(
            f"preserved region {edit.preserved_psnr_db:.1f} dB PSNR against the input "
            f"(the input's own VQ round trip: {edit.roundtrip_psnr_db:.1f} dB)"
        )
    print(f"contact sheet: {result.contact_sheet}")


def cmd_train_demo(args) -> None:
    from meissonic_edge.demo.train import TrainingRecipe, train_demo

    recipe = TrainingRecipe.quick(args.seed) if args.quick else TrainingRecipe(seed=args.seed)
    path = train_demo(args.out, recipe, overwrite=args.force, cache_dir=args.cache)
    print(f"wrote the trained demo model to {path} (log: {path / 'training_log.json'})")


def add_demo_parsers(commands) -> None:
    p = commands.add_parser("demo", help="export the shipped shapes model, generate a few images and a contact sheet")
    p.add_argument("--output", default="demo-output", help="folder for the bundle and images (default: demo-output)")
    p.add_argument("--precision", default="int8", help="bundle precision: fp32, fp16, int8 (default), int4, ...")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several; default: eight shape prompts)")
    p.add_argument("--steps", type=integer, help="sampling steps (default: the model's, 256)")
    p.add_argument("--seed", type=integer, default=0, help="seed of the first image; the next ones count up")
    p.add_argument("--threads", type=integer, help="onnxruntime intra-op threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser("train-demo", help="train the demo shapes model from scratch on this CPU")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the machinery only")
    p.add_argument("--cache", help="keep the trained VQ tokenizer here and reuse it for the same recipe")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_train_demo)
