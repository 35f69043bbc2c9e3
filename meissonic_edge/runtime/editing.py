"""Image editing inputs: img2img, inpainting and outpainting, turned into what the sampler starts from.

numpy and Pillow only: the torch-free runtime and the PyTorch reference share it, so both prepare an edit
the same way. An edit is planned from the user's image (and mask, or expansion) before any model runs:

- **size**: the image's own. Sides that are not multiples of the token stride (16 pixels, 32 with feature
  compression) are rounded down and the image resized to them with Lanczos, as upstream's image processor
  does; when that would stretch one side more than the other by over `MAX_STRETCH`, the image is refused
  instead (crop or pad it first).
- **img2img** (an image alone): the VQ encoder's tokens of the image; the sampler masks some at random.
- **inpainting** (image + mask of the same size): white pixels are repainted, black ones preserved
  (upstream's convention). The mask is reduced to the token grid as upstream does: grayscale, resized to
  the grid with Lanczos, then a token is repainted where the result is >= 0.5 (about half of its 16x16
  pixels white). Paint the mask generously: a cell less than half covered keeps the image's token.
- **outpainting** (image + expansion LEFT, TOP, RIGHT, BOTTOM in pixels, multiples of the stride): the
  canvas grows by that much on each side, its new area is repainted; the new pixels the encoder sees are
  the image's edge pixels repeated outwards (they are repainted anyway, and repeat the image's colours
  into the encoder's view of the border tokens rather than an arbitrary fill).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from meissonic_edge.errors import OptionsError
from meissonic_edge.runtime.config import VQ_STRIDE
from meissonic_edge.runtime.sampler import GenerationOptions

MAX_STRETCH = 0.02  # resizing to stride multiples may change the aspect ratio by at most 2%
MASK_THRESHOLD = 128  # a mask pixel is white (repaint) from this gray level on (upstream binarizes at 0.5)
INPAINT_SCHEDULE = "linear"  # upstream's inpaint pipeline switches its scheduler to the linear schedule


@dataclass(frozen=True)
class Edit:
    """A planned edit: the pixels to encode (1, 3, H, W) float32 in [0, 1], and the positions to repaint
    on the token grid (H/16, W/16), True = repaint, or None for img2img."""

    mode: str  # "img2img", "inpaint" or "outpaint"
    pixels: np.ndarray
    repaint: np.ndarray | None

    @property
    def height(self) -> int:
        return self.pixels.shape[2]

    @property
    def width(self) -> int:
        return self.pixels.shape[3]

    def schedule(self, model_schedule: str) -> str:
        """The masking schedule of its steps: upstream's inpaint pipeline uses the linear one."""
        return model_schedule if self.repaint is None else INPAINT_SCHEDULE


def open_image(source: str | Path | Image.Image, what: str = "image") -> Image.Image:
    """A PIL image from a path (or the image itself), fully read; a one-line OptionsError if it is not one."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if not path.is_file():
        raise OptionsError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # a truncated or corrupt file fails here, not later
            return image.copy()
    except UnidentifiedImageError:
        raise OptionsError(f"{what} {path} is not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise OptionsError(f"{what} {path} cannot be read: {str(e).splitlines()[0]}") from None


def parse_expand(text: str) -> tuple[int, int, int, int]:
    """'LEFT,TOP,RIGHT,BOTTOM' pixels -> a tuple of four ints."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise OptionsError(f"--expand takes LEFT,TOP,RIGHT,BOTTOM pixels, four integers, got {text!r}")
    return values


def plan_edit(
    image: str | Path | Image.Image,
    mask: str | Path | Image.Image | None = None,
    expand: tuple[int, int, int, int] | None = None,
    token_stride: int = VQ_STRIDE,
) -> Edit:
    """Check an edit's inputs and plan it (see the module's docstring); raise OptionsError naming the problem."""
    if mask is not None and expand is not None:
        raise OptionsError("a mask and an expansion do not go together: --mask inpaints, --expand outpaints")
    if expand is not None:
        check_expand(expand, token_stride)
    picture = open_image(image).convert("RGB")
    pixels = fit_to_stride(picture, token_stride)
    if expand is not None:
        return outpaint(pixels, expand)
    if mask is None:
        return Edit("img2img", to_model_pixels(pixels), None)
    return Edit("inpaint", to_model_pixels(pixels), repaint_grid(open_image(mask, "mask"), picture.size, pixels.size))


