"""The shared numpy sampler: upstream's schedule, correct draws, deterministic seeds."""

import math
from dataclasses import replace

import numpy as np
import pytest

from meissonic_edge.errors import OptionsError
from meissonic_edge.runtime import sampler
from meissonic_edge.runtime.sampler import GenerationOptions, apply_guidance, draw_tokens, masked_step, sample

MASK = 99


class RecordingDenoiser:
    """Random logits that depend on the tokens and timestep; records what it was asked."""

    def __init__(self, codebook=16, seed=0):
        self.codebook = codebook
        self.calls = []
        self.weights = np.random.default_rng(seed).normal(size=(MASK + 1, codebook)).astype(np.float32)

    def logits(self, tokens, timestep):
        self.calls.append((tokens.copy(), timestep))
        batch = tokens.shape[0]
        flat = tokens.reshape(batch, -1)
        out = self.weights[flat] * (1 + 0.1 * timestep)
        out += np.arange(batch, dtype=np.float32)[:, None, None]  # the batch halves differ
        return out.astype(np.float32)


def test_draws_follow_the_softmax():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.tile(np.log(probs).astype(np.float32), (20000, 1))
    u = np.random.default_rng(0).random(20000)
    tokens, log_probs = draw_tokens(logits, u)
    freq = np.bincount(tokens, minlength=4) / len(tokens)
    np.testing.assert_allclose(freq, probs, atol=0.015)
    np.testing.assert_allclose(log_probs, np.log(probs)[tokens], atol=1e-5)


def test_draws_do_not_depend_on_the_chunk_size(monkeypatch):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 50)).astype(np.float32) * 3
    u = rng.random(300)
    whole = draw_tokens(logits, u)
    monkeypatch.setattr(sampler, "ROW_CHUNK", 7)
    chunked = draw_tokens(logits, u)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_token_temperature_draws_from_the_tempered_softmax():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.tile(np.log(probs).astype(np.float32), (20000, 1))
    u = np.random.default_rng(0).random(20000)
    tokens, log_probs = draw_tokens(logits, u, token_temperature=0.5)
    tempered = probs**2 / (probs**2).sum()  # softmax(log p / 0.5) is p^2, normalised
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / len(tokens), tempered, atol=0.015)
    np.testing.assert_allclose(log_probs, np.log(tempered)[tokens], atol=1e-5)
    # the same uniforms at temperature 1 draw differently: the option is not ignored
    assert (draw_tokens(logits, u)[0] != tokens).mean() > 0.1


def test_token_temperature_reaches_every_step():
    options = GenerationOptions(steps=4, guidance_scale=1.0, height=64, width=64, token_temperature=0.25)
    cold = sample(RecordingDenoiser(), 2, (4, 4), MASK, options)
    plain = sample(RecordingDenoiser(), 2, (4, 4), MASK, replace(options, token_temperature=1.0))
    again = sample(RecordingDenoiser(), 2, (4, 4), MASK, options)
    np.testing.assert_array_equal(cold, again)
    assert (cold != plain).any()


