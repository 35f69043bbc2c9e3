"""`meissonic-edge demo`: the shipped shapes model, exported to a bundle, generating a few images.

The model (`meissonic_edge/demo_model/`, trained by `train-demo`) is a small Meissonic in the upstream
layout: a 256x256 text-to-image model of one coloured shape on a plain background. The demo exports it
with the same exporter and parity checks as any model (int8 by default), runs the bundle with the
onnxruntime runtime, judges each image with the adherence evaluator, and writes the images and a contact
sheet. Half of the default prompts ask for colour/shape pairs the model never saw together in training.
The sheet's last row is an inpainting and an outpainting of drawn scenes (`demo_edits.py`), judged and
measured the same way; their inputs are written to `edit-inputs/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from meissonic_edge.errors import ModelDirError, OptionsError
from meissonic_edge.runtime.imaging import save_image

logger = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).parents[1] / "demo_model"
DEMO_PROMPTS = (
    "a red triangle at the top left on a white background",  # held out: never a red triangle in training
    "a blue circle in the center on a gray background",  # held out
    "a green square at the bottom right on a black background",  # held out
    "a red triangle at the bottom left on a black background",  # held out
    "a yellow circle at the top right on a black background",
    "a purple square in the center on a white background",
    "a orange triangle at the bottom right on a gray background",
    "a blue square at the top left on a white background",
)
SHEET_COLUMNS = 4
CAPTION_HEIGHT = 40  # pixels under each image of the contact sheet: the prompt and the evaluator's verdict


@dataclass
class DemoResult:
    bundle: Path
    images: list[Path]
    contact_sheet: Path
    verdicts: list[bool | None]  # the adherence evaluator's judgement; None for prompts outside its grammar
    edits: list = field(default_factory=list)  # demo_edits.EditResult of the inpainting and outpainting examples


def demo_model_dir() -> Path:
    if not (DEMO_MODEL / "transformer" / "config.json").is_file():
        raise ModelDirError(
            f"the demo model is missing from {DEMO_MODEL} (a source checkout without it: "
            "train it with `meissonic-edge train-demo meissonic_edge/demo_model`)"
        )
    return DEMO_MODEL


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model directory's files (names and contents): a bundle made from it can be reused."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(model_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def demo_bundle(output: Path, precision: str, progress: bool = True) -> Path:
    """The demo model's bundle under `output`, exported now unless one from the same model is there."""
    from meissonic_edge.export.to_onnx import export_onnx

    model_dir = demo_model_dir()
    bundle = output / f"bundle-{precision}"
    stamp = output / f"bundle-{precision}.source.json"
    fingerprint = model_fingerprint(model_dir)
    if (bundle / "manifest.json").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()).get("model_sha256") == fingerprint:
            logger.info("reusing the bundle at %s", bundle)
            return bundle
    logger.info("exporting the demo model to %s (%s)", bundle, precision)
    export_onnx(model_dir, bundle, precision=precision, overwrite=True, progress=progress)
    stamp.write_text(json.dumps({"model_sha256": fingerprint, "precision": precision}, indent=2) + "\n")
    return bundle


def contact_sheet(images: list[Image.Image], captions: list[str], verdicts: list[bool | str | None]) -> Image.Image:
    """Images in a grid, each with its prompt and the evaluator's verdict underneath (a string verdict is
    written as it is: the editing examples' inputs and measures)."""
    width, height = images[0].size
    columns = min(SHEET_COLUMNS, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + CAPTION_HEIGHT)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (image, caption, ok) in enumerate(zip(images, captions, verdicts, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (height + CAPTION_HEIGHT)
        sheet.paste(image, (x, y))
        cut = caption.find(" at the ") if " at the " in caption else caption.find(" in the ")
        lines = [caption[:cut], caption[cut + 1 :]] if cut > 0 else [caption]
        verdict = ok if isinstance(ok, str) else {True: "shows it", False: "MISSES it", None: "not judged"}[ok]
        lines[-1] = f"{lines[-1]}  [{verdict}]" if verdict else lines[-1]
        for j, line in enumerate(lines):
            colour = (200, 0, 0) if ok is False else (0, 0, 0)
            pen.text((x + 4, y + height + 3 + 17 * j), line, fill=colour, font=font)
    return sheet


def reference_adherence(model_dir: Path, held_out: bool = True, seed: int = 0, **overrides) -> tuple[float, list]:
    """The fp32 PyTorch pipeline's adherence score over the fixed prompt set (`shapes.evaluation_scenes`).

    The protocol of `bench --adherence shapes`: one image per prompt, every prompt with the same seed, the
    model's generation defaults unless `overrides` (steps=..., guidance_scale=...). Returns the score and
    the images.
    """
    from meissonic_edge.demo.adherence import adherence_score
    from meissonic_edge.demo.shapes import evaluation_scenes
    from meissonic_edge.model.reference import ReferencePipeline

    pipe = ReferencePipeline.from_model_dir(model_dir)
    scenes = evaluation_scenes(held_out)
    images = [pipe.generate(scene.caption, seed=seed, **overrides).images[0] for scene in scenes]
    return adherence_score(images, scenes), images


def run_demo(
    output: str | Path = "demo-output",
    precision: str = "int8",
    prompts: list[str] | None = None,
    seed: int = 0,
    steps: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> DemoResult:
    """Export the demo model (or reuse its bundle), generate one image per prompt, write them and a sheet."""
    from meissonic_edge.demo.adherence import judge
    from meissonic_edge.demo.edits import edit_examples, run_edit
    from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline

    output = Path(output)
    prompts = list(prompts or DEMO_PROMPTS)
    bundle = demo_bundle(output, precision, progress)
    pipe = OnnxPipeline(bundle, threads=threads)
    overrides = {} if steps is None else {"steps": steps}
    images_dir = output / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, paths, verdicts = [], [], []
    for i, prompt in enumerate(prompts):
        image = pipe.generate(prompt, seed=seed + i, progress=progress, **overrides).images[0]
        name = f"{i:02d}-" + "-".join(prompt.lower().split())[:80] + ".png"
        paths.append(save_image(image, images_dir / name))
        images.append(image)
        try:
            verdicts.append(judge(image, prompt).satisfied)
        except OptionsError:  # a prompt outside the shapes grammar: nothing to judge it by
            verdicts.append(None)
    edits = []
    tiles, captions, notes = list(images), list(prompts), list(verdicts)
    inputs_dir = output / "edit-inputs"  # the examples' inputs, for trying `generate --image` on them
    inputs_dir.mkdir(exist_ok=True)
    for k, example in enumerate(edit_examples()):
        save_image(example.image, inputs_dir / f"{example.name}-image.png")
        if example.mask is not None:
            save_image(example.mask, inputs_dir / f"{example.name}-mask.png")
        result = run_edit(pipe, example, seed=seed + len(prompts) + k, progress=progress, **overrides)
        paths.append(save_image(result.image, images_dir / f"edit-{example.name}.png"))
        edits.append(result)
        kept = f"{result.preserved_psnr_db:.1f} dB kept"
        tiles += [example.preview(), result.image]
        captions += [f"{example.name} input (hatched: repainted)", f"{example.name} ({kept}): {example.prompt}"]
        notes += ["", result.satisfied]
    sheet = save_image(contact_sheet(tiles, captions, notes), output / "contact_sheet.png")
    return DemoResult(bundle=bundle, images=paths, contact_sheet=sheet, verdicts=verdicts, edits=edits)
