"""The PyTorch reference pipeline on the tiny preset."""

import io

import numpy as np
import pytest

from meissonic_edge.errors import OptionsError
from meissonic_edge.model.reference import ReferencePipeline


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return ReferencePipeline.from_model_dir(tiny_model_dir)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_bytes_other_seed_other_image(pipeline):
    options = dict(steps=4, guidance_scale=9.0, height=64, width=64)
    a = pipeline("a red circle", seed=1, **options)
    b = pipeline("a red circle", seed=1, **options)
    c = pipeline("a red circle", seed=2, **options)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert png_bytes(a) == png_bytes(b)
    assert png_bytes(a) != png_bytes(c)


def test_tokens_are_codebook_entries_and_steps_unmask(pipeline):
    masked_per_step = []
    result = pipeline.generate(
        "a blue square",
        steps=5,
        seed=0,
        height=64,
        width=96,
        callback=lambda i, t: masked_per_step.append(int((t == 71).sum())),
    )
    assert result.tokens.shape == (1, 4, 6)
    assert 0 <= result.tokens.min() and result.tokens.max() < 64
    assert masked_per_step[-1] == 0 and masked_per_step == sorted(masked_per_step, reverse=True)
    assert result.images[0].size == (96, 64)


def test_prompt_and_negative_prompt_matter(pipeline):
    base = dict(steps=3, seed=0, height=64, width=64)
    a = pipeline.generate("a red circle", **base).tokens
    b = pipeline.generate("a green triangle at the top left", **base).tokens
    c = pipeline.generate("a red circle", negative_prompt="blurry", **base).tokens
    assert (a != b).any() and (a != c).any()


def test_batch_of_prompts(pipeline):
    result = pipeline.generate(["a red circle", "a blue square"], steps=2, seed=0, height=64, width=64)
    assert len(result.images) == 2 and result.tokens.shape == (2, 4, 4)
    single = pipeline.generate("a blue square", steps=2, seed=0, height=64, width=64, guidance_scale=9.0)
    assert single.tokens.shape == (1, 4, 4)


def test_model_without_feature_compression(tiny_flat_model_dir):
    pipe = ReferencePipeline.from_model_dir(tiny_flat_model_dir)
    result = pipe.generate("a red circle", steps=3, seed=0, height=48, width=80)
    assert result.tokens.shape == (1, 3, 5)


@pytest.mark.parametrize("size", [(48, 64), (64, 0)])
def test_sizes_the_model_cannot_take(pipeline, size):
    with pytest.raises(OptionsError, match="must be a positive multiple of 32"):
        pipeline.generate("x", steps=1, height=size[0], width=size[1])


def test_decode_is_in_unit_range(pipeline):
    images = pipeline.decode(np.zeros((1, 2, 2), dtype=np.int64))
    assert images.shape == (1, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
