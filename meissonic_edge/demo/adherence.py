"""Prompt adherence of the demo model, judged from the pixels: did the image draw the asked shape, colour and place?

Images are those of `shapes.py` (one shape on a plain background), but as a small generator draws them:
blurry or blocky edges, shifted colours, noise, stray specks, now and then a second small blob. So:

- background: the median colour of the image's border, named after the nearest `BACKGROUNDS` entry;
- the shape: pixels far from that colour, opened (specks go) and cut to the largest 8-connected region;
  then, given the region's median colour, the pixels nearer to it than to the background (the half-way
  contour of an anti-aliased or blurred edge), again the largest region, holes filled;
- colour: the nearest `COLOURS` entry to the median of the region's interior, in CIELAB with lightness
  at half weight (a generator's colours drift in brightness, or towards the background, more than in hue);
- position: the nearest `POSITIONS` anchor to the region's centroid (fractions of width and height);
- shape: from the region's geometry. A triangle is narrow at the top (mean width of the top third of
  its bounding box over that of the bottom third: 0.2; circle and square 1.0); a square fills its
  bounding box (1.0), a circle pi/4 of it.

How well the outline is drawn is measured apart from the verdict: `outline_iou` is the intersection over
union of the region with each dataset shape's ideal outline of the same area, centred on the region's
centroid (a circle, an axis-aligned square, an upright equilateral triangle, as `shapes.draw` draws them).
Ground truth scores about 0.99 for its own shape; a circle drawn as a bumpy polygon or a square with
rounded corners scores lower, though the verdict may still accept it.

`judge` compares that with a prompt; `adherence_score` is the share of prompts an image set satisfies,
`outline_score` the mean outline IoU with the prompted shapes.
numpy, Pillow and scipy (imported when an image is examined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from meissonic_edge.demo.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene, parse_prompt
from meissonic_edge.errors import OptionsError

MIN_SIDE = 64  # smallest image side examined, pixels
BORDER = 1 / 32  # width of the border strip the background colour is taken from, fraction of the side
FOREGROUND_DISTANCE = 45.0  # RGB distance from the background that counts as foreground: about half the
# closest shape/background pair (purple on gray, 93), far above noise of sigma 10 (|n| ~ 17)
SHAPE_COLOUR_REACH = 0.6  # a shape pixel lies within this share of the shape/background distance of the
# shape's colour (and nearer to it than to the background): drops specks of other colours touching it
MIN_AREA_SHARE = 0.01  # smallest region taken for a shape, fraction of the image: a quarter of the
# smallest shape of the dataset (a triangle of radius 0.15, 0.042)
INTERIOR_EROSION = 2  # pixels peeled off the region before its colour is measured (anti-aliased edges)
TRIANGLE_MAX_TAPER = 0.6  # top-third / bottom-third mean width below which a region is a triangle (ideal
# 0.2; circle and square 1.0)
TRIANGLE_MAX_FILL = 0.75  # ... and its area / bounding box stays below this (ideal 0.5; blurred corners
# and 64-pixel images measure up to 0.68)
SQUARE_MIN_FILL = 0.88  # area / bounding box above which an untapered region is a square (ideal 1.0, the
# circle's pi/4 = 0.785; measured: circles <= 0.84, squares >= 0.9 under noise, blur and specks)
CIRCLE_MIN_FILL = 0.65  # ... and above which it is a circle; below it, no shape of the dataset
OUTLINE_SUPERSAMPLE = 4  # ideal outlines are drawn this many times larger, then reduced (as shapes.draw does)
LIGHTNESS_WEIGHT = 0.5  # weight of CIELAB's L against a and b when naming a colour


@dataclass(frozen=True)
class Detection:
    """What one image shows. `shape`, `colour` and `position` are None when no shape region was found;
    `shape` is also None for a region of no dataset shape's geometry.

    The measured numbers are for reports and debugging: `area_share` is the largest region's share of the
    image (0 when none), `fill_ratio` its area over its bounding box's, `taper` the mean width of the top
    third of that box over the bottom third's, `centroid` (x, y) fractions of width and height, `rgb`
    the region's median colour.
    """

    shape: str | None
    colour: str | None
    position: str | None
    background: str
    area_share: float
    fill_ratio: float | None = None
    taper: float | None = None
    centroid: tuple[float, float] | None = None
    rgb: tuple[int, int, int] | None = None
    outline_iou: dict[str, float] | None = None

    @property
    def found(self) -> bool:
        return self.colour is not None


@dataclass(frozen=True)
class Judgement:
    """Whether an image shows what a prompt asked: shape, colour and position (the background is not judged)."""

    prompt: Scene
    detection: Detection
    mismatches: tuple[str, ...]  # the asked attributes the image gets wrong, of "shape", "colour", "position"

    @property
    def satisfied(self) -> bool:
        return not self.mismatches

    @property
    def outline_iou(self) -> float:
        """The region's IoU with the prompted shape's ideal outline; 0 when no region was found."""
        return self.detection.outline_iou[self.prompt.shape] if self.detection.outline_iou else 0.0


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Find the shape in `image` (a PIL image or an (H, W, 3) uint8 RGB array) and name its attributes."""
    from scipy import ndimage

    pixels = _rgb_array(image).astype(np.float32)
    height, width, _ = pixels.shape
    strip = max(1, round(min(height, width) * BORDER))
    border = np.concatenate(
        [pixels[:strip].reshape(-1, 3), pixels[-strip:].reshape(-1, 3)]
        + [pixels[strip:-strip, :strip].reshape(-1, 3), pixels[strip:-strip, -strip:].reshape(-1, 3)]
    )
    ground = np.median(border, axis=0)
    background = _nearest(ground, BACKGROUNDS)
    to_ground = np.linalg.norm(pixels - ground, axis=-1)

    region = _largest_region(to_ground > FOREGROUND_DISTANCE)
    share = 0.0 if region is None else float(region.mean())
    if region is None or share < MIN_AREA_SHARE:
        return Detection(shape=None, colour=None, position=None, background=background, area_share=share)

    interior = ndimage.binary_erosion(region, iterations=INTERIOR_EROSION)
    colour_rgb = np.median(pixels[interior if interior.any() else region], axis=0)
    to_colour = np.linalg.norm(pixels - colour_rgb, axis=-1)
    reach = SHAPE_COLOUR_REACH * float(np.linalg.norm(colour_rgb - ground))
    refined = _largest_region((to_colour < to_ground) & (to_colour < reach))
    if refined is not None and refined.mean() >= MIN_AREA_SHARE:
        region = refined
    share = float(region.mean())

    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = len(ys) / ((y1 - y0) * (x1 - x0))
    widths = region[y0:y1, x0:x1].sum(axis=1)
    third = max(1, (y1 - y0) // 3)
    taper = float(widths[:third].mean() / max(widths[-third:].mean(), 1.0))
    centroid = (float(xs.mean() + 0.5) / width, float(ys.mean() + 0.5) / height)
    return Detection(
        shape=_shape(fill, taper),
        colour=_nearest(_lab(colour_rgb), {name: _lab(rgb) for name, rgb in COLOURS.items()}),
        position=_nearest(np.array(centroid), POSITIONS),
        background=background,
        area_share=share,
        fill_ratio=float(fill),
        taper=taper,
        centroid=centroid,
        rgb=tuple(int(round(c)) for c in colour_rgb),
        outline_iou={
            shape: _iou(region, _ideal_outline(shape, len(ys), xs.mean(), ys.mean(), (height, width)))
            for shape in SHAPES
        },
    )


def judge(image: Image.Image | np.ndarray, prompt: str | Scene) -> Judgement:
    """Whether `image` shows the shape, colour and position `prompt` asks for (a caption or a Scene)."""
    scene = prompt if isinstance(prompt, Scene) else parse_prompt(prompt)
    detection = detect(image)
    mismatches = tuple(
        name for name in ("shape", "colour", "position") if getattr(detection, name) != getattr(scene, name)
    )
    return Judgement(prompt=scene, detection=detection, mismatches=mismatches)


def adherence_score(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str | Scene]) -> float:
    """Share of the prompts, in [0, 1], whose image (same order) satisfies them."""
    judgements = _judgements(images, prompts, "adherence")
    return sum(j.satisfied for j in judgements) / len(judgements)


