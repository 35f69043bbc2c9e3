"""Every refusal of the command line in one table: a bad input gets the right exit status, one line on
stderr that starts with `error: ` and no traceback, and nothing is written.

The cases run `meissonic-edge ARGV` as a user meets it. Most run in-process through `cli.main` (fast); a
few run in a real Python process, whose own exception hook would print any traceback that escaped; and one
export is interrupted with SIGINT half-way (`test_an_interrupted_export_leaves_nothing`).

In-process, the heavy work of each command is replaced by a tripwire (`HEAVY_WORK`): a refusal must come
before any model is loaded or run, and a late one fails here at once instead of after an export.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meissonic_edge.cli import main

CLI = [sys.executable, "-m", "meissonic_edge.cli"]
T_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
TE_WEIGHTS = "text_encoder/model.safetensors"

# What every refusal must come before (in-process cases only): the first step that loads or runs a model.
HEAVY_WORK = (
    "meissonic_edge.export.to_onnx.check_cases",  # export, bench, demo, verify --model: load each model to export it
    "meissonic_edge.runtime.onnx_pipeline.OnnxPipeline.session",  # generate from a bundle: load a graph
    "meissonic_edge.model.reference.ReferencePipeline.generate",  # generate from a model directory: sample
    "meissonic_edge.quant.sensitivity.encode_prompts",  # quant-sensitivity: run the text encoder, then the transformer
)


class LateRefusal(BaseException):
    """Raised by a tripwire: the command reached heavy work instead of refusing its input first."""


# ----------------------------------------------------------------------------------------------- inputs


class Sources:
    """The session's tiny model directories and bundle, built only when a case names them."""

    def __init__(self, request):
        self.request = request
        self.used: list[Path] = []

    def get(self, fixture: str) -> Path:
        path = Path(self.request.getfixturevalue(fixture))
        if path not in self.used:
            self.used.append(path)
        return path


def broken_copy(fixture: str, name: str, changes: tuple[Callable[[Path], None], ...]):
    """Setup: a copy of the session fixture's folder at TMP/name, then `changes` applied to it."""

    def setup(tmp: Path, sources: Sources) -> None:
        root = shutil.copytree(sources.get(fixture), tmp / name)
        for change in changes:
            change(root)

    return setup


def broken_bundle(*changes: Callable[[Path], None]):
    """Setup: a copy of the tiny bundle at TMP/bundle, then `changes` applied to it."""
    return broken_copy("tiny_bundle", "bundle", changes)


def broken_model(*changes: Callable[[Path], None]):
    """Setup: a copy of the tiny model directory at TMP/model, then `changes` applied to it."""
    return broken_copy("tiny_model_dir", "model", changes)


def manifest(change: Callable[[dict], None]):
    def apply(root: Path) -> None:
        path = root / "manifest.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return apply


def outside_path(data: dict) -> None:
    data["files"]["../outside.onnx"] = {"sha256": "0" * 64}


def coreml_backend(data: dict) -> None:
    data["backend"] = "coreml"


def without_encoder(data: dict) -> None:
    """A bundle exported before editing existed: no vq_encoder graph."""
    data["graphs"].pop("vq_encoder")
    data["files"].pop("vq_encoder.onnx")


def edit_json(relative: str, **changes):
    def apply(root: Path) -> None:
        path = root / relative
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return apply


def flip_last_byte(relative: str):
    """Same size, other content: only the checksum can tell."""

    def apply(root: Path) -> None:
        data = bytearray((root / relative).read_bytes())
        data[-1] ^= 1
        (root / relative).write_bytes(bytes(data))

    return apply


def drop_tensor(relative: str, key: str):
    def apply(root: Path) -> None:
        from safetensors.numpy import load_file, save_file

        state = load_file(root / relative)
        state.pop(key)
        save_file(state, root / relative)

    return apply


def rename(relative: str, new_name: str):
    def apply(root: Path) -> None:
        (root / relative).rename((root / relative).with_name(new_name))

    return apply


def remove(relative: str):
    def apply(root: Path) -> None:
        path = root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return apply


def write(relative: str, text: str):
    """Setup: a plain file under TMP (a file where a folder is expected, a recipe, ...)."""

    def setup(tmp: Path, sources: Sources) -> None:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_text(text)

    return setup