def check_expand(expand: tuple[int, int, int, int], token_stride: int) -> None:
    if len(expand) != 4:
        raise OptionsError(f"expand takes four sides (left, top, right, bottom), got {expand!r}")
    for side, value in zip(("left", "top", "right", "bottom"), expand, strict=True):
        if not isinstance(value, int) or value < 0 or value % token_stride:
            raise OptionsError(
                f"expand {side} must be a multiple of the token stride {token_stride} pixels, >= 0; got {value!r}"
            )
    if not any(expand):
        raise OptionsError("expand adds nothing (all four sides are 0): give at least one side in pixels")


def fit_to_stride(image: Image.Image, stride: int) -> Image.Image:
    """The image at the nearest stride multiples below its size (Lanczos), or an error if that stretches it."""
    width, height = image.size
    fitted = (width - width % stride, height - height % stride)
    if min(fitted) < stride:
        raise OptionsError(f"image is {width}x{height}; each side must be at least {stride} pixels")
    if fitted == (width, height):
        return image
    scale_x, scale_y = fitted[0] / width, fitted[1] / height
    stretch = max(scale_x, scale_y) / min(scale_x, scale_y) - 1
    if stretch > MAX_STRETCH:
        raise OptionsError(
            f"image is {width}x{height}; fitting it to multiples of {stride} pixels ({fitted[0]}x{fitted[1]}) "
            f"would stretch it by {stretch:.0%}: crop or pad it to multiples of {stride} first"
        )
    return image.resize(fitted, Image.Resampling.LANCZOS)


def to_model_pixels(image: Image.Image) -> np.ndarray:
    """RGB image -> (1, 3, H, W) float32 in [0, 1], the VQ encoder's input."""
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def repaint_grid(mask: Image.Image, image_size: tuple[int, int], fitted_size: tuple[int, int]) -> np.ndarray:
    """The mask reduced to the token grid of the fitted image: True where a token is repainted."""
    if mask.size != image_size:
        raise OptionsError(
            f"mask is {mask.size[0]}x{mask.size[1]}, the image {image_size[0]}x{image_size[1]}: they must match"
        )
    gray = mask.convert("L")
    white = np.asarray(gray) >= MASK_THRESHOLD
    if not white.any():
        raise OptionsError("mask is all black: nothing to repaint (white pixels are repainted, black kept)")
    if white.all():
        raise OptionsError("mask is all white: everything would be repainted; that is text-to-image (drop --image)")
    grid = (fitted_size[0] // VQ_STRIDE, fitted_size[1] // VQ_STRIDE)
    reduced = np.asarray(gray.resize(grid, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    repaint = reduced >= 0.5
    if not repaint.any():
        raise OptionsError(
            f"the mask's white area covers no token: paint at least half of a {VQ_STRIDE}x{VQ_STRIDE}-pixel cell"
        )
    if repaint.all():
        raise OptionsError(
            "the mask covers every token: everything would be repainted; that is text-to-image (drop --image)"
        )
    return repaint


def outpaint(image: Image.Image, expand: tuple[int, int, int, int]) -> Edit:
    """The image on a canvas grown by `expand` (left, top, right, bottom), its new area to repaint."""
    left, top, right, bottom = expand
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    height, width = pixels.shape[:2]
    repaint = np.ones((height // VQ_STRIDE, width // VQ_STRIDE), dtype=bool)
    repaint[top // VQ_STRIDE : (height - bottom) // VQ_STRIDE, left // VQ_STRIDE : (width - right) // VQ_STRIDE] = False
    return Edit("outpaint", to_model_pixels(Image.fromarray(pixels)), repaint)


def edit_options(
    options: GenerationOptions,
    overrides: dict,
    token_stride: int,
    image: str | Path | Image.Image | None = None,
    mask: str | Path | Image.Image | None = None,
    expand: tuple[int, int, int, int] | None = None,
) -> tuple[GenerationOptions, Edit | None]:
    """The options of one generation (`overrides` replacing fields of `options`) and its edit, if any, checked.

    An edit's size is its image's (plus the expansion): height and width come from there.
    """
    if image is None:
        if mask is not None or expand is not None:
            raise OptionsError("a mask or an expansion needs an image to edit (--image)")
        options = replace(options, **overrides)
        options.validate(token_stride)
        if options.strength != 1:
            raise OptionsError("strength applies to editing an image (--image); text-to-image runs every step")
        return options, None
    given = [name for name in ("height", "width") if name in overrides]
    if given:
        raise OptionsError(f"an edit's size is its image's: leave out {' and '.join(given)} or resize the image")
    edit = plan_edit(image, mask, expand, token_stride)
    options = replace(options, **overrides, height=edit.height, width=edit.width)
    options.validate(token_stride)
    return options, edit
