"""The parts of a bundle both exporters write alike: the tokenizer and its check, and the manifest sections
that describe the source, the model and its sampling defaults."""

from __future__ import annotations

import shutil
from pathlib import Path

from meissonic_edge.export.cases import CHECK_PROMPTS
from meissonic_edge.export.parity import Check, require
from meissonic_edge.model.layout import text_encoder_folders
from meissonic_edge.runtime.config import VQ_STRIDE, TransformerConfig
from meissonic_edge.runtime.sampler import model_defaults
from meissonic_edge.runtime.tokenizer import MAX_LENGTH, ClipTokenizer

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(model_dir: Path, text_encoder_dir: Path | None, out_dir: Path) -> None:
    _, source = text_encoder_folders(model_dir, text_encoder_dir)
    target = out_dir / "tokenizer"
    target.mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def check_tokenizer(reference_tokenizer, bundle_tokenizer_dir: Path) -> dict:
    """The runtime tokenizer must give exactly CLIPTokenizer's ids."""
    ours = ClipTokenizer.from_dir(bundle_tokenizer_dir).encode(CHECK_PROMPTS)
    theirs = reference_tokenizer(
        CHECK_PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np"
    ).input_ids
    agreement = float((ours == theirs).mean())
    return require("tokenizer", [Check("id_agreement", agreement, 1.0, True)])


def source_section(model_dir: Path, text_encoder_dir: Path | None) -> dict:
    return {"model_dir": model_dir.name, "text_encoder_dir": text_encoder_dir.name if text_encoder_dir else None}


def model_section(scheduler, config: TransformerConfig) -> dict:
    """What a runtime needs to drive the graphs, for the manifest."""
    return {
        "mask_token_id": scheduler.mask_token_id,
        "masking_schedule": scheduler.masking_schedule,
        "codebook_size": config.codebook_size,
        "vocab_size": config.vocab_size,
        "vq_stride": VQ_STRIDE,
        "token_stride": config.token_stride,
        "feature_compression": config.downsample,
        "text_max_length": MAX_LENGTH,
        "text_hidden_size": config.joint_attention_dim,
        "pooled_projection_dim": config.pooled_projection_dim,
    }


def defaults_section(model_dir: Path | None = None) -> dict:
    d = model_defaults(model_dir)
    return {
        "steps": d.steps,
        "guidance_scale": d.guidance_scale,
        "negative_prompt": d.negative_prompt,
        "temperature": list(d.temperature),
        "token_temperature": d.token_temperature,
        "height": d.height,
        "width": d.width,
        "micro_conditions": {"aesthetic_score": d.aesthetic_score, "crop": list(d.crop)},
    }