def test_guidance_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 5, 6)).astype(np.float32)
    uncond, cond = logits[:2].copy(), logits[2:].copy()
    np.testing.assert_allclose(apply_guidance(logits, 9.0), uncond + 9.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_mask_counts_follow_upstream_schedule(steps):
    """The number of tokens still masked after each step is exactly upstream's AmusedScheduler's."""
    torch = pytest.importorskip("torch")
    from diffusers import AmusedScheduler

    batch, length, codebook = 2, 37, 8
    rng = np.random.default_rng(3)
    ours = np.full((batch, length), MASK, dtype=np.int64)
    theirs = torch.full((batch, length), MASK, dtype=torch.long)
    scheduler = AmusedScheduler(mask_token_id=MASK, masking_schedule="cosine")
    scheduler.set_timesteps(steps, temperature=(2, 0))
    temperatures = GenerationOptions(steps=steps).temperatures()
    np.testing.assert_allclose(temperatures, scheduler.temperatures.numpy(), atol=1e-6)
    for i, timestep in enumerate(scheduler.timesteps):
        assert int(timestep) == steps - 1 - i
        logits = rng.normal(size=(batch, length, codebook)).astype(np.float32)
        ours = masked_step(logits, ours, i, steps, temperatures[i], MASK, rng)
        theirs = scheduler.step(
            torch.from_numpy(logits), timestep, theirs, generator=torch.Generator().manual_seed(i)
        ).prev_sample
        np.testing.assert_array_equal((ours == MASK).sum(1), (theirs == MASK).sum(1).numpy())
    assert not (ours == MASK).any()


def test_known_tokens_kept_and_least_confident_remasked():
    rng = np.random.default_rng(4)
    batch, length, codebook = 1, 64, 10
    tokens = np.full((batch, length), MASK, dtype=np.int64)
    tokens[0, :20] = np.arange(20) % codebook  # already decided
    logits = (rng.normal(size=(batch, length, codebook)) * 3).astype(np.float32)

    step_rng = np.random.default_rng(5)
    u = np.random.default_rng(5).random((batch, length))
    out = masked_step(logits, tokens, step=1, steps=8, temperature=0.0, mask_token_id=MASK, rng=step_rng)

    np.testing.assert_array_equal(out[0, :20], tokens[0, :20])
    drawn, log_probs = draw_tokens(logits[0], u[0])
    expected_len = max(1, min(math.floor(length * math.cos(2 / 8 * math.pi / 2)), 44 - 1))
    masked = np.flatnonzero(out[0] == MASK)
    assert len(masked) == expected_len
    # with temperature 0 the confidence is log p: the masked ones are the least likely draws
    unknown = np.arange(20, length)
    lowest = unknown[np.argsort(log_probs[unknown], kind="stable")[:expected_len]]
    np.testing.assert_array_equal(np.sort(masked), np.sort(lowest))
    kept = np.setdiff1d(unknown, masked)
    np.testing.assert_array_equal(out[0, kept], drawn[kept])


def test_sample_loop_guidance_timesteps_and_determinism():
    denoiser = RecordingDenoiser()
    options = GenerationOptions(steps=6, guidance_scale=3.0, seed=11, height=64, width=96)
    tokens = sample(denoiser, batch=2, grid=(4, 6), mask_token_id=MASK, options=options)
    assert tokens.shape == (2, 4, 6)
    assert tokens.min() >= 0 and tokens.max() < denoiser.codebook
    assert [t for _, t in denoiser.calls] == [5, 4, 3, 2, 1, 0]
    first_tokens = denoiser.calls[0][0]
    assert first_tokens.shape == (4, 4, 6) and (first_tokens == MASK).all()  # [uncond; cond] batch

    again = sample(RecordingDenoiser(), batch=2, grid=(4, 6), mask_token_id=MASK, options=options)
    np.testing.assert_array_equal(tokens, again)
    other = GenerationOptions(steps=6, guidance_scale=3.0, seed=12, height=64, width=96)
    different = sample(RecordingDenoiser(), batch=2, grid=(4, 6), mask_token_id=MASK, options=other)
    assert (tokens != different).any()


def test_no_guidance_runs_the_conditional_batch_only():
    denoiser = RecordingDenoiser()
    options = GenerationOptions(steps=3, guidance_scale=1.0, seed=0)
    sample(denoiser, batch=1, grid=(2, 2), mask_token_id=MASK, options=options)
    assert all(tokens.shape[0] == 1 for tokens, _ in denoiser.calls)


def test_callback_sees_every_step_and_masks_shrink():
    seen = []
    options = GenerationOptions(steps=5, guidance_scale=0.0, seed=0)
    sample(
        RecordingDenoiser(),
        1,
        (6, 6),
        MASK,
        options,
        callback=lambda i, t: seen.append((i, (t == MASK).sum())),
    )
    assert [i for i, _ in seen] == list(range(5))
    counts = [c for _, c in seen]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be"),
        (dict(guidance_scale=-1.0), "guidance scale must be >= 0"),
        (dict(height=100), "height must be a positive multiple of 32"),
        (dict(width=0), "width must be a positive multiple of 32"),
        (dict(seed=-3), "seed must be"),
        (dict(token_temperature=0.0), "token temperature must be > 0"),
        (dict(token_temperature=float("nan")), "token temperature must be > 0"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(OptionsError, match=message):
        GenerationOptions(**kwargs).validate(token_stride=32)
