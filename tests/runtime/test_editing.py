"""Image editing: img2img, inpainting and outpainting, in the sampler, the planning of inputs, both pipelines
and the command line."""

import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from meissonic_edge.cli import main
from meissonic_edge.errors import OptionsError
from meissonic_edge.model.reference import ReferencePipeline
from meissonic_edge.runtime.editing import MAX_STRETCH, open_image, parse_expand, plan_edit, repaint_grid
from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline
from meissonic_edge.runtime.sampler import EditStart, GenerationOptions, mask_ratio, masked_step, sample

MASK = 99


class RandomDenoiser:
    """Logits that depend on the tokens and the timestep, from a fixed random table."""

    def __init__(self, codebook=16, seed=0):
        self.weights = np.random.default_rng(seed).normal(size=(MASK + 1, codebook)).astype(np.float32) * 2

    def logits(self, tokens, timestep):
        flat = tokens.reshape(tokens.shape[0], -1)
        return (self.weights[flat] * (1 + 0.05 * timestep)).astype(np.float32)


def run(options, start, grid=(6, 8), schedule="cosine"):
    seen = []
    tokens = sample(
        RandomDenoiser(),
        2,
        grid,
        MASK,
        options,
        schedule,
        callback=lambda i, t: seen.append((i, t.copy())),
        start=start,
    )
    return tokens, seen


# ----------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("strength", [1.0, 0.75, 0.3])
def test_img2img_never_changes_the_tokens_it_kept(strength):
    image = np.random.default_rng(1).integers(0, 16, size=(6, 8))
    options = GenerationOptions(steps=10, guidance_scale=1.0, seed=4, strength=strength)
    tokens, seen = run(options, EditStart(image))
    assert [step for step, _ in seen] == list(range(10 - int(10 * strength), 10))  # the schedule's last steps
    first = seen[0][1]
    # before the first step a share mask_ratio(first - 1) of the tokens was masked at random: whatever the
    # first step did not draw is the image's token, and stays so at every later step
    kept = first == image[None]
    for _, step_tokens in seen:
        assert (step_tokens[kept] == np.broadcast_to(image, kept.shape)[kept]).all()
    assert (tokens != MASK).all()
    if strength == 1.0:
        assert not (tokens == image[None]).all()  # everything was masked: the image is only a seed of nothing
    else:
        expected = mask_ratio(options.first_step - 1, 10)
        assert abs(1 - kept.mean() - expected) < 0.35  # Bernoulli masking around the schedule's ratio


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inpainting_never_changes_the_preserved_positions(strength):
    image = np.random.default_rng(2).integers(0, 16, size=(6, 8))
    repaint = np.zeros((6, 8), dtype=bool)
    repaint[1:4, 2:7] = True
    options = GenerationOptions(steps=8, guidance_scale=1.0, seed=0, strength=strength)
    tokens, seen = run(options, EditStart(image, repaint), schedule="linear")
    assert len(seen) == int(8 * strength)
    for _, step_tokens in seen:
        assert (step_tokens[:, ~repaint] == image[~repaint]).all()
    assert (tokens[:, repaint] != MASK).all()
    # the masked count follows the linear schedule scaled by the starting mask ratio (15 of 48 positions)
    before = 15
    for step, step_tokens in seen[:-1]:
        expected = max(1, min(math.floor(48 * (15 / 48) * (1 - (step + 1) / 8)), before - 1))
        assert ((step_tokens.reshape(2, -1) == MASK).sum(axis=1) == expected).all(), step
        before = expected


def test_img2img_masks_with_the_first_draw_of_the_seed():
    """img2img's random mask is the seed's first draw (so other runtimes can reproduce it): the tokens it left
    alone are the result's, whatever the steps do."""
    image = np.random.default_rng(3).integers(0, 16, size=(6, 8))
    options = GenerationOptions(steps=10, guidance_scale=1.0, seed=0, strength=0.2)  # first step 8
    for seed in range(10):
        tokens, _ = run(replace(options, seed=seed), EditStart(image))
        masked = np.random.default_rng(seed).random((2, 48)) < mask_ratio(7, 10)
        changed = (tokens != image[None]).reshape(2, 48)
        assert not changed[~masked].any() and 0 < masked.sum() < 48, seed


def test_a_step_with_nothing_masked_changes_nothing():
    tokens = np.random.default_rng(4).integers(0, 16, size=(2, 48))
    logits = np.random.default_rng(5).normal(size=(2, 48, 16)).astype(np.float32)
    out = masked_step(logits, tokens, 0, 4, 1.0, MASK, np.random.default_rng(0))
    np.testing.assert_array_equal(out, tokens)  # text-to-image re-masks at least one token; here none is unknown


