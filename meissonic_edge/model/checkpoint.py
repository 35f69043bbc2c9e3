"""Loading a Meissonic model directory (upstream's diffusers layout) from a local path.

    MODEL_DIR/
      transformer/   config.json + diffusion_pytorch_model.safetensors   -> our MeissonicTransformer
      vqvae/         config.json + diffusion_pytorch_model.safetensors   -> diffusers.VQModel
      text_encoder/  config.json + model.safetensors                     -> transformers.CLIPTextModelWithProjection
      tokenizer/     vocab.json, merges.txt, tokenizer config            -> transformers.CLIPTokenizer
      scheduler/     scheduler_config.json                               -> SchedulerConfig
      model_index.json (optional, informational)

Nothing is downloaded: every path is local and a missing one is an error that names it. Only safetensors
weights are read; pickle checkpoints (.bin, .pt, .pth, .ckpt) are refused, because unpickling runs code.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from meissonic_edge.errors import ModelDirError, WeightsError
from meissonic_edge.model.layout import require_dir, safetensors_files, text_encoder_folders, transformer_folder
from meissonic_edge.model.transformer import MeissonicTransformer
from meissonic_edge.runtime.config import SchedulerConfig, TransformerConfig

logger = logging.getLogger(__name__)


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{file} is not a readable safetensors file: {e}") from None
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, config: Path) -> None:
    """Strict key and shape match, explained: which tensors are missing, unexpected or misshapen."""
    from meissonic_edge.model.consistency import compare_shapes

    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    compare_shapes(expected, {k: list(v.shape) for k, v in state.items()}, str(source), str(config))


def load_transformer(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> MeissonicTransformer:
    """Our reference transformer with the checkpoint's weights (strict), in eval mode.

    `model_dir` is a model directory in the upstream layout or its `transformer/` folder.
    """
    folder = transformer_folder(Path(model_dir))
    config = TransformerConfig.from_json_file(folder / "config.json")
    files = safetensors_files(folder, "diffusion_pytorch_model")
    state = read_state_dict(files)
    with torch.device("meta"):
        model = MeissonicTransformer(config)
    check_state_dict(model, state, files[0], folder / "config.json")
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _check_weights(folder: Path, stem: str) -> None:
    """Refuse pickles and missing weights before a library's from_pretrained looks at the folder."""
    require_dir(folder, f"{folder.name}/ folder")
    if not (folder / "config.json").is_file():
        raise ModelDirError(f"missing file: {folder / 'config.json'}")
    safetensors_files(folder, stem)


@contextlib.contextmanager
def quiet_libraries():
    """Silence transformers' and diffusers' per-load progress bars and advice while we load."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])
        if bars:
            transformers_logging.enable_progress_bar()


def load_vqvae(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """diffusers `VQModel` from `model_dir/vqvae`."""
    from diffusers import VQModel

    folder = require_dir(model_dir, "model directory") / "vqvae"
    _check_weights(folder, "diffusion_pytorch_model")
    try:
        with quiet_libraries():
            model = VQModel.from_pretrained(folder, use_safetensors=True, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise WeightsError(f"{folder}: cannot load the VQ model: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_text_encoder(model_dir: str | Path, text_encoder_dir: str | Path | None = None, dtype=torch.float32):
    """transformers `CLIPTextModelWithProjection`; its outputs we use are `text_embeds` and `hidden_states[-2]`."""
    from transformers import CLIPTextModelWithProjection

    folder, _ = text_encoder_folders(Path(model_dir), Path(text_encoder_dir) if text_encoder_dir else None)
    _check_weights(folder, "model")
    try:
        with quiet_libraries():
            model = CLIPTextModelWithProjection.from_pretrained(
                folder, use_safetensors=True, local_files_only=True, dtype=dtype
            )
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise WeightsError(f"{folder}: cannot load the CLIP text encoder: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_clip_tokenizer(model_dir: str | Path, text_encoder_dir: str | Path | None = None):
    """transformers `CLIPTokenizer` from the tokenizer folder (see `text_encoder_folders`)."""
    from transformers import CLIPTokenizer

    _, folder = text_encoder_folders(Path(model_dir), Path(text_encoder_dir) if text_encoder_dir else None)
    require_dir(folder, "tokenizer folder")
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise ModelDirError(f"missing file: {folder / name}")
    try:
        with quiet_libraries():
            return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{folder}: cannot load the CLIP tokenizer: {str(e).splitlines()[0]}") from None


def load_scheduler_config(model_dir: str | Path) -> SchedulerConfig:
    folder = require_dir(model_dir, "model directory") / "scheduler"
    require_dir(folder, "scheduler/ folder")
    return SchedulerConfig.from_json_file(folder / "scheduler_config.json")


@dataclass
class ModelComponents:
    """Everything in a model directory, loaded for PyTorch."""

    transformer: MeissonicTransformer
    vqvae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: SchedulerConfig


def load_model_dir(
    model_dir: str | Path, text_encoder_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> ModelComponents:
    """Load every component of a local model directory (its consistency is checked before any weights load)."""
    from meissonic_edge.model.consistency import check_model_dir

    check_model_dir(model_dir, text_encoder_dir)
    model_dir = require_dir(model_dir, "model directory")
    scheduler = load_scheduler_config(model_dir)
    tokenizer = load_clip_tokenizer(model_dir, text_encoder_dir)
    components = ModelComponents(
        transformer=load_transformer(model_dir, dtype),
        vqvae=load_vqvae(model_dir, dtype),
        text_encoder=load_text_encoder(model_dir, text_encoder_dir, dtype),
        tokenizer=tokenizer,
        scheduler=scheduler,
    )
    check_compatible(components)
    return components


def check_compatible(c: ModelComponents) -> None:
    """The loaded components must agree on the widths and ids they exchange (the rules of `consistency.py`)."""
    from meissonic_edge.model.consistency import (
        check_mask_token,
        check_text_encoder_config,
        check_vq_config,
        text_config,
    )

    t = c.transformer.config
    te = text_config(c.text_encoder.config.to_dict(), "the text encoder's config")
    vq = {**c.vqvae.config, "block_out_channels": list(c.vqvae.config.block_out_channels)}
    check_text_encoder_config(te, "the text encoder's config", t, "the transformer's config")
    check_vq_config(vq, "the VQ's config", t, "the transformer's config")
    check_mask_token(c.scheduler.mask_token_id, "the scheduler's config", t, "the transformer's config")
