"""The masked sampling loop (MaskGIT-style parallel decoding), in numpy.

One module, shared by the PyTorch reference pipeline and the onnxruntime runtime: both hand it a
`Denoiser` (anything with `logits(tokens, timestep)`), so with the same logits and the same seed they
pick the same tokens. Semantics follow upstream Meissonic's scheduler (MEISSONIC.md, "Sampling"):

- start with every token masked; at step i (of N) the model gets timestep N-1-i;
- editing starts from the tokens of an image instead (`EditStart`, below) and runs only the last
  int(N * strength) steps;
- with guidance (scale > 1) the model batch is [unconditional; conditional] and
  logits = uncond + scale * (cond - uncond);
- every masked position draws a token from softmax(logits / token_temperature); known tokens are kept
  (token_temperature is 1 upstream, where tokens are drawn from the model's own distribution; ours is an
  option, and a model directory may choose another default: the demo model draws at 0.5);
- except at the last step, the mask_len least confident drawn tokens are masked again, where
  mask_len = floor(seq_len * cos(pi/2 * (i+1)/N)) clamped to [1, masked - 1], and
  confidence = log p(drawn token) + temperature_i * Gumbel noise, temperatures linspace(2, 0, N).

Randomness: one `numpy.random.Generator` (PCG64) seeded with the user's seed. Each step draws, in this
order, `rng.random((B, h*w))` for the token draws (inverse CDF: the first token whose cumulative
probability exceeds u) and, except at the last step, `rng.random((B, h*w))` for the Gumbel noise
(-log(-log(u))). A seed therefore means the same draws on every machine and in every backend; it
cannot reproduce upstream's torch-RNG images.

Editing (upstream's img2img and inpaint pipelines). With strength s, the first step run is
first = N - int(N * s); steps, timesteps and temperatures keep their indices in the whole schedule.
- img2img: before step `first` one more draw, `rng.random((B, h*w))`, masks each of the image's tokens whose
  u < mask_ratio(first - 1), the share the schedule leaves masked before step `first` (1 when first = 0, so
  strength 1 ignores the image). Upstream takes that ratio from `timesteps[first - 1]`, which at strength 1
  wraps around to the last timestep and masks almost nothing; ours masks everything there.
- inpainting and outpainting: the positions to repaint are masked, nothing is drawn, and each step's
  mask_len is scaled by the starting mask ratio (the repainted share of the grid), as upstream's scheduler
  does with `starting_mask_ratio`.
Either way a token that is not masked at the start is never drawn or masked again: preserved positions keep
the image's tokens at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm  # not tqdm.auto: the runtime stays lean (tqdm.auto costs 6 MB more resident)

from meissonic_edge.errors import OptionsError
from meissonic_edge.runtime.config import VQ_STRIDE, read_json

UPSTREAM_NEGATIVE_PROMPT = (
    "worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, text, "
    "jpeg artifacts, signature, sketch, duplicate, ugly, identifying mark"
)
ROW_CHUNK = 64  # positions per softmax chunk: bounds the temporaries to ROW_CHUNK x codebook floats (2 MB)


@dataclass(frozen=True)
class GenerationOptions:
    """What a user chooses for one generation (upstream's defaults)."""

    steps: int = 64
    guidance_scale: float = 9.0  # classifier-free guidance; <= 1 runs the conditional model alone
    negative_prompt: str = ""  # the "unconditional" prompt of guidance; "" as upstream's pipeline
    seed: int = 0
    height: int = 1024
    width: int = 1024
    temperature: tuple[float, float] = (2.0, 0.0)  # Gumbel temperature, first step -> last step
    token_temperature: float = 1.0  # softmax temperature of the token draws; < 1 draws likelier tokens
    aesthetic_score: float = 6.0  # micro-condition (the LAION aesthetic score asked for)
    crop: tuple[int, int] = field(default=(0, 0))  # micro-condition: crop coordinates (x, y)
    strength: float = 1.0  # editing: share of the schedule's steps run on the image (1: all of them)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def validate(self, token_stride: int = VQ_STRIDE) -> None:
        """Raise OptionsError naming the first bad option; `token_stride` is pixels per grid cell the model needs."""
        if not isinstance(self.steps, int) or self.steps < 1:
            raise OptionsError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise OptionsError(f"guidance scale must be >= 0, got {self.guidance_scale}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < token_stride or value % token_stride:
                raise OptionsError(f"{name} must be a positive multiple of {token_stride}, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise OptionsError(f"seed must be an integer >= 0, got {self.seed!r}")
        if len(self.temperature) != 2 or min(self.temperature) < 0:
            raise OptionsError(f"temperature must be two numbers >= 0 (first, last), got {self.temperature!r}")
        if not math.isfinite(self.token_temperature) or self.token_temperature <= 0:
            raise OptionsError(f"token temperature must be > 0, got {self.token_temperature}")
        if not isinstance(self.strength, (int, float)) or not 0 < self.strength <= 1:
            raise OptionsError(f"strength must be in (0, 1], got {self.strength!r}")
        if self.steps_run < 1:
            raise OptionsError(
                f"strength {self.strength} of {self.steps} steps runs no step (int(steps x strength) = 0): "
                "raise the strength or the steps"
            )

    @property
    def first_step(self) -> int:
        """Index of the first step run: steps - int(steps * strength) (0 for text-to-image)."""
        return self.steps - self.steps_run

    @property
    def steps_run(self) -> int:
        return int(self.steps * self.strength)

    def micro_conds(self) -> np.ndarray:
        """[width, height, crop_x, crop_y, aesthetic score], float32 (upstream's order)."""
        return np.array([self.width, self.height, *self.crop, self.aesthetic_score], dtype=np.float32)

    def temperatures(self) -> np.ndarray:
        return np.linspace(self.temperature[0], self.temperature[1], self.steps)


GENERATION_DEFAULTS_FILE = "generation_defaults.json"  # optional, in a model directory (ours, not upstream's)


def model_defaults(model_dir: str | Path | None) -> GenerationOptions:
    """Upstream's generation defaults, or those the model directory states in `generation_defaults.json`.

    The file holds GenerationOptions fields (steps, guidance_scale, height, width, temperature, ...): a model
    trained at 256x256 says so there, and its bundles then generate at 256x256 unless told otherwise.
    """
    if model_dir is None or not (Path(model_dir) / GENERATION_DEFAULTS_FILE).is_file():
        return GenerationOptions()
    path = Path(model_dir) / GENERATION_DEFAULTS_FILE
    values = read_json(path)
    if "temperature" in values:
        values["temperature"] = tuple(values["temperature"])
    try:
        options = GenerationOptions(**values)
    except TypeError as e:
        raise OptionsError(f"{path}: {e}") from None
    options.validate()
    return options


@dataclass(frozen=True)
class EditStart:
    """Where an edit starts: the image's tokens (h, w), and for inpainting and outpainting the positions to
    repaint (h, w), True = repaint. Without `repaint` it is img2img: the sampler masks tokens at random."""

    tokens: np.ndarray
    repaint: np.ndarray | None = None


@dataclass
class Generation:
    """What a pipeline returns: one PIL image per prompt, and the final VQ tokens (B, h, w)."""

    images: list
    tokens: np.ndarray


class Denoiser(Protocol):
    """One transformer step, whatever runs it. It holds the text conditioning for the model batch.

    A denoiser whose `applies_guidance` is true combines [uncond; cond] itself (the guided graph) and
    returns (B/2, h*w, codebook_size); the sampler then skips `apply_guidance`.
    """

    def logits(self, tokens: np.ndarray, timestep: int) -> np.ndarray:
        """tokens (B, h, w) int64 -> logits (B, h*w, codebook_size) float32."""
        ...


def mask_ratio(step: int, steps: int, schedule: str = "cosine") -> float:
    """Share of the sequence still masked after step `step` (0-based) of `steps`."""
    ratio = (step + 1) / steps
    if schedule == "cosine":
        return math.cos(ratio * math.pi / 2)
    if schedule == "linear":
        return 1.0 - ratio
    raise OptionsError(f"unknown masking schedule {schedule!r}: use 'cosine' or 'linear'")


def apply_guidance(logits: np.ndarray, scale: float) -> np.ndarray:
    """[uncond; cond] (2B, L, K) -> uncond + scale * (cond - uncond), (B, L, K), computed in place."""
    batch = logits.shape[0] // 2
    uncond, cond = logits[:batch], logits[batch:]
    cond -= uncond
    cond *= np.float32(scale)
    cond += uncond
    return cond


def draw_tokens(logits: np.ndarray, u: np.ndarray, token_temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one token per position from softmax(logits / token_temperature) by inverse CDF; also return
    log p of it under that distribution.

    logits (L, K), u (L,) uniform in [0, 1). Works on ROW_CHUNK positions at a time.
    """
    positions, vocab = logits.shape
    tokens = np.empty(positions, dtype=np.int64)
    log_probs = np.empty(positions, dtype=np.float32)
    for start in range(0, positions, ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        z = logits[rows].astype(np.float32, copy=False)
        if token_temperature != 1.0:
            z = z / np.float32(token_temperature)
        top = z.max(axis=-1, keepdims=True)  # (n, 1)
        cdf = np.subtract(z, top)  # (n, K)
        np.exp(cdf, out=cdf)  # unnormalised probabilities, in place: one temporary of n x K floats
        np.cumsum(cdf, axis=-1, out=cdf)
        total = cdf[:, -1]
        picked = np.minimum((cdf < (u[rows] * total)[:, None]).sum(axis=-1), vocab - 1)  # (n,)
        tokens[rows] = picked
        log_probs[rows] = z[np.arange(len(picked)), picked] - top[:, 0] - np.log(total)
    return tokens, log_probs


def masked_step(
    logits: np.ndarray,  # (B, L, K) guided logits
    tokens: np.ndarray,  # (B, L) current tokens, mask_token_id where unknown
    step: int,
    steps: int,
    temperature: float,
    mask_token_id: int,
    rng: np.random.Generator,
    schedule: str = "cosine",
    token_temperature: float = 1.0,
    starting_mask_ratio: float = 1.0,
) -> np.ndarray:
    """One step of the scheduler: draw the unknown tokens, then re-mask the least confident ones.

    `starting_mask_ratio` scales the share left masked (inpainting: the share of the grid repainted).
    """
    batch, seq_len = tokens.shape
    unknown = tokens == mask_token_id
    u = rng.random((batch, seq_len))
    drawn = np.empty_like(tokens)
    log_probs = np.empty((batch, seq_len), dtype=np.float32)
    for b in range(batch):
        drawn[b], log_probs[b] = draw_tokens(logits[b], u[b], token_temperature)
    result = np.where(unknown, drawn, tokens)
    if step == steps - 1:
        return result

    mask_len = math.floor(seq_len * starting_mask_ratio * mask_ratio(step, steps, schedule))
    gumbel = -np.log(np.maximum(-np.log(np.maximum(rng.random((batch, seq_len)), 1e-20)), 1e-20))
    confidence = np.maximum(log_probs, np.log(1e-20)) + temperature * gumbel
    confidence[~unknown] = np.inf  # decided tokens are never masked again
    for b in range(batch):
        masked = int(unknown[b].sum())
        count = max(1, min(mask_len, masked - 1)) if masked else 0  # nothing masked: nothing to re-mask
        least_confident = np.argsort(confidence[b], kind="stable")[:count]
        result[b, least_confident] = mask_token_id
    return result


def sample(
    denoiser: Denoiser,
    batch: int,
    grid: tuple[int, int],
    mask_token_id: int,
    options: GenerationOptions,
    schedule: str = "cosine",
    progress: bool = False,
    callback: Callable[[int, np.ndarray], None] | None = None,
    start: EditStart | None = None,
) -> np.ndarray:
    """Run the steps; return the final tokens (B, h, w). `callback(step, tokens)` sees every step run.

    Without `start` every token starts masked (text-to-image); with it, the edit starts from an image's
    tokens (see the module's docstring).
    """
    height, width = grid
    rng = np.random.default_rng(options.seed)
    tokens, starting_mask_ratio = start_tokens(start, batch, height * width, mask_token_id, options, schedule, rng)
    temperatures = options.temperatures()
    guided_inside = getattr(denoiser, "applies_guidance", False)
    steps = range(options.first_step, options.steps)
    for step in tqdm(steps, desc="sampling", disable=not progress, leave=False):
        model_tokens = np.concatenate([tokens, tokens]) if options.guided else tokens
        logits = denoiser.logits(model_tokens.reshape(-1, height, width), options.steps - 1 - step)
        if options.guided and not guided_inside:
            logits = apply_guidance(logits, options.guidance_scale)
        tokens = masked_step(
            logits,
            tokens,
            step,
            options.steps,
            float(temperatures[step]),
            mask_token_id,
            rng,
            schedule,
            options.token_temperature,
            starting_mask_ratio,
        )
        del logits  # the next step's logits must not meet these in memory
        if callback is not None:
            callback(step, tokens.reshape(batch, height, width))
    return tokens.reshape(batch, height, width)


def start_tokens(
    start: EditStart | None,
    batch: int,
    seq_len: int,
    mask_token_id: int,
    options: GenerationOptions,
    schedule: str,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """The tokens (B, h*w) before the first step run, and the starting mask ratio of the steps."""
    if start is None:
        if options.first_step:
            raise OptionsError("strength applies to editing (an input image); text-to-image runs every step")
        return np.full((batch, seq_len), mask_token_id, dtype=np.int64), 1.0
    image = np.asarray(start.tokens, dtype=np.int64).reshape(1, -1)
    if image.shape[1] != seq_len:
        raise OptionsError(f"the edit's tokens cover {image.shape[1]} positions, the grid has {seq_len}")
    image = np.repeat(image, batch, axis=0)
    if start.repaint is not None:
        repaint = np.broadcast_to(np.asarray(start.repaint, dtype=bool).reshape(1, -1), image.shape)
        return np.where(repaint, mask_token_id, image), float(repaint[0].mean())
    first = options.first_step
    ratio = 1.0 if first == 0 else mask_ratio(first - 1, options.steps, schedule)
    masked = rng.random((batch, seq_len)) < ratio
    return np.where(masked, mask_token_id, image), 1.0
