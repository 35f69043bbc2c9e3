"""The adherence evaluator on ground truth drawn by `shapes.draw`: exact, perturbed as a generator would, and
against prompts that ask for something else."""

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw

from meissonic_edge.demo.adherence import Detection, adherence_score, detect, judge, outline_score
from meissonic_edge.demo.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, draw, evaluation_scenes, random_scene
from meissonic_edge.errors import OptionsError

N_SCENES = 200  # ground truth drawn exactly
N_PERTURBED = 100  # of those, how many are also perturbed, or prompted with a wrong attribute


@pytest.fixture(scope="module")
def ground_truth():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, include_held_out=True) for _ in range(N_SCENES)]
    return scenes, [draw(scene) for scene in scenes]


def _failures(images, scenes):
    return [
        (scene.caption, j.mismatches, j.detection)
        for scene, image in zip(scenes, images, strict=True)
        if not (j := judge(image, scene)).satisfied
    ]


def test_ground_truth_is_satisfied(ground_truth):
    scenes, images = ground_truth
    failures = _failures(images, scenes)
    assert len(failures) <= 0.01 * N_SCENES, failures  # >= 99% (measured: all 200)
    assert any(scene.held_out for scene in scenes)
    assert {scene.shape for scene in scenes} == set(SHAPES)


@pytest.mark.parametrize("held_out", [True, False])
def test_evaluation_prompts_drawn_exactly_score_one(held_out):
    scenes = evaluation_scenes(held_out)
    assert len(scenes) == 45
    assert adherence_score([draw(scene) for scene in scenes], [scene.caption for scene in scenes]) == 1.0


@pytest.mark.parametrize("attribute,choices", [("shape", SHAPES), ("colour", COLOURS), ("position", POSITIONS)])
def test_prompt_with_another_attribute_is_not_satisfied(ground_truth, attribute, choices):
    rng = np.random.default_rng(1)
    scenes, images = ground_truth
    wrong_named = 0
    for scene, image in zip(scenes[:N_PERTURBED], images[:N_PERTURBED], strict=True):
        others = [choice for choice in choices if choice != getattr(scene, attribute)]
        asked = dataclasses.replace(scene, **{attribute: others[rng.integers(len(others))]})
        judgement = judge(image, asked)
        wrong_named += judgement.mismatches != (attribute,)
        assert not judgement.satisfied, asked.caption  # measured: none satisfied
    assert wrong_named <= 0.01 * N_PERTURBED  # measured: 0


def _noise(image, rng):  # sensor-like noise, sigma 10 levels
    return np.clip(image + rng.normal(0.0, 10.0, image.shape), 0, 255).astype(np.uint8)


def _blur(image, rng):  # the smoothing of a decoder: down to 1/8 and back, bilinear (16-pixel support)
    height, width, _ = image.shape
    small = Image.fromarray(image).resize((width // 8, height // 8), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))


def _specks(image, rng, count=6):  # small squares (2-4 pixels) of another palette colour, anywhere
    image = image.copy()
    height, width, _ = image.shape
    colours = list(COLOURS.values())
    for _ in range(count):
        side = int(rng.integers(2, 5))
        y, x = int(rng.integers(height - side)), int(rng.integers(width - side))
        image[y : y + side, x : x + side] = colours[rng.integers(len(colours))]
    return image


def _all_three(image, rng):
    return _specks(_noise(_blur(image, rng), rng), rng)


def _squashed(image, rng):  # a rectangular image: 320 wide, 192 high
    return np.asarray(Image.fromarray(image).resize((320, 192), Image.Resampling.BILINEAR))


def _small(image, rng):  # the smallest size examined
    return np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BOX))


@pytest.mark.parametrize("perturb", [_noise, _blur, _specks, _all_three, _squashed, _small])
def test_ground_truth_survives_generator_artifacts(ground_truth, perturb):
    rng = np.random.default_rng(2)
    scenes, images = ground_truth
    perturbed = [perturb(image, rng) for image in images[:N_PERTURBED]]
    failures = _failures(perturbed, scenes[:N_PERTURBED])
    assert len(failures) <= 0.05 * N_PERTURBED, failures  # >= 95% (measured: all 100 under each)


def test_second_small_blob_is_ignored(ground_truth):
    scenes, images = ground_truth
    image = images[0].copy()
    scene = scenes[0]
    corner = (0, 0) if scene.position == "bottom right" else (200, 200)
    other = next(rgb for name, rgb in COLOURS.items() if name != scene.colour)
    image[corner[0] : corner[0] + 20, corner[1] : corner[1] + 20] = other
    assert judge(image, scene).satisfied


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_plain_background_shows_nothing(background):
    image = np.full((256, 256, 3), BACKGROUNDS[background], dtype=np.uint8)
    noisy = _specks(_noise(image, np.random.default_rng(3)), np.random.default_rng(4), count=3)
    for picture in (image, noisy):
        detection = detect(picture)
        assert (detection.shape, detection.colour, detection.position, detection.found) == (None, None, None, False)
        assert detection.background == background
        judgement = judge(picture, f"a red circle in the center on a {background} background")
        assert not judgement.satisfied
        assert judgement.mismatches == ("shape", "colour", "position")
    assert adherence_score([image], ["a red circle in the center"]) == 0.0


