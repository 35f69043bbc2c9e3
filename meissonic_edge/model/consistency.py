"""Is a model directory consistent? Checked before any weights load, from what is cheap to read.

`check_model_dir` reads the JSON configs, the tokenizer's vocabulary files and the safetensors headers
(8 bytes of length, then a JSON table of names, dtypes and shapes): never a tensor's data, so it takes
well under a second even for a 4 GB checkpoint. It raises on the first problem, in one line that names
both files and both values:

    text_encoder/config.json projection_dim 96 != transformer/config.json pooled_projection_dim 128: ...

Checked, in order: the transformer and scheduler configs; the text encoder's widths against the
transformer's; the tokenizer's ids against the text encoder's vocabulary; the VQ's codebook and
downsampling against the transformer's codebook and token stride; the mask token; the generation
defaults' size; then every weights file's tensor names and shapes against its config.

The rules that compare two components (`check_text_encoder_config`, `check_vq_config`, `check_mask_token`)
take plain dicts, so `checkpoint.check_compatible` applies the same ones to loaded models.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from meissonic_edge.errors import ConfigError, ModelDirError, WeightsError
from meissonic_edge.model.layout import require_dir, safetensors_files, text_encoder_folders, transformer_folder
from meissonic_edge.runtime.config import VQ_STRIDE, SchedulerConfig, TransformerConfig, read_json
from meissonic_edge.runtime.tokenizer import MAX_LENGTH

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
SWAP_HINT = "the text encoder must be the one the transformer was trained with (pass it with --text-encoder)"

# transformers' CLIPTextConfig defaults: what it assumes for a key that config.json leaves out.
CLIP_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "eos_token_id": 49407,
}
LEGACY_CLIP_EOS = 2  # configs before transformers PR 24773 say 2: the pooled token is then the highest id
# diffusers' VQModel defaults, likewise.
VQ_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 3,
    "num_vq_embeddings": 256,
    "block_out_channels": [64],
    "norm_num_groups": 32,
    "vq_embed_dim": None,
}


def check_model_dir(model_dir: str | Path, text_encoder_dir: str | Path | None = None) -> None:
    """Raise a one-line `MeissonicError` if the components of `model_dir` do not fit together.

    `text_encoder_dir` replaces the text encoder and tokenizer as in `layout.text_encoder_folders`.
    """
    root = require_dir(Path(model_dir), "model directory")
    text_root = Path(text_encoder_dir) if text_encoder_dir else None
    name = lambda path: label(path, root)  # noqa: E731

    t_folder = transformer_folder(root)
    t_file = t_folder / "config.json"
    config = TransformerConfig.from_json_file(t_file)
    s_folder = require_dir(root / "scheduler", "scheduler/ folder")
    s_file = s_folder / "scheduler_config.json"
    scheduler = SchedulerConfig.from_json_file(s_file)
    te_folder, tok_folder = text_encoder_folders(root, text_root)
    te_file = require_file(require_dir(te_folder, f"{te_folder.name}/ folder") / "config.json")
    te = text_config(read_json(te_file), name(te_file))
    require_dir(tok_folder, "tokenizer folder")
    vq_file = require_file(require_dir(root / "vqvae", "vqvae/ folder") / "config.json")
    vq = vq_config(read_json(vq_file), name(vq_file))

    check_text_encoder_config(te, name(te_file), config, name(t_file))
    check_tokenizer(tok_folder, name, te, name(te_file))
    check_vq_config(vq, name(vq_file), config, name(t_file))
    check_mask_token(scheduler.mask_token_id, name(s_file), config, name(t_file))
    check_generation_defaults(root / "generation_defaults.json", name, config, name(t_file))

    t_weights = safetensors_files(t_folder, "diffusion_pytorch_model")
    compare_shapes(transformer_shapes(config), tensor_shapes(t_weights), name(t_weights[0]), name(t_file))
    te_weights = safetensors_files(te_folder, "model")
    found = {k: v for k, v in tensor_shapes(te_weights).items() if k.startswith(CLIP_TEXT_PREFIXES)}
    found.pop("text_model.embeddings.position_ids", None)  # a buffer older checkpoints saved; transformers drops it
    compare_shapes(clip_text_shapes(te), found, name(te_weights[0]), name(te_file))
    vq_weights = safetensors_files(root / "vqvae", "diffusion_pytorch_model")
    check_vq_weights(vq, tensor_shapes(vq_weights), name(vq_weights[0]), name(vq_file))


# ----------------------------------------------------------------------------------------------- files


def label(path: Path, root: Path) -> str:
    """`path` relative to the model directory (`transformer/config.json`), or in full when it lies elsewhere."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise ModelDirError(f"missing file: {path}")
    return path


