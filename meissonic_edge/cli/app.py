"""The `meissonic-edge` command: a thin argparse layer over the Python API.

Every user-fixable problem is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from meissonic_edge.cli.args import Parser, integer, number
from meissonic_edge.cli.bench import add_bench_parser
from meissonic_edge.cli.demo import add_demo_parsers
from meissonic_edge.cli.sensitivity import add_sensitivity_parser
from meissonic_edge.errors import MeissonicError, OptionsError
from meissonic_edge.fileio import check_file_path

logger = logging.getLogger("meissonic_edge")

EXPORT_EXTRA_HINT = "install the export extra: pip install torch==2.13.0 'meissonic-edge[export]'"
HEAVY_MODULES = {"torch", "transformers", "diffusers", "safetensors", "onnx", "onnxscript", "coremltools"}


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def is_bundle(path: Path) -> bool:
    return (path / "manifest.json").exists() or any(path.glob("*.onnx"))


# ----------------------------------------------------------------------------------------------- commands


def cmd_make_random(args) -> None:
    from meissonic_edge.model.presets import make_random

    compression = {"on": True, "off": False, "preset": None}[args.feature_compression]
    path = make_random(
        args.out, args.preset, args.seed, compression, dtype=torch_dtype(args.dtype), overwrite=args.force
    )
    print(f"wrote a random {args.preset} model directory to {path}")


def cmd_export(args) -> None:
    from meissonic_edge.export.cases import parse_size

    coreml_only = {
        "--minimum-target": args.minimum_target,
        "--sizes": args.sizes,
        "--transformer-batch": args.transformer_batch,
    }
    int4 = {
        "algorithm": args.int4_algorithm,
        "block_size": args.int4_block_size,
        "symmetric": None if args.int4_asymmetric is None else not args.int4_asymmetric,
        "accuracy_level": args.int4_accuracy_level,
    }
    int4 = {k: v for k, v in int4.items() if v is not None}
    if args.format == "coreml":
        if int4:
            raise OptionsError("--int4-* options apply to --format onnx (CoreML int4 is symmetric, block 32)")
        if args.no_tiled_decoder:
            raise OptionsError("--no-tiled-decoder applies to --format onnx")
        from meissonic_edge.export.to_coreml import export_coreml

        path = export_coreml(
            args.model_dir,
            args.out_dir,
            precision=args.precision or "fp16",
            minimum_target=args.minimum_target or "iOS18",
            sizes=args.sizes or "512,1024",
            transformer_batch=args.transformer_batch or 2,
            text_encoder_dir=args.text_encoder,
            check_size=parse_size(args.check_size),
            overwrite=args.force,
            progress=not args.quiet,
        )
        print_bundle_summary(path)
        print(f"wrote the CoreML bundle {path} (every graph's decompressed weights passed their fidelity check)")
        return
    given = [flag for flag, value in coreml_only.items() if value is not None]
    if given:
        raise OptionsError(f"{', '.join(given)} apply to --format coreml")
    from meissonic_edge.export.to_onnx import export_onnx

    path = export_onnx(
        args.model_dir,
        args.out_dir,
        precision=args.precision or "fp32",
        text_encoder_dir=args.text_encoder,
        check_size=parse_size(args.check_size),
        overwrite=args.force,
        progress=not args.quiet,
        int4_settings=int4,
        tiled_decoder=not args.no_tiled_decoder,
    )
    print_bundle_summary(path)
    print(f"wrote the ONNX bundle {path} (every graph passed its parity check)")


def print_bundle_summary(path: Path) -> None:
    """One line per graph: precision, size on disk, its first cosine check, weights left in float."""
    from meissonic_edge.runtime.bundle import graph_files, read_manifest

    manifest = read_manifest(path)
    print(f"{'graph':<20}{'precision':<11}{'MB on disk':>11}  {'parity':<36}float weights left")
    for name, graph in manifest["graphs"].items():
        size = sum(manifest["files"][f]["bytes"] for f in graph_files(graph)) / 1e6
        checks = graph["parity"]
        metric = next((m for m in checks if m.endswith("cosine")), next(iter(checks)))
        parity = f"{metric} {checks[metric]['value']:.6g}"
        left = graph.get("quantization", {}).get("float_weight_ops", "-")
        print(f"{name:<20}{graph['precision']:<11}{size:>11.1f}  {parity:<36}{left}")


def overrides(args) -> dict:
    """The generation options the user gave; the rest keep the bundle's or upstream's defaults."""
    given = {
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "token_temperature": args.token_temperature,
        "temperature": tuple(args.gumbel_temperature) if args.gumbel_temperature else None,
        "negative_prompt": args.negative_prompt,
        "strength": args.strength,
        "height": args.height,
        "width": args.width,
    }
    return {"seed": args.seed, **{k: v for k, v in given.items() if v is not None}}


def check_output_path(output: Path) -> None:
    from meissonic_edge.runtime.imaging import image_format

    check_file_path(output)
    image_format(output)


def edit_arguments(args) -> dict:
    """The editing inputs the user gave (image, mask, expand), read now: before any model is loaded."""
    from meissonic_edge.runtime.editing import open_image, parse_expand

    return {
        "image": None if args.image is None else open_image(args.image),
        "mask": None if args.mask is None else open_image(args.mask, "mask"),
        "expand": None if args.expand is None else parse_expand(args.expand),
    }


def cmd_generate(args) -> None:
    from meissonic_edge.runtime.editing import edit_options
    from meissonic_edge.runtime.imaging import save_image
    from meissonic_edge.runtime.sampler import model_defaults

    path, output = Path(args.path), Path(args.output)
    check_output_path(output)
    if args.threads is not None and args.threads < 1:
        raise OptionsError(f"threads must be an integer >= 1, got {args.threads}")
    edit = edit_arguments(args)
    if path.is_dir() and is_bundle(path):  # onnxruntime, no torch
        from meissonic_edge.runtime.bundle import read_manifest
        from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline, options_from_manifest

        if args.text_encoder:
            raise OptionsError("--text-encoder applies to model directories; a bundle carries its own text encoder")
        manifest = read_manifest(path)
        if manifest.get("backend", "onnx") != "onnx":
            raise OptionsError(
                f"{path} is a {manifest['backend']} bundle, which runs in an app: see runtimes/swift/README.md"
            )
        stride = manifest["model"]["token_stride"]
        options, _ = edit_options(options_from_manifest(manifest), overrides(args), stride, **edit)  # before loading
        if edit["image"] is not None and "vq_encoder" not in manifest["graphs"]:
            raise OptionsError(f"{path} has no vq_encoder graph, which editing needs: re-export the bundle")
        providers = args.provider.split(",") if args.provider else None
        pipeline = OnnxPipeline(path, providers=providers, threads=args.threads, low_memory=args.low_memory)
    else:  # the PyTorch reference
        from meissonic_edge.model.layout import transformer_folder
        from meissonic_edge.runtime.config import TransformerConfig

        config = TransformerConfig.from_json_file(transformer_folder(path) / "config.json")
        options, _ = edit_options(model_defaults(path), overrides(args), config.token_stride, **edit)  # before loading
        from meissonic_edge.model.reference import ReferencePipeline

        pipeline = ReferencePipeline.from_model_dir(path, args.text_encoder)
    image = pipeline.generate(args.prompt, options, progress=not args.quiet, **edit).images[0]
    save_image(image, output)
    print(f"wrote {output}")


def cmd_verify(args) -> None:
    from meissonic_edge.runtime.bundle import read_manifest, verify_files

    manifest = read_manifest(args.bundle)
    if manifest.get("backend") == "coreml" and args.model is not None:
        raise OptionsError(
            "a CoreML bundle's fidelity was checked at export (manifest parity); verify checks checksums"
        )
    verify_files(args.bundle, manifest, checksums=True)
    print(f"{args.bundle}: manifest version {manifest['format_version']}, {len(manifest['files'])} files, checksums OK")
    if args.model is None:
        return
    from meissonic_edge.export.to_onnx import verify_parity

    results = verify_parity(args.bundle, args.model, args.text_encoder, progress=not args.quiet)
    for component, checks in results.items():
        line = ", ".join(f"{metric}={c['value']:.6g} (>= {c['threshold']})" for metric, c in checks.items())
        print(f"{component}: {line}".replace(">= ", "threshold "))
    print("parity OK: every graph matches the PyTorch reference")


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="meissonic-edge", description="Export, quantize and run Meissonic text-to-image on small devices."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

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

    p = commands.add_parser("export", help="export a model directory to a bundle of graphs")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", default="onnx", choices=["onnx", "coreml"], help="onnx (default) or coreml")
    p.add_argument(
        "--precision",
        help="onnx: fp32 (default), fp16, int8, int4, GRAPH=P,... or a JSON recipe (export/recipes/); "
        "coreml: fp16 (default), int8, int4, palettize4, palettize6 or GRAPH=P,...",
    )
    p.add_argument("--minimum-target", help="coreml: iOS17, iOS18 (default), macOS14, macOS15; int4 needs iOS18+")
    p.add_argument(
        "--sizes", help="coreml: image sizes, comma-separated N or HxW; one package per size (default 512,1024)"
    )
    p.add_argument(
        "--transformer-batch", type=integer, choices=[1, 2], help="coreml: 2 = guidance in one call (default), 1"
    )
    p.add_argument("--int4-algorithm", choices=["rtn", "hqq", "gptq"], help="int4 graphs: quantizer (default rtn)")
    p.add_argument("--int4-block-size", type=integer, help="int4 graphs: weights per block (default 32)")
    p.add_argument("--int4-asymmetric", action="store_const", const=True, help="int4 graphs: with zero points")
    p.add_argument("--int4-accuracy-level", type=integer, help="int4 graphs: MatMulNBits accuracy level (default 4)")
    p.add_argument("--text-encoder", help="take the text encoder and tokenizer from this directory")
    p.add_argument("--check-size", default="256", help="image size of the parity checks, N or HxW (default: 256)")
    p.add_argument(
        "--no-tiled-decoder",
        action="store_true",
        help="ONNX: leave out vq_decoder_tiled/ and vq_encoder_tiled/, the VQ decoder and encoder of --low-memory "
        "(210 MB and 203 MB at full size)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("generate", help="generate an image from a prompt")
    p.add_argument("path", help="a bundle (onnxruntime) or a model directory (PyTorch reference)")
    p.add_argument("prompt")
    p.add_argument("--output", "-o", default="out.png", help="image file to write (default: out.png)")
    p.add_argument("--steps", type=integer, help="sampling steps (default: the bundle's, or 64)")
    p.add_argument("--guidance-scale", type=number, help="classifier-free guidance (default: 9)")
    p.add_argument("--negative-prompt", help='the unconditional prompt (default: "")')
    p.add_argument(
        "--token-temperature", type=number, help="softmax temperature of the token draws (default: the bundle's, or 1)"
    )
    p.add_argument(
        "--gumbel-temperature",
        type=number,
        nargs=2,
        metavar=("FIRST", "LAST"),
        help="Gumbel noise on the confidence that picks which tokens to keep, first step to last "
        "(default: the bundle's, or 2 0; 0 0 keeps the most confident first)",
    )
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--height", type=integer, help="pixels (default: 1024; an edit's size is its image's)")
    p.add_argument("--width", type=integer, help="pixels (default: 1024; an edit's size is its image's)")
    p.add_argument("--image", help="edit this image: img2img alone, inpainting with --mask, outpainting with --expand")
    p.add_argument("--mask", help="inpainting: white pixels are repainted, black kept; the image's size")
    p.add_argument(
        "--expand",
        metavar="LEFT,TOP,RIGHT,BOTTOM",
        help="outpainting: grow the canvas by these pixels (stride multiples)",
    )
    p.add_argument("--strength", type=number, help="editing: share of the steps run, in (0, 1] (default: 1)")
    p.add_argument("--low-memory", action="store_true", help="bundle: load one graph at a time")
    p.add_argument("--threads", type=integer, help="bundle: onnxruntime intra-op threads")
    p.add_argument("--provider", help="bundle: onnxruntime providers, comma-separated (default: CPU)")
    p.add_argument("--text-encoder", help="model directory: take the text encoder and tokenizer from here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("verify", help="check a bundle's checksums, and its parity given the source model")
    p.add_argument("bundle")
    p.add_argument("--model", help="the model directory it was exported from: re-run the parity checks")
    p.add_argument("--text-encoder", help="the text encoder directory used at export, if any")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    add_demo_parsers(commands)
    add_bench_parser(commands)
    add_sensitivity_parser(commands)
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
        if e.name and e.name.split(".")[0] in HEAVY_MODULES:
            print(f"error: this command needs {e.name}: {EXPORT_EXTRA_HINT}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
