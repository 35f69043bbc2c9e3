"""The `meissonic-edge` command: a thin argparse layer over the Python API.

Every user-fixable problem is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from meissonic_edge.errors import MeissonicError, OptionsError

logger = logging.getLogger("meissonic_edge")

EXPORT_EXTRA_HINT = "install the export extra: pip install torch==2.13.0 'meissonic-edge[export]'"


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------------------------- commands


def cmd_make_random(args) -> None:
    from meissonic_edge.presets import make_random

    compression = {"on": True, "off": False, "preset": None}[args.feature_compression]
    path = make_random(
        args.out, args.preset, args.seed, compression, dtype=torch_dtype(args.dtype), overwrite=args.force
    )
    print(f"wrote a random {args.preset} model directory to {path}")


def generation_options(args):
    from meissonic_edge.sampler import GenerationOptions

    defaults = GenerationOptions()
    return GenerationOptions(
        steps=args.steps if args.steps is not None else defaults.steps,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else defaults.guidance_scale,
        negative_prompt=args.negative_prompt if args.negative_prompt is not None else defaults.negative_prompt,
        seed=args.seed,
        height=args.height,
        width=args.width,
    )


def cmd_generate(args) -> None:
    from meissonic_edge.imaging import save_image

    options = generation_options(args)
    path = Path(args.path)
    output = Path(args.output)
    if output.exists() and output.is_dir():
        raise OptionsError(f"cannot write {output}: it is a directory")
    if not output.parent.is_dir() and str(output.parent):
        raise OptionsError(f"cannot write {output}: folder {output.parent} does not exist")

    from meissonic_edge.checkpoint import transformer_folder
    from meissonic_edge.config import TransformerConfig

    config = TransformerConfig.from_json_file(transformer_folder(path) / "config.json")
    options.validate(config.token_stride)  # before any weights are loaded

    from meissonic_edge.pipeline import ReferencePipeline

    pipeline = ReferencePipeline.from_model_dir(path, args.text_encoder)
    image = pipeline.generate(args.prompt, options, progress=not args.quiet).images[0]
    save_image(image, output)
    print(f"wrote {output}")


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meissonic-edge",
        description="Export, quantize and run Meissonic text-to-image on small devices.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("make-random", help="write a model directory with random weights (upstream layout)")
    p.add_argument("out", help="the model directory to create")
    p.add_argument("--preset", default="tiny", choices=["tiny", "meissonic"], help="sizes (default: tiny)")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument(
        "--feature-compression",
        choices=["preset", "on", "off"],
        default="preset",
        help="2x2 down/upsampling of the token grid around the blocks (default: as the preset, on)",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights on disk")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_make_random)

    p = commands.add_parser("generate", help="generate an image from a prompt")
    p.add_argument("path", help="a model directory (PyTorch reference)")
    p.add_argument("prompt")
    p.add_argument("--output", "-o", default="out.png", help="image file to write (default: out.png)")
    p.add_argument("--steps", type=integer, help="sampling steps (default: 64)")
    p.add_argument("--guidance-scale", type=number, help="classifier-free guidance (default: 9)")
    p.add_argument("--negative-prompt", help='the unconditional prompt (default: "")')
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--height", type=integer, default=1024)
    p.add_argument("--width", type=integer, default=1024)
    p.add_argument("--text-encoder", help="take the text encoder and tokenizer from this directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        args.func(args)
    except MeissonicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in {"torch", "transformers", "diffusers", "safetensors", "onnx"}:
            print(f"error: this command needs {e.name}: {EXPORT_EXTRA_HINT}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
