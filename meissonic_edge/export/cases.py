"""The real inputs every exported graph is checked on: prompts, text conditioning, tokens and images."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch

from meissonic_edge.errors import OptionsError
from meissonic_edge.export.graphs import TextEncoderGraph, VQDecoderGraph, VQEncoderGraph
from meissonic_edge.model.checkpoint import load_scheduler_config, load_text_encoder, load_transformer, load_vqvae
from meissonic_edge.model.layout import transformer_folder
from meissonic_edge.runtime.config import VQ_STRIDE, TransformerConfig
from meissonic_edge.runtime.sampler import GenerationOptions
from meissonic_edge.runtime.tokenizer import ClipTokenizer

CHECK_GUIDANCE = 9.0  # the guided transformer graph is checked at upstream's default scale
CHECK_PROMPTS = ["a red circle at the top left on a white background", "A Photo of a Cat, café-style!", ""]


def transformer_check_inputs(config: TransformerConfig, conditioning, grid: tuple[int, int], mask_token_id: int):
    """Real inputs for one guided step: half the tokens decided, [negative; prompt] text conditioning."""
    text_embeds, hidden = conditioning
    batch = text_embeds.shape[0]
    height, width = grid
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.codebook_size, (batch, height, width), generator=generator)
    tokens[torch.rand(tokens.shape, generator=generator) < 0.5] = mask_token_id
    micro = GenerationOptions(height=height * VQ_STRIDE, width=width * VQ_STRIDE).micro_conds()
    return {
        "tokens": tokens,
        "encoder_hidden_states": hidden,
        "text_embeds": text_embeds,
        "micro_conds": torch.from_numpy(np.tile(micro, (batch, 1))),
        "timestep": torch.full((batch,), 7.0),
    }


def check_cases(model_dir: Path, text_encoder_dir: Path | None, tokenizer_dir: Path, check_size: tuple[int, int]):
    """Yield (component, load, real check inputs) in export order; `load()` gives the fp32 graph module.

    The inputs are real: prompts through the bundle's tokenizer, the text encoder's output as the
    transformer's conditioning, decoded images as the VQ encoder's input. Nothing here keeps a module
    alive between components, so one component's weights are in memory at a time.
    """
    scheduler = load_scheduler_config(model_dir)
    config = TransformerConfig.from_json_file(transformer_folder(model_dir) / "config.json")
    grid = (check_size[0] // VQ_STRIDE, check_size[1] // VQ_STRIDE)
    input_ids = torch.from_numpy(ClipTokenizer.from_dir(tokenizer_dir).encode(CHECK_PROMPTS))

    def load_text_encoder_graph():
        return TextEncoderGraph(load_text_encoder(model_dir, text_encoder_dir))

    def load_transformer_graph():
        transformer = load_transformer(model_dir)
        transformer.mask_token_id = scheduler.mask_token_id  # for GPTQ calibration, which samples real steps
        return transformer

    def load_vq(kind):
        return lambda: kind(load_vqvae(model_dir))

    with torch.no_grad():  # [negative ""; prompt] conditioning for the transformer's check
        conditioning = load_text_encoder_graph()(input_ids[[2, 0]])
    gc.collect()
    yield "text_encoder", load_text_encoder_graph, {"input_ids": input_ids}
    inputs = transformer_check_inputs(config, conditioning, grid, scheduler.mask_token_id)
    yield "transformer", load_transformer_graph, inputs

    tokens = torch.randint(0, config.codebook_size, (2, *grid), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # decoded images are realistic inputs for the encoder's check
        images = load_vq(VQDecoderGraph)()(tokens)
    gc.collect()
    yield "vq_decoder", load_vq(VQDecoderGraph), {"tokens": tokens}
    yield "vq_encoder", load_vq(VQEncoderGraph), {"image": images}


# ----------------------------------------------------------------------------------------------- the bundle


def parse_size(text: str) -> tuple[int, int]:
    """ "256" or "256x384" (height x width) -> (256, 384)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise OptionsError(f"size must be N or HxW in pixels, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise OptionsError(f"size must be N or HxW in pixels, got {text!r}")
    return parts[0], parts[1]
