"""The demo's editing examples: an inpainting and an outpainting of drawn scenes, and how they are judged.

- **inpaint**: a yellow circle at the top right; the top-right quadrant is masked and the prompt asks for a
  red square there. The result is judged with the adherence evaluator against that prompt (the repainted
  quadrant is the only place a shape may be).
- **outpaint**: the left half of a red circle in the center, grown by 128 pixels on the right; the prompt is
  the whole scene's caption, so the model must complete the circle and the background in the new half. The
  evaluator judges the whole result (shape, colour, position, outline IoU of the completed circle).

Both also measure what must not change: the PSNR of the preserved region against the input, counted only
`DECODER_REACH_PX` or more from the repainted area (the VQ decoder spreads a token's change over its
neighbours), and the same region's PSNR of the input's own VQ round trip (encode, decode), the best any
edit can do there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from meissonic_edge.demo.shapes import Scene, draw

SIZE = 256  # the demo model's image size
# Changing one token of a 256x256 demo image moves decoded pixels by more than 1/255 up to 52-83 pixels from
# its cell (6 random tokens, demo model's fp32 VQ decoder); the preserved region is measured beyond that.
DECODER_REACH_PX = 96  # six token cells


@dataclass(frozen=True)
class EditExample:
    name: str
    prompt: str  # what the edit asks for, judged on its result
    image: Image.Image
    mask: Image.Image | None = None
    expand: tuple[int, int, int, int] | None = None

    def inputs(self) -> dict:
        """The pipelines' editing arguments."""
        return {"image": self.image, "mask": self.mask, "expand": self.expand}

    def repainted(self) -> np.ndarray:
        """(H, W) bool over the result: the pixels of the cells the edit repaints."""
        if self.mask is not None:
            white = np.asarray(self.mask.convert("L")) >= 128
            return white  # the example's mask is cell-aligned: its white pixels are exactly the repainted cells
        left, top, right, bottom = self.expand
        width, height = self.image.size
        area = np.ones((top + height + bottom, left + width + right), dtype=bool)
        area[top : top + height, left : left + width] = False
        return area

    def placed_input(self) -> np.ndarray:
        """The input's pixels where they lie in the result, (H, W, 3) uint8 (zeros where there is none)."""
        return self.place(np.asarray(self.image.convert("RGB")))

    def place(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels of the input's size, (h, w, 3) uint8, put where the input lies in the result."""
        if self.expand is None:
            return pixels
        left, top, right, bottom = self.expand
        canvas = np.zeros((top + pixels.shape[0] + bottom, left + pixels.shape[1] + right, 3), np.uint8)
        canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        return canvas

    def preserved(self) -> np.ndarray:
        """(H, W) bool: pixels from the input at least DECODER_REACH_PX from any repainted pixel."""
        from scipy import ndimage

        # a square dilation by the reach: a maximum filter of that size, which scipy runs axis by axis
        return ndimage.maximum_filter(self.repainted().astype(np.uint8), size=2 * DECODER_REACH_PX + 1) == 0

    def preview(self) -> Image.Image:
        """The input as the contact sheet shows it: repainted area hatched, on the result's canvas."""
        pixels = self.placed_input().copy()
        stripes = (np.add.outer(np.arange(pixels.shape[0]), np.arange(pixels.shape[1])) // 6) % 2 == 0
        hatch = self.repainted() & stripes
        pixels[hatch] = (pixels[hatch] // 2 + np.array([0, 128, 128], np.uint8) // 2).astype(np.uint8)
        pixels[self.repainted() & ~stripes] //= 2
        return Image.fromarray(pixels)


def edit_examples() -> list[EditExample]:
    """The inpainting and outpainting examples (see the module's docstring)."""
    inpaint_source = Scene("circle", "yellow", "top right", "black", radius=0.17)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[: SIZE // 2, SIZE // 2 :] = 255  # the top-right quadrant: 8 x 8 token cells
    outpaint_source = Scene("circle", "red", "center", "white", radius=0.18)
    half = Image.fromarray(draw(outpaint_source, SIZE)[:, : SIZE // 2])
    return [
        EditExample(
            "inpaint",
            "a red square at the top right on a black background",
            Image.fromarray(draw(inpaint_source, SIZE)),
            mask=Image.fromarray(mask),
        ),
        EditExample("outpaint", outpaint_source.caption, half, expand=(0, 0, SIZE // 2, 0)),
    ]


@dataclass(frozen=True)
class EditResult:
    name: str
    prompt: str
    image: Image.Image
    satisfied: bool  # the adherence evaluator's verdict on the result
    outline_iou: float
    preserved_psnr_db: float  # preserved region of the result against the input
    roundtrip_psnr_db: float  # the same region of the input's own VQ round trip against the input


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def run_edit(pipe, example: EditExample, seed: int, progress: bool = False, **overrides) -> EditResult:
    """Run one example with an OnnxPipeline (or the reference) and measure it."""
    from meissonic_edge.demo.adherence import judge
    from meissonic_edge.runtime.editing import to_model_pixels
    from meissonic_edge.runtime.imaging import to_pil

    result = pipe.generate(example.prompt, seed=seed, progress=progress, **example.inputs(), **overrides)
    image = result.images[0]
    verdict = judge(image, example.prompt)
    keep = example.preserved()
    source = example.placed_input()
    # the input's own VQ round trip (the input alone, for an outpainting), placed where the input lies
    roundtrip = example.place(
        np.asarray(to_pil(pipe.decode(pipe.encode(to_model_pixels(example.image.convert("RGB")))))[0])
    )
    return EditResult(
        name=example.name,
        prompt=example.prompt,
        image=image,
        satisfied=verdict.satisfied,
        outline_iou=verdict.outline_iou,
        preserved_psnr_db=psnr(np.asarray(image)[keep], source[keep]),
        roundtrip_psnr_db=psnr(roundtrip[keep], source[keep]),
    )