def read_safetensors_header(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a safetensors file's header, without reading any tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise WeightsError(f"{path} is not a readable safetensors file: its header length is invalid")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a readable safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    shapes, end = {}, 0
    for key, entry in header.items():
        try:
            shapes[key] = [int(d) for d in entry["shape"]]
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise WeightsError(f"{path} is not a readable safetensors file: bad header entry {key!r}") from None
    if 8 + length + end > size:
        raise WeightsError(
            f"{path} is truncated: its header promises {8 + length + end} bytes, the file has {size} "
            "(an interrupted download? fetch it again)"
        )
    return shapes


def tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    shapes = {}
    for file in files:
        shapes.update(read_safetensors_header(file))
    return shapes


def compare_shapes(expected: dict, found: dict, weights: str, config: str) -> None:
    """Strict name and shape match, explained: which tensors are missing, unexpected or misshapen."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(
            f"{weights}: tensors do not match the config {config}: {'; '.join(parts)} "
            "(weights and config from different models?)"
        )
    for key, shape in expected.items():
        if list(found[key]) != list(shape):
            raise WeightsError(
                f"{weights}: tensor {key} has shape {list(found[key])} but the config implies {list(shape)} "
                f"({config}): weights and config from different models?"
            )


# ----------------------------------------------------------------------------------------------- rules


def text_config(data: dict, source: str) -> dict:
    """The text tower's settings, as transformers reads them: a full CLIPModel config holds them in
    `text_config`; a key left out takes transformers' default."""
    if data.get("model_type") == "clip" and isinstance(data.get("text_config"), dict):
        data = data["text_config"]
    te = {**CLIP_TEXT_DEFAULTS, **{k: v for k, v in data.items() if v is not None or k == "eos_token_id"}}
    require_ints(te, [k for k in CLIP_TEXT_DEFAULTS if k != "eos_token_id"], source)
    return te


def vq_config(data: dict, source: str) -> dict:
    """The VQModel settings we check, as diffusers reads them (a key left out takes its default)."""
    vq = {**VQ_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
    require_ints(vq, ["in_channels", "out_channels", "latent_channels", "num_vq_embeddings", "norm_num_groups"], source)
    channels = vq["block_out_channels"]
    if not isinstance(channels, list) or not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ConfigError(f"{source}: block_out_channels must be a non-empty list of positive ints, got {channels!r}")
    if vq["vq_embed_dim"] is not None:
        require_ints(vq, ["vq_embed_dim"], source)
    return vq


def require_ints(values: dict, keys: list[str], source: str) -> None:
    for key in keys:
        value = values[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{source}: {key} must be a positive int, got {value!r}")


def check_text_encoder_config(te: dict, te_file: str, t: TransformerConfig, t_file: str) -> None:
    """The text encoder's outputs must have the widths the transformer's input layers take."""
    pairs = (("hidden_size", "joint_attention_dim"), ("projection_dim", "pooled_projection_dim"))
    for te_key, t_key in pairs:
        if te[te_key] != getattr(t, t_key):
            raise ConfigError(f"{te_file} {te_key} {te[te_key]} != {t_file} {t_key} {getattr(t, t_key)}: {SWAP_HINT}")
    if te["max_position_embeddings"] < MAX_LENGTH:
        raise ConfigError(
            f"{te_file} max_position_embeddings {te['max_position_embeddings']} < {MAX_LENGTH}, the prompt length "
            "every Meissonic pipeline feeds it (CLIP's 77 tokens)"
        )


def check_tokenizer(folder: Path, name, te: dict, te_file: str) -> None:
    """Every id the tokenizer can produce needs a row in the text encoder's token embedding."""
    vocab_file = require_file(folder / "vocab.json")
    require_file(folder / "merges.txt")
    vocab = read_json(vocab_file)
    ids = {i for i in vocab.values() if isinstance(i, int)}
    json_file = folder / "tokenizer.json"
    if json_file.is_file():
        spec = read_json(json_file)
        inner = spec.get("model", {}).get("vocab", {}) if isinstance(spec.get("model"), dict) else {}
        if isinstance(inner, dict) and inner and len(inner) != len(vocab):
            raise ConfigError(
                f"{name(json_file)} has {len(inner)} vocabulary entries != {name(vocab_file)} {len(vocab)}: "
                "the two tokenizer files come from different tokenizers; keep the matching pair"
            )
        ids |= {t["id"] for t in spec.get("added_tokens", []) if isinstance(t, dict) and isinstance(t.get("id"), int)}
    if (folder / "added_tokens.json").is_file():
        ids |= {i for i in read_json(folder / "added_tokens.json").values() if isinstance(i, int)}
    if not ids:
        raise ConfigError(f"{name(vocab_file)} holds no token ids")
    if max(ids) >= te["vocab_size"]:
        raise ConfigError(
            f"{name(vocab_file)} ids reach {max(ids)} (added tokens included) but {te_file} vocab_size is "
            f"{te['vocab_size']}: "
            f"the tokenizer belongs to another text encoder; {SWAP_HINT}"
        )
    eos_id = vocab.get(eos_token(folder))
    if te["eos_token_id"] not in (None, LEGACY_CLIP_EOS) and eos_id is not None and te["eos_token_id"] != eos_id:
        raise ConfigError(
            f"{te_file} eos_token_id {te['eos_token_id']} != {name(vocab_file)} id of {eos_token(folder)} {eos_id}: "
            "the pooled text embedding would be read at the wrong position; use the matching tokenizer"
        )


def eos_token(folder: Path) -> str:
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / file).is_file():
            token = read_json(folder / file).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                return token
    return "<|endoftext|>"


def check_vq_config(vq: dict, vq_file: str, t: TransformerConfig, t_file: str) -> None:
    """The VQ's codebook is the transformer's output vocabulary, and its stride is the one we sample at."""
    entries = vq["num_vq_embeddings"]
    if entries != t.codebook_size:
        raise ConfigError(
            f"{vq_file} num_vq_embeddings {entries} != {t_file} codebook_size {t.codebook_size}: "
            "the transformer predicts ids of another VQ's codebook; use the VQ it was trained with"
        )
    channels = vq["block_out_channels"]
    stride = 2 ** (len(channels) - 1)
    if stride != VQ_STRIDE:
        raise ConfigError(
            f"{vq_file} downsamples {stride}x ({len(channels)} block_out_channels levels) but {t_file} token stride "
            f"{t.token_stride} assumes a {VQ_STRIDE}x VQ (5 levels, Meissonic's f=16)"
        )
    for key in ("down_block_types", "up_block_types"):
        if isinstance(vq.get(key), list) and len(vq[key]) != len(channels):
            raise ConfigError(f"{vq_file} {key} has {len(vq[key])} entries != block_out_channels {len(channels)}")
    groups = vq["norm_num_groups"]
    for width in channels:
        if width % groups:
            raise ConfigError(
                f"{vq_file} block_out_channels entry {width} is not divisible by norm_num_groups {groups} "
                "(GroupNorm needs it)"
            )


def check_mask_token(mask_token_id: int, s_file: str, t: TransformerConfig, t_file: str) -> None:
    """The mask token needs an embedding row (< vocab_size) and must not be a codebook id (>= codebook_size)."""
    if not t.codebook_size <= mask_token_id < t.vocab_size:
        raise ConfigError(
            f"{s_file} mask_token_id {mask_token_id} is outside {t_file} [codebook_size, vocab_size) = "
            f"[{t.codebook_size}, {t.vocab_size}): it must be an embedding row that is not a codebook entry"
        )


def check_generation_defaults(path: Path, name, t: TransformerConfig, t_file: str) -> None:
    """A default image size must be a whole token grid (sampler.GenerationOptions checks the rest)."""
    if not path.is_file():
        return
    values = read_json(path)
    for key in ("height", "width"):
        size = values.get(key)
        if isinstance(size, int) and size % t.token_stride:
            raise ConfigError(
                f"{name(path)} {key} {size} is not a multiple of {t_file} token stride {t.token_stride} "
                f"({VQ_STRIDE} px per VQ token{', x2 for downsample' if t.downsample else ''})"
            )


# ----------------------------------------------------------------------------------------------- expected weights


def transformer_shapes(config: TransformerConfig) -> dict[str, list[int]]:
    """Our transformer's state-dict shapes for `config`, from a model on the meta device (no memory, no data)."""
    import torch

    from meissonic_edge.model.transformer import MeissonicTransformer

    with torch.device("meta"):
        model = MeissonicTransformer(config)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


CLIP_TEXT_PREFIXES = ("text_model.", "text_projection.")


def clip_text_shapes(te: dict) -> dict[str, list[int]]:
    """transformers' CLIPTextModelWithProjection state-dict shapes for a text config."""
    h, inner, layers = te["hidden_size"], te["intermediate_size"], te["num_hidden_layers"]
    shapes = {
        "text_model.embeddings.token_embedding.weight": [te["vocab_size"], h],
        "text_model.embeddings.position_embedding.weight": [te["max_position_embeddings"], h],
        "text_model.final_layer_norm.weight": [h],
        "text_model.final_layer_norm.bias": [h],
        "text_projection.weight": [te["projection_dim"], h],
    }
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = [h, h]
            shapes[f"{p}self_attn.{proj}.bias"] = [h]
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = [h]
            shapes[f"{p}{norm}.bias"] = [h]
        shapes[f"{p}mlp.fc1.weight"] = [inner, h]
        shapes[f"{p}mlp.fc1.bias"] = [inner]
        shapes[f"{p}mlp.fc2.weight"] = [h, inner]
        shapes[f"{p}mlp.fc2.bias"] = [h]
    return shapes


def check_vq_weights(vq: dict, found: dict, weights: str, vq_file: str) -> None:
    """The tensors of the VQ that encode its config's sizes: codebook, latent widths, number of levels."""
    latent, levels = vq["latent_channels"], len(vq["block_out_channels"])
    dim = vq.get("vq_embed_dim") or latent
    expected = {
        "quantize.embedding.weight": [vq["num_vq_embeddings"], dim],
        "quant_conv.weight": [dim, latent, 1, 1],
        "post_quant_conv.weight": [latent, dim, 1, 1],
    }
    for key, shape in expected.items():
        if key not in found:
            raise WeightsError(f"{weights} has no tensor {key}, which {vq_file} implies (is this a diffusers VQModel?)")
        if found[key] != shape:
            raise WeightsError(
                f"{weights}: tensor {key} has shape {found[key]} but the config implies {shape} ({vq_file}): "
                "weights and config from different models?"
            )
    for part, blocks in (("encoder", "down_blocks"), ("decoder", "up_blocks")):
        pattern = re.compile(rf"{part}\.{blocks}\.(\d+)\.")
        indices = {int(m.group(1)) for key in found if (m := pattern.match(key))}
        if len(indices) != levels:
            raise WeightsError(
                f"{weights} has {len(indices)} {part}.{blocks} but {vq_file} block_out_channels has {levels} levels: "
                "weights and config from different models?"
            )
