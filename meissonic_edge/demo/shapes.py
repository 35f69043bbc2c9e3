"""The procedural dataset of the demo model: one simple shape on a plain background, and its caption.

    a red circle at the top left on a white background
    a blue triangle in the center on a gray background

numpy and Pillow only, so the runtime-side evaluator (`adherence.py`) can draw ground truth too. Some
colour/shape pairs are never drawn for training (`HELD_OUT_PAIRS`): prompting for them tests whether the
model composes attributes rather than recalling pictures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from meissonic_edge.errors import OptionsError

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # shape colours, RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
POSITIONS = {  # where the shape's centre is, as fractions of (width, height)
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "square"), ("blue", "circle")})  # (colour, shape)

RADIUS_RANGE = (0.15, 0.2)  # a shape's size: radius of its circle of equal height, fraction of the side
JITTER = 0.03  # largest shift of the centre from its position's anchor, fraction of the side
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then reduced: smooth edges


@dataclass(frozen=True)
class Scene:
    """What one image shows. `radius` and `offset` are fractions of the image side."""

    shape: str
    colour: str
    position: str
    background: str
    radius: float = 0.16
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        for name, allowed in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("position", POSITIONS),
            ("background", BACKGROUNDS),
        ):
            if getattr(self, name) not in allowed:
                raise OptionsError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.colour} {self.shape} {where} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS

    def centre(self, size: int) -> tuple[float, float]:
        """The shape's centre in pixels (x, y) for a square image of side `size`."""
        ax, ay = POSITIONS[self.position]
        return (ax + self.offset[0]) * size, (ay + self.offset[1]) * size


_PROMPT = re.compile(
    r"^a (?P<colour>\w+) (?P<shape>\w+) (?:at the (?P<position>top left|top right|bottom left|bottom right)|"
    r"in the (?P<center>center))(?: on a (?P<background>\w+) background)?$"
)


def parse_prompt(prompt: str) -> Scene:
    """The scene a caption asks for; raises OptionsError for text outside the dataset's grammar.

    The background is optional in a prompt ("a red circle at the top left"): white is assumed.
    """
    match = _PROMPT.match(" ".join(prompt.lower().split()))
    if match is None:
        raise OptionsError(
            f"prompt {prompt!r} is not of the form 'a <colour> <shape> at the <position> on a <background> background'"
        )
    return Scene(
        shape=match["shape"],
        colour=match["colour"],
        position=match["position"] or "center",
        background=match["background"] or "white",
    )


def draw(scene: Scene, size: int = 256) -> np.ndarray:
    """Render `scene` as a (size, size, 3) uint8 RGB array."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    cx, cy = (c * SUPERSAMPLE for c in scene.centre(size))
    r = scene.radius * big
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        half = 0.9 * r
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:  # an upright equilateral triangle whose centroid is the centre
        R = 1.2 * r  # circumradius
        pen.polygon([(cx, cy - R), (cx + 0.866 * R, cy + R / 2), (cx - 0.866 * R, cy + R / 2)], fill=fill)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def random_scene(rng: np.random.Generator, include_held_out: bool = False) -> Scene:
    """A uniformly drawn scene (size and jitter included); held-out colour/shape pairs only if asked."""
    while True:
        scene = Scene(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            position=list(POSITIONS)[rng.integers(len(POSITIONS))],
            background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
            radius=float(rng.uniform(*RADIUS_RANGE)),
            offset=(float(rng.uniform(-JITTER, JITTER)), float(rng.uniform(-JITTER, JITTER))),
        )
        if include_held_out or not scene.held_out:
            return scene


def evaluation_scenes(held_out: bool = True) -> list[Scene]:
    """The fixed prompt set of the adherence score, in a fixed order.

    held_out=True: every held-out colour/shape pair at every position on every background (45 prompts,
    none of them a combination seen in training). held_out=False: the same positions and backgrounds for
    three trained pairs, for comparison.
    """
    pairs = sorted(HELD_OUT_PAIRS) if held_out else [("yellow", "circle"), ("purple", "square"), ("orange", "triangle")]
    return [
        Scene(shape=shape, colour=colour, position=position, background=background)
        for colour, shape in pairs
        for position in POSITIONS
        for background in BACKGROUNDS
    ]