def test_detection_reports_its_measurements():
    scene = evaluation_scenes()[0]  # a blue circle at the top left on a white background
    detection = detect(Image.fromarray(draw(scene)).convert("RGBA"))  # PIL images of any mode are converted
    assert isinstance(detection, Detection)
    assert (detection.shape, detection.colour, detection.position, detection.background) == (
        "circle",
        "blue",
        "top left",
        "white",
    )
    assert detection.centroid == pytest.approx(POSITIONS["top left"], abs=0.01)
    assert detection.fill_ratio == pytest.approx(np.pi / 4, abs=0.03)
    assert detection.area_share == pytest.approx(np.pi * scene.radius**2, rel=0.05)
    assert detection.rgb == COLOURS["blue"]


def test_ground_truth_outlines_match_their_own_shape_best(ground_truth):
    scenes, images = ground_truth
    for scene, image in zip(scenes, images, strict=True):
        judgement = judge(image, scene)
        others = [iou for shape, iou in judgement.detection.outline_iou.items() if shape != scene.shape]
        assert judgement.outline_iou >= 0.97, (scene.caption, judgement.outline_iou)  # measured: 0.988 and up
        assert judgement.outline_iou > max(others) + 0.1, (scene.caption, judgement.detection.outline_iou)


def _canvas(draw_shape) -> np.ndarray:
    """A red shape on white, drawn at 1024x1024 by `draw_shape(pen)` and reduced to 256x256 as shapes.draw does."""
    image = Image.new("RGB", (1024, 1024), BACKGROUNDS["white"])
    draw_shape(ImageDraw.Draw(image))
    return np.asarray(image.resize((256, 256), Image.Resampling.BOX))


def test_outline_iou_measures_what_the_verdict_lets_pass():
    """A bumpy circle and a square with rounded corners are still judged a circle and a square, but their
    outline IoU falls below ground truth's."""
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    radius = 180 * (1 + 0.08 * np.sin(6 * angles))
    bumpy = _canvas(
        lambda pen: pen.polygon(
            list(zip(512 + radius * np.cos(angles), 512 + radius * np.sin(angles), strict=True)), fill=COLOURS["red"]
        )
    )
    rounded = _canvas(lambda pen: pen.rounded_rectangle((352, 352, 672, 672), radius=70, fill=COLOURS["red"]))
    true_circle = _canvas(lambda pen: pen.ellipse((332, 332, 692, 692), fill=COLOURS["red"]))
    true_square = _canvas(lambda pen: pen.rectangle((352, 352, 672, 672), fill=COLOURS["red"]))
    for image, truth, prompt in ((bumpy, true_circle, "a red circle"), (rounded, true_square, "a red square")):
        caption = f"{prompt} in the center on a white background"
        drawn, exact = judge(image, caption), judge(truth, caption)
        assert drawn.satisfied and exact.satisfied
        assert exact.outline_iou > 0.98 and drawn.outline_iou < exact.outline_iou - 0.03, (prompt, drawn.outline_iou)


def test_outline_score_is_the_mean_over_prompts():
    scenes = evaluation_scenes()[:3]
    images = [draw(scene) for scene in scenes] + [np.full((256, 256, 3), 255, dtype=np.uint8)]  # the last: no shape
    prompts = [*scenes, scenes[0]]
    assert judge(images[-1], prompts[-1]).outline_iou == 0.0
    expected = np.mean([judge(image, prompt).outline_iou for image, prompt in zip(images, prompts, strict=True)])
    assert outline_score(images, prompts) == pytest.approx(expected)
    assert 0.7 < outline_score(images, prompts) < 0.75  # three near 1, one 0
    with pytest.raises(OptionsError, match="one image per prompt"):
        outline_score(images, prompts[:2])


def test_score_is_the_share_of_satisfied_prompts():
    scenes = evaluation_scenes()[:4]
    images = [draw(scene) for scene in scenes]
    prompts = [scene.caption for scene in scenes]
    prompts[1] = prompts[1].replace("circle", "square")
    assert adherence_score(images, prompts) == 0.75
    assert adherence_score(images, scenes) == 1.0


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((256, 256), dtype=np.uint8),
        np.zeros((256, 256, 4), dtype=np.uint8),
        np.zeros((256, 256, 3), dtype=np.float32),
        np.zeros((32, 32, 3), dtype=np.uint8),
        [[0, 0, 0]],
    ],
)
def test_bad_image_is_refused(image):
    with pytest.raises(OptionsError, match="image must"):
        detect(image)


def test_bad_prompt_and_lengths_are_refused():
    image = draw(evaluation_scenes()[0])
    with pytest.raises(OptionsError, match="not of the form"):
        judge(image, "a picture of a cat")
    with pytest.raises(OptionsError, match="unknown colour"):
        judge(image, "a pink circle in the center")
    with pytest.raises(OptionsError, match="one image per prompt"):
        adherence_score([image, image], ["a red circle in the center"])
    with pytest.raises(OptionsError, match="one image per prompt"):
        adherence_score([], [])