def outline_score(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str | Scene]) -> float:
    """Mean outline IoU, in [0, 1], of the images (same order) with their prompts' shapes (0 for no shape)."""
    return float(np.mean([j.outline_iou for j in _judgements(images, prompts, "outline score")]))


def _judgements(images, prompts, what: str) -> list[Judgement]:
    """Each image (same order as `prompts`) judged against its prompt; `what` names the score in the error."""
    images, prompts = list(images), list(prompts)
    if not images or len(images) != len(prompts):
        raise OptionsError(f"{what} needs one image per prompt, got {len(images)} images for {len(prompts)} prompts")
    return [judge(image, prompt) for image, prompt in zip(images, prompts, strict=True)]


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        kind = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise OptionsError(f"an image must be a PIL image or an (H, W, 3) uint8 RGB array, got a {kind}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise OptionsError(
            f"an image must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {image.shape[1]}x{image.shape[0]}"
        )
    return image


def _largest_region(mask: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected region of `mask` after a 3x3 opening, its holes filled; None if empty."""
    from scipy import ndimage

    square = np.ones((3, 3), dtype=bool)
    labels, count = ndimage.label(ndimage.binary_opening(mask, structure=square), structure=square)
    if count == 0:
        return None
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.binary_fill_holes(labels == largest)


def _ideal_outline(shape: str, area: int, cx: float, cy: float, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask of `shape` with `area` pixels, centred (its centroid) on pixel (cx, cy), drawn
    OUTLINE_SUPERSAMPLE times larger and reduced, as `shapes.draw` does."""
    from PIL import ImageDraw

    height, width = size
    scale = OUTLINE_SUPERSAMPLE
    canvas = Image.new("L", (width * scale, height * scale), 0)
    pen = ImageDraw.Draw(canvas)
    x, y = (cx + 0.5) * scale, (cy + 0.5) * scale
    if shape == "circle":
        r = math.sqrt(area / math.pi) * scale
        pen.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "square":
        half = math.sqrt(area) / 2 * scale
        pen.rectangle((x - half, y - half, x + half, y + half), fill=255)
    else:  # upright equilateral triangle: area = 3 sqrt(3) / 4 R^2, R its circumradius
        R = math.sqrt(area * 4 / (3 * math.sqrt(3))) * scale
        pen.polygon(
            [(x, y - R), (x + math.sqrt(3) / 2 * R, y + R / 2), (x - math.sqrt(3) / 2 * R, y + R / 2)], fill=255
        )
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX)) >= 128


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _shape(fill: float, taper: float) -> str | None:
    if taper < TRIANGLE_MAX_TAPER and fill < TRIANGLE_MAX_FILL:
        return "triangle"
    if taper >= TRIANGLE_MAX_TAPER and fill >= SQUARE_MIN_FILL:
        return "square"
    if taper >= TRIANGLE_MAX_TAPER and fill >= CIRCLE_MIN_FILL:
        return "circle"
    return None


def _nearest(value: np.ndarray, table: dict) -> str:
    """The name in `table` whose vector is nearest (Euclidean) to `value`."""
    return min(table, key=lambda name: float(np.linalg.norm(value - np.asarray(table[name], dtype=np.float32))))


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255) -> CIELAB (D65 white), L scaled by LIGHTNESS_WEIGHT."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([LIGHTNESS_WEIGHT * (116 * f[1] - 16), 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