def test_strength_is_checked():
    with pytest.raises(OptionsError, match=r"strength must be in \(0, 1\], got 0"):
        GenerationOptions(strength=0).validate()
    with pytest.raises(OptionsError, match=r"strength must be in \(0, 1\], got 1.5"):
        GenerationOptions(strength=1.5).validate()
    with pytest.raises(OptionsError, match="runs no step"):
        GenerationOptions(steps=4, strength=0.2).validate()
    with pytest.raises(OptionsError, match="strength applies to editing"):
        sample(RandomDenoiser(), 1, (2, 2), MASK, GenerationOptions(steps=4, strength=0.5, guidance_scale=1))


# ----------------------------------------------------------------------------------------------- planning


def picture(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_mask_reduced_as_upstream_does():
    """Upstream's mask processor (diffusers' VaeImageProcessor: grayscale, Lanczos to the grid, binarized at
    0.5) and ours agree on every token of random masks. Upstream rounds the grid down to multiples of 16
    tokens, so the comparison uses images of 256 and 512 pixels."""
    from diffusers.image_processor import VaeImageProcessor

    upstream = VaeImageProcessor(
        vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True, do_resize=True
    )
    rng = np.random.default_rng(0)
    compared = 0
    for size in [(256, 256), (512, 256), (256, 512), (512, 512)] * 3:
        width, height = size
        pixels = np.zeros((height, width), np.uint8)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + rng.integers(20, height // 2), left : left + rng.integers(20, width // 2)] = 255
        pixels = (pixels * (rng.random(pixels.shape) > 0.3)).astype(np.uint8)  # ragged: many borderline cells
        mask = Image.fromarray(pixels)
        theirs = upstream.preprocess(mask, height // 16, width // 16).numpy()[0, 0] >= 0.5
        np.testing.assert_array_equal(repaint_grid(mask, size, size), theirs)
        compared += theirs.size
    assert compared > 5000


def test_outpainting_canvas_and_repainted_area():
    image = picture(64, 32)
    edit = plan_edit(image, expand=(32, 0, 64, 32), token_stride=32)
    assert edit.mode == "outpaint" and (edit.width, edit.height) == (160, 64)
    assert edit.repaint.shape == (4, 10)
    expected = np.ones((4, 10), dtype=bool)
    expected[0:2, 2:6] = False  # the image's 2 x 4 tokens
    np.testing.assert_array_equal(edit.repaint, expected)
    original = np.asarray(image, np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(edit.pixels[0, :, 0:32, 32:96], original)
    np.testing.assert_array_equal(edit.pixels[0, :, 40, 0], original[:, -1, 0])  # edge pixels repeated out
    assert edit.schedule("cosine") == "linear"


def test_sizes_are_fitted_or_refused():
    image = picture(64, 96)
    exact = plan_edit(image, token_stride=32)
    assert exact.mode == "img2img" and exact.repaint is None and (exact.width, exact.height) == (64, 96)
    np.testing.assert_array_equal(exact.pixels[0].transpose(1, 2, 0), np.asarray(image, np.float32) / 255)
    fitted = plan_edit(picture(520, 260), token_stride=32)  # rounded down to 512 x 256, both sides 1.5% smaller
    assert (fitted.width, fitted.height) == (512, 256)
    mask = Image.new("L", (520, 260))
    mask.paste(255, (0, 0, 260, 260))  # the left half, in the image's own pixels
    inpaint = plan_edit(picture(520, 260), mask, token_stride=32)
    assert inpaint.repaint.shape == (16, 32) and inpaint.repaint[:, :15].all() and not inpaint.repaint[:, 17:].any()
    with pytest.raises(OptionsError, match=r"image is 100x70; fitting it to multiples of 32 pixels \(96x64\) would "
                       r"stretch it by 5%: crop or pad it"):  # fmt: skip
        plan_edit(picture(100, 70), token_stride=32)
    assert 0.05 > MAX_STRETCH
    with pytest.raises(OptionsError, match="image is 20x64; each side must be at least 32 pixels"):
        plan_edit(picture(20, 64), token_stride=32)


def _dot(mask, size):
    mask = mask.copy()
    mask[10 : 10 + size, 10 : 10 + size] = 255
    return mask


def _except_corner(mask):
    mask = mask.copy() + 255
    mask[0:3, 0:3] = 0  # white but for a few pixels: every token is repainted
    return mask


@pytest.mark.parametrize(
    "pixels, message",
    [
        (lambda m: m, "mask is all black: nothing to repaint"),
        (lambda m: m + 255, "mask is all white: everything would be repainted; that is text-to-image"),
        (lambda m: _dot(m, 4), "the mask's white area covers no token"),
        (_except_corner, "the mask covers every token"),
    ],
)
def test_masks_that_leave_nothing_to_do(pixels, message):
    base = np.zeros((64, 64), np.uint8)
    with pytest.raises(OptionsError, match=message):
        plan_edit(picture(64, 64), Image.fromarray(pixels(base).astype(np.uint8)), token_stride=32)


def test_expand_and_mask_options_are_checked(tmp_path):
    assert parse_expand("0,32,64,0") == (0, 32, 64, 0)
    for text in ["1,2,3", "a,b,c,d", "1,2,3,4,5"]:
        with pytest.raises(OptionsError, match="--expand takes LEFT,TOP,RIGHT,BOTTOM pixels, four integers"):
            parse_expand(text)
    for expand, message in [
        ((16, 0, 0, 0), "expand left must be a multiple of the token stride 32 pixels, >= 0; got 16"),
        ((0, -32, 0, 0), "expand top must be a multiple of the token stride 32 pixels, >= 0; got -32"),
        ((0, 0, 0, 0), "expand adds nothing"),
    ]:
        with pytest.raises(OptionsError, match=message):
            plan_edit(picture(64, 64), expand=expand, token_stride=32)
    with pytest.raises(OptionsError, match="a mask and an expansion do not go together"):
        plan_edit(picture(64, 64), Image.new("L", (64, 64)), expand=(32, 0, 0, 0))
    with pytest.raises(OptionsError, match="mask is 64x32, the image 64x64: they must match"):
        plan_edit(picture(64, 64), Image.new("L", (64, 32), 255))
    (tmp_path / "not.png").write_text("not an image")
    with pytest.raises(OptionsError, match=r"image .*not.png is not an image file Pillow can read"):
        open_image(tmp_path / "not.png")
    with pytest.raises(OptionsError, match=r"mask not found: .*missing.png"):
        open_image(tmp_path / "missing.png", "mask")
    png = tmp_path / "cut.png"
    picture(64, 64).save(png)
    png.write_bytes(png.read_bytes()[:200])  # truncated
    with pytest.raises(OptionsError, match=r"image .*cut.png cannot be read"):
        open_image(png)


# ----------------------------------------------------------------------------------------------- pipelines


SETTINGS = dict(steps=6, seed=5, guidance_scale=9.0, negative_prompt="blurry")


@pytest.fixture(scope="module")
def edit_inputs(tmp_path_factory, tiny_bundle):
    """An input image (a tiny-model generation, 64 x 96) and a mask over part of it."""
    folder = tmp_path_factory.mktemp("edit")
    OnnxPipeline(tiny_bundle).generate("a red circle", height=64, width=96, **SETTINGS).images[0].save(
        folder / "in.png"
    )
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 40:96] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "in.png", folder / "mask.png"


EDITS = {
    "img2img": dict(strength=0.7),
    "inpaint": dict(mask="mask"),
    "outpaint": dict(expand=(32, 0, 0, 32)),
}


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("mode", list(EDITS))
def test_runtime_edits_with_the_reference_tokens(tiny_bundle, tiny_model_dir, edit_inputs, mode, low_memory):
    image, mask = edit_inputs
    kwargs = {k: (mask if v == "mask" else v) for k, v in EDITS[mode].items()}
    runtime = OnnxPipeline(tiny_bundle, low_memory=low_memory, threads=1)
    reference = ReferencePipeline.from_model_dir(tiny_model_dir)
    ours, theirs = [], []
    a = runtime.generate(
        "a blue square", image=image, callback=lambda i, t: ours.append((i, t.copy())), **SETTINGS, **kwargs
    )
    b = reference.generate(
        "a blue square", image=image, callback=lambda i, t: theirs.append((i, t.copy())), **SETTINGS, **kwargs
    )
    assert [i for i, _ in ours] == [i for i, _ in theirs] and len(ours) == int(6 * kwargs.get("strength", 1))
    for (step, x), (_, y) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=f"step {step}")
    expected_size = (128, 96) if mode == "outpaint" else (96, 64)
    assert a.images[0].size == b.images[0].size == expected_size
    if mode != "img2img":  # the preserved tokens are the image's, at every step
        edit = plan_edit(image, kwargs.get("mask"), kwargs.get("expand"), token_stride=32)
        encoded = runtime.encode(edit.pixels)[0]
        for _, step_tokens in ours:
            assert (step_tokens[0][~edit.repaint] == encoded[~edit.repaint]).all()
    if low_memory:
        assert runtime.sessions == {}  # the encoder too was released after encoding
    else:
        assert "vq_encoder" in runtime.sessions


def test_editing_without_a_vq_encoder_is_refused_first(tiny_bundle, tmp_path, edit_inputs):
    import json
    import shutil

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["graphs"]["vq_encoder"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    from meissonic_edge.runtime.bundle import BundleError

    with pytest.raises(BundleError, match="has no vq_encoder graph, which editing needs"):
        OnnxPipeline(bundle).generate("x", image=edit_inputs[0], steps=2)


@pytest.fixture(scope="module")
def demo_fp32_bundle(tmp_path_factory):
    from meissonic_edge.demo.run import DEMO_MODEL
    from meissonic_edge.export.to_onnx import export_onnx

    return export_onnx(DEMO_MODEL, tmp_path_factory.mktemp("demo") / "fp32", progress=False, tiled_decoder=False)


@pytest.mark.slow
def test_demo_model_edits_with_the_reference_tokens(demo_fp32_bundle, tmp_path):
    """The trained demo model: inpainting and img2img of a drawn scene give the reference's tokens."""
    from meissonic_edge.demo.edits import edit_examples
    from meissonic_edge.demo.run import DEMO_MODEL

    runtime = OnnxPipeline(demo_fp32_bundle, threads=1)
    reference = ReferencePipeline.from_model_dir(DEMO_MODEL)
    for example in edit_examples():
        for kwargs in (example.inputs(), {"image": example.image, "strength": 0.5}):
            a = runtime.generate(example.prompt, steps=16, seed=1, **kwargs).tokens
            b = reference.generate(example.prompt, steps=16, seed=1, **kwargs).tokens
            np.testing.assert_array_equal(a, b, err_msg=f"{example.name} {sorted(kwargs)}")


# ----------------------------------------------------------------------------------------------- command line


def test_cli_edits(tiny_bundle, edit_inputs, tmp_path, capsys):
    image, mask = edit_inputs
    out = tmp_path / "out.png"
    base = ["generate", str(tiny_bundle), "a blue square", "--steps", "4", "--quiet", "--image", str(image)]
    assert main([*base, "-o", str(out), "--mask", str(mask), "--strength", "0.5"]) == 0
    assert Image.open(out).size == (96, 64)
    assert main([*base, "-o", str(out), "--expand", "0,32,32,0"]) == 0
    assert Image.open(out).size == (128, 96)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{missing}"], "error: image not found: "),
        (["--image", "{text}"], "error: image {text} is not an image file Pillow can read"),
        (["--image", "{image}", "--mask", "{small}"], "error: mask is 32x32, the image 96x64: they must match"),
        (["--image", "{image}", "--mask", "{black}"], "error: mask is all black: nothing to repaint"),
        (["--image", "{image}", "--mask", "{white}"], "error: mask is all white: everything would be repainted"),
        (["--image", "{image}", "--strength", "0"], r"error: strength must be in (0, 1], got 0.0"),
        (["--image", "{image}", "--strength", "1.2"], r"error: strength must be in (0, 1], got 1.2"),
        (["--strength", "0.5"], "error: strength applies to editing an image (--image)"),
        (["--mask", "{mask}"], "error: a mask or an expansion needs an image to edit (--image)"),
        (["--image", "{image}", "--expand", "16,0,0,0"], "error: expand left must be a multiple of the token stride"),
        (["--image", "{image}", "--expand=-32,0,0,0"], "error: expand left must be a multiple of the token stride"),
        (["--image", "{image}", "--expand", "32,0"], "error: --expand takes LEFT,TOP,RIGHT,BOTTOM pixels"),
        (["--image", "{image}", "--mask", "{mask}", "--expand", "32,0,0,0"], "error: a mask and an expansion do not"),
        (
            ["--image", "{image}", "--height", "64"],
            "error: an edit's size is its image's: leave out height or resize the image",
        ),
    ],
)
def test_cli_bad_edits_are_one_line(tiny_bundle, edit_inputs, tmp_path, capsys, args, message):
    image, mask = edit_inputs
    (tmp_path / "text.png").write_text("hello")
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    Image.new("L", (96, 64), 0).save(tmp_path / "black.png")
    Image.new("L", (96, 64), 255).save(tmp_path / "white.png")
    names = dict(image=image, mask=mask, missing=tmp_path / "missing.png", text=tmp_path / "text.png",
                 small=tmp_path / "small.png", black=tmp_path / "black.png", white=tmp_path / "white.png")  # fmt: skip
    args = [a.format(**names) for a in args]
    out = tmp_path / "out.png"
    code = main(["generate", str(tiny_bundle), "p", "-o", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(message.format(**names)), err
    assert not out.exists()
