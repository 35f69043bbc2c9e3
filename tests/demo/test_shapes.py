"""The procedural shapes dataset: captions, the prompt grammar, drawing, and the held-out split."""

import numpy as np
import pytest

from meissonic_edge.demo.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    Scene,
    draw,
    evaluation_scenes,
    parse_prompt,
    random_scene,
)
from meissonic_edge.errors import OptionsError


def test_captions_parse_back_to_their_scene():
    for shape in SHAPES:
        for colour in COLOURS:
            for position in POSITIONS:
                for background in BACKGROUNDS:
                    scene = Scene(shape=shape, colour=colour, position=position, background=background)
                    assert parse_prompt(scene.caption) == scene
    assert Scene("circle", "red", "top left", "white").caption == "a red circle at the top left on a white background"
    assert Scene("square", "blue", "center", "gray").caption == "a blue square in the center on a gray background"


def test_prompts_outside_the_grammar_are_refused():
    assert parse_prompt("  A Red   Circle at the top left ").background == "white"  # background optional
    for prompt in ["a cat", "a red hexagon at the top left", "a red circle at the middle", ""]:
        with pytest.raises(OptionsError):
            parse_prompt(prompt)
    with pytest.raises(OptionsError, match="unknown colour"):
        Scene("circle", "pink", "center", "white")


def test_drawing_is_deterministic_and_puts_the_shape_where_asked():
    scene = Scene("square", "red", "bottom right", "black")
    a, b = draw(scene), draw(scene)
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    ys, xs = np.nonzero((a != 0).any(axis=-1))  # everything not black is the shape
    assert xs.mean() == pytest.approx(0.75 * 256, abs=2) and ys.mean() == pytest.approx(0.75 * 256, abs=2)
    assert tuple(a[192, 192]) == COLOURS["red"]


def test_training_scenes_never_show_a_held_out_pair():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    assert not any(scene.held_out for scene in scenes)
    seen = {(s.colour, s.shape) for s in scenes}
    assert len(seen) == len(COLOURS) * len(SHAPES) - len(HELD_OUT_PAIRS)  # every other pair is there
    with_held_out = [random_scene(rng, include_held_out=True) for _ in range(2000)]
    assert any(scene.held_out for scene in with_held_out)


def test_the_evaluation_set_is_fixed_and_held_out():
    scenes = evaluation_scenes()
    assert len(scenes) == len(HELD_OUT_PAIRS) * len(POSITIONS) * len(BACKGROUNDS) == 45
    assert all(scene.held_out for scene in scenes) and scenes == evaluation_scenes()
    assert not any(scene.held_out for scene in evaluation_scenes(held_out=False))
