"""Where things are in a model directory (upstream's diffusers layout), without loading anything.

The loaders (`checkpoint.py`) and the consistency checks (`consistency.py`) both find files here; nothing here
imports torch. Only safetensors weights are accepted: a pickle checkpoint is refused with how to convert it.
"""

from __future__ import annotations

from pathlib import Path

from meissonic_edge.errors import ModelDirError, WeightsError
from meissonic_edge.runtime.config import read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    'convert it once, in a process you trust, with: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\""
)


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelDirError(f"{what} not found: {path}")
    if not path.is_dir():
        raise ModelDirError(f"{what} is not a directory: {path}")
    return path


def safetensors_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors file(s) named `stem` in `folder` (one file, or the shards of an index).

    Refuses pickle checkpoints with a message that says how to convert them.
    """
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: no weight_map")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if shard.resolve().parent != folder.resolve() or not shard.is_file():
                raise WeightsError(f"{index}: shard {shard.name} is missing or outside {folder}")
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{folder / pickles[0]} is a pickle checkpoint; only safetensors are loaded (pickles can run code): "
            + CONVERT_HINT
        )
    raise WeightsError(f"no {stem}.safetensors in {folder}")


def transformer_folder(model_dir: Path) -> Path:
    """`model_dir/transformer`, or `model_dir` itself when it is the transformer folder."""
    model_dir = require_dir(model_dir, "model directory")
    if (model_dir / "transformer").is_dir():
        return model_dir / "transformer"
    if (model_dir / "config.json").is_file() and any(model_dir.glob("diffusion_pytorch_model.*")):
        return model_dir
    raise ModelDirError(f"no transformer/ folder in {model_dir}")


def text_encoder_folders(model_dir: Path, text_encoder_dir: Path | None) -> tuple[Path, Path]:
    """(text encoder folder, tokenizer folder).

    By default `model_dir/text_encoder` and `model_dir/tokenizer`. `text_encoder_dir` replaces both, as
    upstream's scripts do with CLIP-ViT-H-14: either a folder in the same layout (with `text_encoder/` and
    `tokenizer/`) or a flat transformers folder holding the model and the tokenizer files together.
    """
    if text_encoder_dir is None:
        root = require_dir(model_dir, "model directory")
        return root / "text_encoder", root / "tokenizer"
    root = require_dir(text_encoder_dir, "text encoder directory")
    if (root / "text_encoder").is_dir():
        return root / "text_encoder", root / "tokenizer"
    return root, root