def both(*setups):
    def setup(tmp: Path, sources: Sources) -> None:
        for one in setups:
            one(tmp, sources)

    return setup


def edit_inputs(tmp: Path, sources: Sources) -> None:
    """Setup: images to edit with (96x64, the tiny model's token stride is 32) and masks, good and bad."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # noise: a PNG of 18 kB
    Image.fromarray(pixels).save(tmp / "image.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 40:96] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    dot = np.zeros((64, 96), np.uint8)
    dot[10, 10] = 255  # one white pixel: covers no token
    Image.fromarray(dot).save(tmp / "dot.png")
    Image.new("L", (32, 32)).save(tmp / "small-mask.png")
    Image.new("L", (96, 64), 0).save(tmp / "black.png")
    Image.new("L", (96, 64), 255).save(tmp / "white.png")
    Image.new("RGB", (16, 16)).save(tmp / "tiny.png")
    Image.new("RGB", (100, 64)).save(tmp / "stretched.png")  # 100 -> 96 wide, 64 high: a 4% stretch
    (tmp / "text.png").write_text("not a picture")
    png = (tmp / "image.png").read_bytes()
    (tmp / "truncated.png").write_bytes(png[: len(png) // 2])  # an interrupted download


# ----------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {tmp}, {model}, {flat} and {bundle} are filled in
    code: int  # 2: a usage mistake (argparse), 1: a MeissonicError
    message: str  # a regex the line after "error: " must match
    absent: tuple[str, ...] = ()  # outputs that must not exist afterwards (and nothing else may change)
    setup: Callable[[Path, Sources], None] | None = None  # writes or breaks inputs under {tmp}
    process: bool = False  # run in a real Python process instead of in-process
    runs_models: bool = False  # the refusal needs the models run (a parity check): no tripwires


def case(id, argv, code, message, absent=(), **options) -> Case:
    return Case(id, tuple(argv.split()) if isinstance(argv, str) else tuple(argv), code, message, absent, **options)


GEN = "generate {bundle} p -o {tmp}/out.png"  # a generation from the tiny bundle
GEN_COPY = "generate {tmp}/bundle p -o {tmp}/out.png"  # ... from a broken copy of it
EDIT = f"{GEN} --image {{tmp}}/image.png"
EXPORT = "export {model} {tmp}/b"
EXPORT_COPY = "export {tmp}/model {tmp}/b"
BENCH = "bench {model} {tmp}/bench --quiet"
SENS = "quant-sensitivity {model} --out {tmp}/recipe.json --quiet"
OUT, B, BENCH_OUT = ("{tmp}/out.png",), ("{tmp}/b",), ("{tmp}/bench",)
RECIPE = ("{tmp}/recipe.json", "{tmp}/recipe.sensitivity.json", "{tmp}/recipe.sensitivity.md")

# fmt: off
CASES = [
    # --- the command line itself
    case("no command", "", 2, r"the following arguments are required: COMMAND"),
    case("unknown command", "convert x", 2, r"argument COMMAND: invalid choice: 'convert'"),
    case("unknown option", "generate {bundle} p --colour red", 2, r"unrecognized arguments: --colour red", OUT),
    # --- make-random
    case("make-random: unknown preset", "make-random {tmp}/m --preset huge", 2,
         r"argument --preset: invalid choice: 'huge'", ("{tmp}/m",), process=True),
    case("make-random: unknown dtype", "make-random {tmp}/m --dtype fp64", 2, r"argument --dtype: invalid choice",
         ("{tmp}/m",)),
    case("make-random: seed not an integer", "make-random {tmp}/m --seed 1.5", 2,
         r"argument --seed: expected an integer, got '1.5'", ("{tmp}/m",)),
    case("make-random: unknown feature compression", "make-random {tmp}/m --feature-compression maybe", 2,
         r"argument --feature-compression: invalid choice: 'maybe'", ("{tmp}/m",)),
    case("make-random: seed negative", "make-random {tmp}/m --seed -1", 1, r"seed must be an integer >= 0, got -1",
         ("{tmp}/m",)),
    case("make-random: out exists, no --force", "make-random {model}", 1,
         r"already exists \(choose another path, or pass --force to replace it\)"),
    case("make-random: out under a file", "make-random {tmp}/file/m", 1,
         r"cannot write .*/file/m: .*/file is a file, not a folder", setup=write("file", "x")),
    # --- export: the model directory
    case("export: model directory missing", "export {tmp}/nope {tmp}/b", 1, r"model directory not found: .*/nope", B),
    case("export: model directory is a file", "export {tmp}/file {tmp}/b", 1,
         r"model directory is not a directory: .*/file", B, setup=write("file", "x")),
    case("export: pickle weights only (.bin)", EXPORT_COPY, 1,
         r"text_encoder/model\.bin is a pickle checkpoint; only safetensors are loaded", B,
         setup=broken_model(rename(TE_WEIGHTS, "model.bin"))),
    case("export: component folder missing", EXPORT_COPY, 1, r"vqvae/ folder not found", B,
         setup=broken_model(remove("vqvae"))),
    case("export: text encoder projection_dim != pooled_projection_dim", EXPORT_COPY, 1,
         r"text_encoder/config\.json projection_dim 24 != transformer/config\.json pooled_projection_dim 32", B,
         setup=broken_model(edit_json("text_encoder/config.json", projection_dim=24)), process=True),
    case("export: VQ codebook != transformer codebook_size", EXPORT_COPY, 1,
         r"vqvae/config\.json num_vq_embeddings 128 != transformer/config\.json codebook_size 64", B,
         setup=broken_model(edit_json("vqvae/config.json", num_vq_embeddings=128))),
    case("export: mask token inside the codebook", EXPORT_COPY, 1,
         r"scheduler/scheduler_config\.json mask_token_id 50 is outside", B,
         setup=broken_model(edit_json("scheduler/scheduler_config.json", mask_token_id=50))),
    case("export: weights key missing", EXPORT_COPY, 1, r"1 missing \(e\.g\. mlm_layer\.conv2\.weight\)", B,
         setup=broken_model(drop_tensor(T_WEIGHTS, "mlm_layer.conv2.weight"))),
    case("export: truncated weights", EXPORT_COPY, 1, r"is truncated: .*fetch it again", B,
         setup=broken_model(lambda root: (root / T_WEIGHTS).write_bytes((root / T_WEIGHTS).read_bytes()[:-100]))),
    case("export: --text-encoder missing", f"{EXPORT} --text-encoder {{tmp}}/clip", 1,
         r"text encoder directory not found: .*/clip", B),
    # --- export: the options
    case("export: unknown precision", f"{EXPORT} --precision fp8", 1, r"unknown precision 'fp8'", B),
    case("export: unknown graph in a precision", f"{EXPORT} --precision unet=int8", 1,
         r"unknown precision key 'unet'", B),
    case("export: recipe file missing", f"{EXPORT} --precision {{tmp}}/recipe.json", 1,
         r"recipe file not found: .*/recipe\.json", B),
    case("export: recipe not JSON", f"{EXPORT} --precision {{tmp}}/recipe.json", 1,
         r"recipe .*/recipe\.json is not valid JSON", B, setup=write("recipe.json", "{int4")),
    case("export: --check-size not a size", f"{EXPORT} --check-size big", 1,
         r"size must be N or HxW in pixels, got 'big'", B),
    case("export: --check-size off the token grid", f"{EXPORT} --check-size 100", 1,
         r"height must be a positive multiple of 32, got 100", B),
    case("export: unknown format", f"{EXPORT} --format tflite", 2, r"argument --format: invalid choice: 'tflite'", B),
    case("export: a CoreML-only flag with onnx", f"{EXPORT} --sizes 512", 1, r"--sizes apply to --format coreml", B),
    case("export: --int4-* with coreml", f"{EXPORT} --format coreml --int4-block-size 64", 1,
         r"--int4-\* options apply to --format onnx", B),
    case("export: --no-tiled-decoder with coreml", f"{EXPORT} --format coreml --no-tiled-decoder", 1,
         r"--no-tiled-decoder applies to --format onnx", B),
    case("export: int4 block size not supported", f"{EXPORT} --precision int4 --int4-block-size 7", 1,
         r"block_size must be 16, 32, 64, 128 or 256, got 7", B),
    case("export: int4 accuracy level out of range", f"{EXPORT} --precision int4 --int4-accuracy-level 9", 1,
         r"accuracy_level must be 0-4, got 9", B),
    case("export: unknown int4 algorithm", f"{EXPORT} --int4-algorithm awq", 2,
         r"argument --int4-algorithm: invalid choice: 'awq'", B),
    case("export: coreml unknown precision", f"{EXPORT} --format coreml --precision fp8", 1,
         r"unknown CoreML precision 'fp8'", B),
    case("export: coreml unknown minimum target", f"{EXPORT} --format coreml --minimum-target iOS99", 1,
         r"unknown minimum target 'iOS99'", B),
    case("export: coreml transformer batch 3", f"{EXPORT} --format coreml --transformer-batch 3", 2,
         r"argument --transformer-batch: invalid choice: 3", B),
    case("export: out exists, no --force", EXPORT, 1, r"b already exists \(choose another path, or pass --force",
         setup=write("b/keep.txt", "mine")),
    case("export: out under a file", "export {model} {tmp}/file/b", 1,
         r"cannot write .*/file/b: .*/file is a file, not a folder", setup=write("file", "x")),
    # --- generate: the bundle
    case("generate: path missing", "generate {tmp}/nope p -o {tmp}/out.png", 1, r"model directory not found: .*nope",
         OUT),
    case("generate: prompt missing", "generate {bundle}", 2, r"the following arguments are required: prompt"),
    case("generate: bundle without manifest", GEN_COPY, 1,
         r"is not a bundle: no manifest\.json \(an export that did not finish\?\)", OUT,
         setup=broken_bundle(remove("manifest.json"))),
    case("generate: manifest not JSON", GEN_COPY, 1, r"manifest\.json is not valid JSON", OUT,
         setup=broken_bundle(lambda root: (root / "manifest.json").write_text("{"))),
    case("generate: manifest from a newer version", GEN_COPY, 1, r"bundle format version 2 is not supported", OUT,
         setup=broken_bundle(manifest(lambda m: m.update(format_version=2)))),
    case("generate: checksum mismatch", GEN_COPY, 1,
         r"checksum mismatch for transformer\.onnx: the file changed after export", OUT,
         setup=broken_bundle(flip_last_byte("transformer.onnx")), process=True),
    case("generate: manifest path leaving the bundle", GEN_COPY, 1,
         r"manifest path '\.\./outside\.onnx' points outside", OUT,
         setup=broken_bundle(manifest(outside_path))),
    case("generate: a CoreML bundle", GEN_COPY, 1, r"is a coreml bundle, which runs in an app", OUT,
         setup=broken_bundle(manifest(coreml_backend))),
    case("generate: --text-encoder with a bundle", f"{GEN} --text-encoder {{model}}", 1,
         r"--text-encoder applies to model directories", OUT),
    case("generate: unknown onnxruntime provider", f"{GEN} --provider NoSuchExecutionProvider", 1,
         r"provider\(s\) NoSuchExecutionProvider not available here", OUT),
    # --- generate: the options
    case("generate: steps 0", f"{GEN} --steps 0", 1, r"steps must be an integer >= 1, got 0", OUT),
    case("generate: steps not an integer", f"{GEN} --steps x", 2, r"argument --steps: expected an integer, got 'x'",
         OUT),
    case("generate: height off the token grid", f"{GEN} --height 100", 1,
         r"height must be a positive multiple of 32, got 100", OUT),
    case("generate: guidance scale negative", f"{GEN} --guidance-scale -1", 1, r"guidance scale must be >= 0", OUT),
    case("generate: guidance scale not a number", f"{GEN} --guidance-scale high", 2,
         r"argument --guidance-scale: expected a number, got 'high'", OUT),
    case("generate: seed negative", f"{GEN} --seed -1", 1, r"seed must be an integer >= 0, got -1", OUT),
    case("generate: token temperature 0", f"{GEN} --token-temperature 0", 1, r"token temperature must be > 0", OUT),
    case("generate: gumbel temperature negative", f"{GEN} --gumbel-temperature 1 -1", 1,
         r"temperature must be two numbers >= 0", OUT),
    case("generate: gumbel temperature one number", f"{GEN} --gumbel-temperature 1", 2,
         r"argument --gumbel-temperature: expected 2 arguments", OUT),
    case("generate: -o folder missing", "generate {bundle} p -o {tmp}/no/out.png", 1,
         r"cannot write .*/no/out\.png: folder .*/no does not exist", ("{tmp}/no",)),
    case("generate: -o under a file", "generate {bundle} p -o {tmp}/file/out.png", 1,
         r"cannot write .*/file/out\.png: .*/file is a file, not a folder", setup=write("file", "x")),
    case("generate: -o is a folder", "generate {bundle} p -o {tmp}", 1, r"cannot write .*: it is a directory"),
    case("generate: -o unknown image extension", "generate {bundle} p -o {tmp}/out.xyz", 1,
         r"cannot write .*/out\.xyz: unknown image extension '\.xyz' \(use \.png\)", ("{tmp}/out.xyz",)),
    case("generate: threads negative", f"{GEN} --threads -1", 1, r"threads must be an integer >= 1, got -1", OUT),
    # --- generate: editing
    case("edit: --image missing", f"{GEN} --image {{tmp}}/nope.png", 1, r"image not found: .*/nope\.png", OUT),
    case("edit: --image not an image", f"{GEN} --image {{tmp}}/text.png", 1,
         r"image .*/text\.png is not an image file Pillow can read", OUT, setup=edit_inputs),
    case("edit: --image truncated", f"{GEN} --image {{tmp}}/truncated.png", 1,
         r"image .*/truncated\.png cannot be read: ", OUT, setup=edit_inputs, process=True),
    case("edit: --image smaller than a token", f"{GEN} --image {{tmp}}/tiny.png", 1,
         r"image is 16x16; each side must be at least 32 pixels", OUT, setup=edit_inputs),
    case("edit: --image would be stretched", f"{GEN} --image {{tmp}}/stretched.png", 1,
         r"image is 100x64; fitting it to multiples of 32 pixels \(96x64\) would stretch it", OUT,
         setup=edit_inputs),
    case("edit: mask of another size", f"{EDIT} --mask {{tmp}}/small-mask.png", 1,
         r"mask is 32x32, the image 96x64: they must match", OUT, setup=edit_inputs),
    case("edit: all-black mask", f"{EDIT} --mask {{tmp}}/black.png", 1, r"mask is all black: nothing to repaint", OUT,
         setup=edit_inputs),
    case("edit: all-white mask", f"{EDIT} --mask {{tmp}}/white.png", 1, r"mask is all white: everything would be",
         OUT, setup=edit_inputs),
    case("edit: mask covering no token", f"{EDIT} --mask {{tmp}}/dot.png", 1, r"the mask's white area covers no token",
         OUT, setup=edit_inputs),
    case("edit: strength 0", f"{EDIT} --strength 0", 1, r"strength must be in \(0, 1\], got 0\.0", OUT,
         setup=edit_inputs),
    case("edit: --expand not a stride multiple", f"{EDIT} --expand 16,0,0,0", 1,
         r"expand left must be a multiple of the token stride 32 pixels, >= 0; got 16", OUT, setup=edit_inputs),
    case("edit: --expand negative", [*EDIT.split(), "--expand=0,-32,0,0"], 1,
         r"expand top must be a multiple of the token stride 32 pixels, >= 0; got -32", OUT, setup=edit_inputs),
    case("edit: --expand malformed", f"{EDIT} --expand 32,0", 1,
         r"--expand takes LEFT,TOP,RIGHT,BOTTOM pixels, four integers, got '32,0'", OUT, setup=edit_inputs),
    case("edit: --expand adds nothing", f"{EDIT} --expand 0,0,0,0", 1, r"expand adds nothing", OUT,
         setup=edit_inputs),
    case("edit: --mask with --expand", f"{EDIT} --mask {{tmp}}/mask.png --expand 32,0,0,0", 1,
         r"a mask and an expansion do not go together", OUT, setup=edit_inputs),
    case("edit: --strength without --image", f"{GEN} --strength 0.5", 1,
         r"strength applies to editing.*--image", OUT),
    case("edit: --mask without --image", f"{GEN} --mask {{tmp}}/mask.png", 1,
         r"mask.*--image", OUT, setup=edit_inputs),
    case("edit: --expand without --image", f"{GEN} --expand 32,0,0,0", 1,
         r"expan.*--image", OUT),
    case("edit: --height with --image", f"{EDIT} --height 64", 1,
         r"an edit's size is its image's: .*height", OUT, setup=edit_inputs),
    case("edit: a bundle without vq_encoder", f"{GEN_COPY} --image {{tmp}}/image.png", 1,
         r"has no vq_encoder graph, which editing needs: re-export the bundle", OUT,
         setup=both(edit_inputs, broken_bundle(manifest(without_encoder)))),
    # --- verify
    case("verify: bundle missing", "verify {tmp}/nope", 1, r"bundle not found: .*/nope"),
    case("verify: a file missing", "verify {tmp}/bundle", 1, r"bundle file missing: vq_encoder\.onnx",
         setup=broken_bundle(remove("vq_encoder.onnx"))),
    case("verify: --model of another model", "verify {bundle} --model {flat} --quiet", 1,
         r"does not match the PyTorch reference", runs_models=True),
    case("verify: --model with a CoreML bundle", "verify {tmp}/bundle --model {model}", 1,
         r"a CoreML bundle's fidelity was checked at export", setup=broken_bundle(manifest(coreml_backend))),
    # --- bench
    case("bench: model directory missing", "bench {tmp}/nope {tmp}/bench", 1, r"model directory not found", BENCH_OUT),
    case("bench: a variant listed twice", f"{BENCH} --variants fp16 fp16", 1, r"variant 'fp16' is listed twice",
         BENCH_OUT),
    case("bench: two variants, one folder name", f"{BENCH} --variants transformer=int4 transformer-int4", 1,
         r"variants 'transformer=int4' and 'transformer-int4' would share the folder name", BENCH_OUT),
    case("bench: unknown precision", f"{BENCH} --variants fp8 --sizes 64", 1, r"unknown precision 'fp8'", BENCH_OUT),
    case("bench: size off the token grid", f"{BENCH} --sizes 100", 1,
         r"size 100 is not a positive multiple of the model's token stride \(32 px\)", BENCH_OUT),
    case("bench: steps 0", f"{BENCH} --steps 0", 1, r"steps must be an integer >= 1, got 0", BENCH_OUT),
    case("bench: repeats 0", f"{BENCH} --repeats 0", 1, r"repeats must be an integer >= 1, got 0", BENCH_OUT),
    case("bench: threads 0", f"{BENCH} --threads 0", 1, r"threads must be an integer >= 1, got 0", BENCH_OUT),
    case("bench: out is a file", BENCH, 1, r"cannot write the report to .*/bench: it is a file",
         setup=write("bench", "x")),
    # --- quant-sensitivity
    case("sensitivity: --out not .json", "quant-sensitivity {model} --out {tmp}/recipe.txt", 1,
         r"the recipe must be a \.json file", ("{tmp}/recipe.txt",)),
    case("sensitivity: --out folder missing", "quant-sensitivity {model} --out {tmp}/no/recipe.json", 1,
         r"cannot write .*/no/recipe\.json: folder .*/no does not exist", ("{tmp}/no",)),
    case("sensitivity: --out under a file", "quant-sensitivity {model} --out {tmp}/file/recipe.json", 1,
         r"cannot write .*/file/recipe\.json: .*/file is a file, not a folder", setup=write("file", "x")),
    case("sensitivity: --out missing", "quant-sensitivity {model}", 2, r"the following arguments are required: --out"),
    case("sensitivity: budget 0 MB", f"{SENS} --budget-mb 0", 1, r"budget must be a positive number of MB, got 0",
         RECIPE),
    case("sensitivity: budget below all-int4", f"{SENS} --budget-ratio 0.01", 1,
         r"is below this transformer's all-int4 size", RECIPE),
    case("sensitivity: --budget-mb with --budget-ratio", f"{SENS} --budget-mb 1 --budget-ratio 0.3", 2,
         r"argument --budget-ratio: not allowed with argument --budget-mb", RECIPE),
    case("sensitivity: block size not supported", f"{SENS} --block-size 7", 1, r"block size must be one of .*got 7",
         RECIPE),
    case("sensitivity: size off the token grid", f"{SENS} --size 100", 1,
         r"size must be a positive multiple of 32 \(this model's token stride\), got 100", RECIPE),
    case("sensitivity: steps 0", f"{SENS} --steps 0", 1, r"steps must be an integer >= 1, got 0", RECIPE),
    # --- demo
    case("demo: steps 0", "demo --output {tmp}/demo --steps 0", 1, r"--steps must be >= 1, got 0", ("{tmp}/demo",)),
    case("demo: unknown precision", "demo --output {tmp}/demo --precision fp8", 1, r"unknown precision 'fp8'",
         ("{tmp}/demo",)),
]
# fmt: on


def params() -> list:
    return [pytest.param(c, id=c.id) for c in CASES]


def test_the_table_is_distinct():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({c.argv for c in CASES if c.setup is None}) == len([c for c in CASES if c.setup is None])
    assert len(CASES) >= 40


# ----------------------------------------------------------------------------------------------- running a case


def fill(text: str, tmp: Path, sources: Sources) -> str:
    names = {"tmp": str(tmp)}
    for name, fixture in (("model", "tiny_model_dir"), ("flat", "tiny_flat_model_dir"), ("bundle", "tiny_bundle")):
        if "{" + name + "}" in text:
            names[name] = str(sources.get(fixture))
    return text.format(**names)


def snapshot(roots: list[Path]) -> dict:
    """Every path under `roots`, with size and modification time for files: what a run must leave as it was."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            seen[path] = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else "folder"
    return seen


