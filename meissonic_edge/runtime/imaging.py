"""Turning decoded images (float, [0, 1], channels-first) into PIL images, and saving them safely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from meissonic_edge.errors import OptionsError
from meissonic_edge.fileio import check_file_path, write_atomic


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, 3, H, W) float in [0, 1] -> B RGB images; values are clipped and rounded as upstream does."""
    pixels = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return [Image.fromarray(p) for p in pixels]


def image_format(path: Path) -> str:
    """Pillow's format name for the file name's extension; OptionsError for one it cannot write."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise OptionsError(f"cannot write {path}: unknown image extension {path.suffix!r} (use .png)")
    return fmt


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write `image` to `path` atomically (temporary file in the same folder, then rename)."""
    path = check_file_path(path)
    fmt = image_format(path)
    return write_atomic(path, lambda f: image.save(f, format=fmt))
