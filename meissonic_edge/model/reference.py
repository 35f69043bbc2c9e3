"""The PyTorch reference pipeline: prompt -> image, the yardstick for every exported variant.

Text encoding, the transformer steps and VQ decoding run in PyTorch (fp32 by default); the sampling
loop is the shared numpy one in `sampler.py`, so the onnxruntime runtime makes the same choices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from meissonic_edge.model.checkpoint import ModelComponents, load_model_dir
from meissonic_edge.runtime.config import VQ_STRIDE
from meissonic_edge.runtime.editing import edit_options
from meissonic_edge.runtime.imaging import to_pil
from meissonic_edge.runtime.sampler import EditStart, Generation, GenerationOptions, model_defaults, sample

MAX_TEXT_TOKENS = 77


class TorchDenoiser:
    """The reference transformer with the text conditioning of one generation bound to it."""

    def __init__(self, transformer, encoder_hidden_states, text_embeds, micro_conds):
        self.transformer = transformer
        self.encoder_hidden_states = encoder_hidden_states
        self.text_embeds = text_embeds
        self.micro_conds = micro_conds

    @torch.inference_mode()
    def logits(self, tokens: np.ndarray, timestep: int) -> np.ndarray:
        batch = tokens.shape[0]
        dtype = self.text_embeds.dtype
        out = self.transformer(
            torch.from_numpy(tokens),
            self.encoder_hidden_states,
            self.text_embeds,
            self.micro_conds,
            torch.full((batch,), float(timestep), dtype=dtype),
        )
        return out.float().numpy()


def vq_tokens(vqvae, image: torch.Tensor) -> np.ndarray:
    """diffusers' own encoding and quantization of `image` (B, 3, H, W) in [0, 1] -> tokens (B, H/16, W/16)."""
    latents = vqvae.encode(image).latents
    _, _, (_, _, indices) = vqvae.quantize(latents)
    batch, _, height, width = latents.shape
    return indices.reshape(batch, height, width).numpy()


class ReferencePipeline:
    def __init__(self, components: ModelComponents, defaults: GenerationOptions | None = None):
        self.components = components
        self.defaults = defaults or GenerationOptions()  # the model directory's, or upstream's
        self.transformer = components.transformer
        self.config = components.transformer.config

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, text_encoder_dir: str | Path | None = None, dtype=torch.float32
    ) -> ReferencePipeline:
        return cls(load_model_dir(model_dir, text_encoder_dir, dtype), model_defaults(model_dir))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.components.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        ).input_ids

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, 77) -> (text_embeds (B, Dp), hidden_states (B, 77, Dt) from the penultimate layer)."""
        out = self.components.text_encoder(input_ids, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]

    @torch.inference_mode()
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """VQ tokens (B, h, w) -> images (B, 3, 16h, 16w) float32 in [0, 1]."""
        vq = self.components.vqvae
        batch, height, width = tokens.shape
        shape = (batch, height, width, vq.config.latent_channels)
        image = vq.decode(torch.from_numpy(tokens), force_not_quantize=True, shape=shape).sample
        return image.clamp(0, 1).float().numpy()

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) float32 in [0, 1] -> VQ tokens (B, H/16, W/16)."""
        return vq_tokens(self.components.vqvae, torch.from_numpy(image).to(self.dtype))

    def generate(
        self,
        prompt: str | list[str],
        options: GenerationOptions | None = None,
        progress: bool = False,
        callback=None,
        image=None,
        mask=None,
        expand: tuple[int, int, int, int] | None = None,
        **overrides,
    ) -> Generation:
        """Generate one image per prompt. `overrides` replace fields of `options` (steps=..., seed=...).

        With `image` (a path or PIL image) it edits: img2img alone, inpainting with `mask` (white = repaint),
        outpainting with `expand` (left, top, right, bottom pixels); `strength=` sets the share of steps run.
        """
        options, edit = edit_options(options or self.defaults, overrides, self.config.token_stride, image, mask, expand)
        start = None if edit is None else EditStart(self.encode(edit.pixels)[0], edit.repaint)
        schedule = self.components.scheduler.masking_schedule
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)

        texts = [options.negative_prompt] * batch + prompts if options.guided else prompts
        text_embeds, hidden = self.encode_text(self.tokenize(texts))
        micro = torch.from_numpy(np.tile(options.micro_conds(), (len(texts), 1))).to(self.dtype)
        denoiser = TorchDenoiser(self.transformer, hidden.to(self.dtype), text_embeds.to(self.dtype), micro)

        grid = (options.height // VQ_STRIDE, options.width // VQ_STRIDE)
        tokens = sample(
            denoiser,
            batch,
            grid,
            self.components.scheduler.mask_token_id,
            options,
            schedule=schedule if edit is None else edit.schedule(schedule),
            progress=progress,
            callback=callback,
            start=start,
        )
        return Generation(images=to_pil(self.decode(tokens)), tokens=tokens)

    def __call__(self, prompt: str, **options) -> Image.Image:
        return self.generate(prompt, **options).images[0]