def run_in_process(argv: list[str], capsys, monkeypatch, tripwires: bool) -> tuple[int, str]:
    if tripwires:
        for target in HEAVY_WORK:

            def tripwire(*args, target=target, **kwargs):
                raise LateRefusal(f"reached {target} before refusing the input")

            monkeypatch.setattr(target, tripwire)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    except LateRefusal as e:
        pytest.fail(f"not refused before the heavy work: {e}")
    return code, capsys.readouterr().err


def run_in_a_process(argv: list[str], cwd: Path) -> tuple[int, str]:
    result = subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)
    return result.returncode, result.stderr


@pytest.mark.parametrize("c", params())
def test_bad_input_is_refused_in_one_line(c: Case, request, tmp_path, capsys, monkeypatch):
    sources = Sources(request)
    monkeypatch.chdir(tmp_path)  # default outputs (out.png, demo-output) land here, where they are looked for
    if c.setup:
        c.setup(tmp_path, sources)
    argv = [fill(a, tmp_path, sources) for a in c.argv]
    before = snapshot([tmp_path, *sources.used])
    if c.process:
        code, err = run_in_a_process(argv, tmp_path)
    else:
        code, err = run_in_process(argv, capsys, monkeypatch, tripwires=not c.runs_models)
    print(f"{c.id}: exit {code}: {err.strip()}")  # the table's messages, for the README and the issue

    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0] != "error: ", err
    assert re.search(c.message, lines[0].removeprefix("error: ")), lines[0]
    assert code == c.code, err
    for path in c.absent:
        assert not Path(fill(path, tmp_path, sources)).exists(), path
    assert snapshot([tmp_path, *sources.used]) == before  # nothing written, moved or left half-done


# ----------------------------------------------------------------------------------------------- an interrupted export


def test_an_interrupted_export_leaves_nothing(tiny_model_dir, tmp_path):
    """SIGINT (Ctrl-C) half-way through an export: exit 130, one line, and nothing that looks like a bundle."""
    out = tmp_path / "bundle"
    export = subprocess.Popen(
        [*CLI, "export", str(tiny_model_dir), str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(p.suffix == ".onnx" for p in tmp_path.glob(".bundle.*.partial/*")):  # a graph written
            assert export.poll() is None, f"the export ended before it was under way: {export.communicate()}"
            assert time.monotonic() < deadline, "the export did not start writing graphs"
            time.sleep(0.02)
        export.send_signal(signal.SIGINT)
        _, err = export.communicate(timeout=120)
    finally:
        if export.poll() is None:
            export.kill()
            export.communicate()
    print(f"interrupted export: exit {export.returncode}: {err.strip()}")
    assert export.returncode == 130, err
    assert err.splitlines() == ["error: interrupted"], err
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.*")), list(tmp_path.iterdir())
    assert not list(tmp_path.rglob("manifest.json"))
