"""train-demo: the machinery on a few steps (the real run takes about an hour; its result ships)."""

import dataclasses
import json

import numpy as np
import pytest

from meissonic_edge.demo.train import (
    GENERATION_DEFAULTS,
    TrainingRecipe,
    lr_at,
    train_demo,
    training_timesteps,
    vq_stage_key,
)


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    return train_demo(tmp_path_factory.mktemp("train") / "demo", TrainingRecipe.quick())


def test_training_is_deterministic(quick_model, tmp_path):
    again = train_demo(tmp_path / "again", TrainingRecipe.quick())
    files = sorted(p.relative_to(quick_model) for p in quick_model.rglob("*.safetensors"))
    assert len(files) == 3
    for relative in files:
        assert (quick_model / relative).read_bytes() == (again / relative).read_bytes(), relative
    other = train_demo(tmp_path / "other", TrainingRecipe.quick(seed=1))
    path = "transformer/diffusion_pytorch_model.safetensors"
    assert (other / path).read_bytes() != (quick_model / path).read_bytes()


def test_the_result_is_a_model_directory_that_generates(quick_model):
    from meissonic_edge.model.reference import ReferencePipeline

    log = json.loads((quick_model / "training_log.json").read_text())
    assert {"vq_decoder_loss", "vq_encoder_token_accuracy", "transformer_final_loss", "total_seconds"} <= set(log)
    assert {"torch", "threads", "codes_used"} <= set(log)
    pipe = ReferencePipeline.from_model_dir(quick_model)
    for name, value in GENERATION_DEFAULTS.items():  # read from generation_defaults.json
        assert getattr(pipe.defaults, name) == value, name
    assert pipe.defaults.height == 256  # not GenerationOptions' own default (1024)
    image = pipe("a red circle at the top left on a white background", steps=2)
    assert image.size == (256, 256)


def test_the_vq_stage_is_cached_and_reused(tmp_path):
    first = train_demo(tmp_path / "a", TrainingRecipe.quick(), cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").iterdir()
    assert (cached / "config.json").is_file()
    second = train_demo(tmp_path / "b", TrainingRecipe.quick(), cache_dir=tmp_path / "cache")
    for name in ("vqvae/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_the_vq_stage_key_follows_the_dataset(monkeypatch):
    """A cached VQ stage is not reused for another dataset: the key names what the scenes look like."""
    from meissonic_edge.demo import shapes

    recipe = TrainingRecipe()
    key = vq_stage_key(recipe)
    assert vq_stage_key(recipe) == key
    assert vq_stage_key(dataclasses.replace(recipe, decoder_steps=10)) != key
    monkeypatch.setattr(shapes, "SHAPES", shapes.SHAPES[:2])  # another vocabulary
    assert vq_stage_key(recipe) != key
    monkeypatch.undo()
    monkeypatch.setattr(shapes, "SUPERSAMPLE", 2)  # the same scenes, drawn differently
    assert vq_stage_key(recipe) != key


def test_schedule_helpers():
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, warmup=10) == pytest.approx(0.1, abs=1e-3)
    u = np.array([0.0, 0.5, 0.999])
    t = training_timesteps(u, np.random.default_rng(0), TrainingRecipe())
    # all masked (u = 0) is the first step, whose timestep is N - 1 >= 7; nearly done is the last, 0
    assert t[0] >= 7 and t[2] == 0 and 0 <= t[1] < t[0]
