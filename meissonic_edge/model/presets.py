"""`make-random`: complete model directories in the upstream layout, with random weights.

`tiny` builds in seconds and is what the tests use; `meissonic` has the real Meissonic sizes (1.0B
transformer parameters, the CLIP-ViT-H text tower, the f=16 VQ) for memory and speed benchmarks.
Weights are seeded, so a preset and a seed always give the same directory. Every parameter that a
library initialises to a constant (norm weights of 1, biases of 0) is perturbed, so that a parity test
on these models exercises every weight.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from meissonic_edge.errors import OptionsError
from meissonic_edge.fileio import atomic_directory
from meissonic_edge.model.checkpoint import quiet_libraries
from meissonic_edge.model.clip_vocab import write_clip_tokenizer
from meissonic_edge.model.transformer import MeissonicTransformer
from meissonic_edge.runtime.config import SchedulerConfig, TransformerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    transformer: TransformerConfig
    text_encoder: dict  # transformers CLIPTextConfig arguments (vocab_size: embedding rows)
    vqvae: dict  # diffusers VQModel arguments
    tokenizer_vocab: int  # BPE entries asked of the generated tokenizer
    mask_token_id: int


PRESETS = {
    "tiny": Preset(
        transformer=TransformerConfig(
            num_layers=1,
            num_single_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
            vocab_size=72,
            codebook_size=64,
            downsample=True,
            upsample=True,
        ),
        text_encoder=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
        vqvae=dict(
            block_out_channels=[8, 16, 16, 32, 32],
            latent_channels=8,
            num_vq_embeddings=64,
            layers_per_block=1,
            norm_num_groups=8,
        ),
        tokenizer_vocab=1000,
        mask_token_id=71,
    ),
    "meissonic": Preset(
        transformer=TransformerConfig(
            num_layers=14,
            num_single_layers=28,
            num_attention_heads=8,
            attention_head_dim=128,
            joint_attention_dim=1024,
            pooled_projection_dim=1024,
            axes_dims_rope=(16, 56, 56),
            vocab_size=8256,
            codebook_size=8192,
            downsample=True,
            upsample=True,
        ),
        text_encoder=dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            projection_dim=1024,
            hidden_act="gelu",
        ),
        vqvae=dict(
            block_out_channels=[128, 256, 256, 512, 768],
            latent_channels=64,
            num_vq_embeddings=8192,
            layers_per_block=2,
            norm_num_groups=32,
        ),
        tokenizer_vocab=49408,
        mask_token_id=8255,
    ),
}


def perturb_constant_parameters(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every constant-initialised tensor (ones, zeros) random values near its constant."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            if torch.all(tensor == tensor.flatten()[0]):
                scale = 0.1 if tensor.flatten()[0] != 0 else 0.02
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))


def save_safetensors(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, path, metadata={"format": "pt"})


def write_transformer(folder: Path, config: TransformerConfig, generator: torch.Generator, dtype) -> None:
    folder.mkdir()
    model = MeissonicTransformer(config)
    perturb_constant_parameters(model, generator)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    save_safetensors(model, folder / "diffusion_pytorch_model.safetensors", dtype)


def build_vqvae(arguments: dict):
    """A diffusers VQModel in Meissonic's layout (one down/up block per level, codebook lookup, no attention)."""
    from diffusers import VQModel

    levels = len(arguments["block_out_channels"])
    return VQModel(
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        lookup_from_codebook=True,
        mid_block_add_attention=False,
        force_upcast=True,
        **arguments,
    )


def write_vqvae(folder: Path, arguments: dict, generator: torch.Generator, dtype) -> None:
    model = build_vqvae(arguments)
    perturb_constant_parameters(model, generator)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)


def write_text_encoder(folder: Path, arguments: dict, special_ids: dict, generator, dtype) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(max_position_embeddings=77, **special_ids, **arguments)
    model = CLIPTextModelWithProjection(config)
    perturb_constant_parameters(model, generator)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)


def write_model_index(model_dir: Path) -> None:
    """`model_index.json`: which class each folder holds (informational, as upstream writes it)."""
    model_index = {
        "_class_name": "Pipeline",
        "scheduler": ["meissonic", "Scheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "transformer": ["meissonic", "Transformer2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    }
    (model_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def make_random(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    feature_compression: bool | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a model directory in the upstream layout with seeded random weights; return its path.

    `feature_compression` overrides the preset's downsample/upsample setting.
    """
    if preset not in PRESETS:
        raise OptionsError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if not isinstance(seed, int) or seed < 0:
        raise OptionsError(f"seed must be an integer >= 0, got {seed!r}")
    spec = PRESETS[preset]
    transformer = spec.transformer
    if feature_compression is not None:
        transformer = replace(transformer, downsample=feature_compression, upsample=feature_compression)

    with atomic_directory(out_dir, overwrite) as tmp, torch.random.fork_rng(), quiet_libraries():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed + 1)

        write_clip_tokenizer(tmp / "tokenizer", spec.tokenizer_vocab)
        vocab = json.loads((tmp / "tokenizer" / "vocab.json").read_text())
        special_ids = {
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        }
        text_encoder = dict(spec.text_encoder, vocab_size=max(spec.text_encoder["vocab_size"], len(vocab)))

        logger.info("writing the %s transformer", preset)
        write_transformer(tmp / "transformer", transformer, generator, dtype)
        logger.info("writing the text encoder")
        write_text_encoder(tmp / "text_encoder", text_encoder, special_ids, generator, dtype)
        logger.info("writing the VQ model")
        write_vqvae(tmp / "vqvae", spec.vqvae, generator, dtype)

        (tmp / "scheduler").mkdir()
        scheduler = SchedulerConfig(mask_token_id=spec.mask_token_id)
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler.to_dict(), indent=2) + "\n")
        write_model_index(tmp)
    return Path(out_dir)
