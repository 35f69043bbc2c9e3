"""check_model_dir: every mismatch between the parts of a model directory, found from configs, tokenizer files
and safetensors headers before any weights load, in one line that names both files and both values."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from meissonic_edge.errors import ConfigError, ModelDirError, WeightsError
from meissonic_edge.model import consistency
from meissonic_edge.model.consistency import check_model_dir

DEMO_MODEL = Path(__file__).parents[2] / "meissonic_edge" / "demo_model"
T_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
TE_WEIGHTS = "text_encoder/model.safetensors"
VQ_WEIGHTS = "vqvae/diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------------------------- breakers


def edit_json(relative, **changes):
    def apply(root: Path):
        path = root / relative
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update(changes)
        path.write_text(json.dumps(data))

    return apply


def edit_weights(relative, drop=(), add=None, reshape=None):
    def apply(root: Path):
        path = root / relative
        state = load_file(path)
        for key in drop:
            state = {k: v for k, v in state.items() if not k.startswith(key)}
        for key, shape in (reshape or {}).items():
            state[key] = torch.zeros(shape)
        state.update(add or {})
        save_file(state, path)

    return apply


def both(*breakers):
    def apply(root: Path):
        for breaker in breakers:
            breaker(root)

    return apply


def truncate(relative):
    def apply(root: Path):
        path = root / relative
        path.write_bytes(path.read_bytes()[:-100])

    return apply


def remove(relative):
    def apply(root: Path):
        path = root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return apply


def drop_tokenizer_json_entry(root: Path):
    path = root / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["vocab"].pop(next(iter(data["model"]["vocab"])))
    path.write_text(json.dumps(data))


FOUR_LEVEL_VQ = edit_json(
    "vqvae/config.json",
    block_out_channels=[8, 16, 16, 32],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
)

# (case, break the tiny model copy, error type, fragments the one-line message must contain)
CASES = [
    (
        "issue 27: a swapped text encoder's projection_dim",
        both(
            edit_json("text_encoder/config.json", projection_dim=24),
            edit_weights(TE_WEIGHTS, reshape={"text_projection.weight": [24, 32]}),
        ),
        ConfigError,
        ["text_encoder/config.json projection_dim 24 != transformer/config.json pooled_projection_dim 32"],
    ),
    (
        "text encoder width vs joint_attention_dim",
        edit_json("text_encoder/config.json", hidden_size=48),
        ConfigError,
        ["text_encoder/config.json hidden_size 48 != transformer/config.json joint_attention_dim 32", "--text-encoder"],
    ),
    (
        "text encoder positions shorter than the prompt",
        edit_json("text_encoder/config.json", max_position_embeddings=64),
        ConfigError,
        ["text_encoder/config.json max_position_embeddings 64 < 77"],
    ),
    (
        "text encoder config value of the wrong type",
        edit_json("text_encoder/config.json", hidden_size="32"),
        ConfigError,
        ["text_encoder/config.json: hidden_size must be a positive int, got '32'"],
    ),
    (
        "tokenizer ids beyond the text encoder's vocabulary",
        edit_json("text_encoder/config.json", vocab_size=900),
        ConfigError,
        ["tokenizer/vocab.json ids reach 999", "text_encoder/config.json vocab_size is 900"],
    ),
    (
        "tokenizer.json and vocab.json disagree",
        drop_tokenizer_json_entry,
        ConfigError,
        ["tokenizer/tokenizer.json has 999 vocabulary entries != tokenizer/vocab.json 1000"],
    ),
    (
        "text encoder eos id vs the tokenizer's",
        edit_json("text_encoder/config.json", eos_token_id=5),
        ConfigError,
        ["text_encoder/config.json eos_token_id 5 != tokenizer/vocab.json id of <|endoftext|> 999"],
    ),
    (
        "tokenizer without vocab.json",
        remove("tokenizer/vocab.json"),
        ModelDirError,
        ["missing file:", "tokenizer/vocab.json"],
    ),
    (
        "VQ codebook vs the transformer's codebook_size",
        edit_json("vqvae/config.json", num_vq_embeddings=128),
        ConfigError,
        ["vqvae/config.json num_vq_embeddings 128 != transformer/config.json codebook_size 64"],
    ),
    (
        "VQ downsampling vs the token stride",
        FOUR_LEVEL_VQ,
        ConfigError,
        ["vqvae/config.json downsamples 8x (4 block_out_channels levels)", "transformer/config.json token stride 32"],
    ),
    (
        "VQ block types vs its levels",
        edit_json("vqvae/config.json", down_block_types=["DownEncoderBlock2D"] * 4),
        ConfigError,
        ["vqvae/config.json down_block_types has 4 entries != block_out_channels 5"],
    ),
    (
        "VQ widths vs its group norm",
        edit_json("vqvae/config.json", norm_num_groups=3),
        ConfigError,
        ["vqvae/config.json block_out_channels entry 8 is not divisible by norm_num_groups 3"],
    ),
    (
        "mask token inside the codebook",
        edit_json("scheduler/scheduler_config.json", mask_token_id=50),
        ConfigError,
        ["scheduler/scheduler_config.json mask_token_id 50", "transformer/config.json [codebook_size, vocab_size)"],
    ),
    (
        "mask token beyond the vocabulary",
        edit_json("scheduler/scheduler_config.json", mask_token_id=72),
        ConfigError,
        ["scheduler/scheduler_config.json mask_token_id 72", "= [64, 72)"],
    ),
    (
        "unknown masking schedule",
        edit_json("scheduler/scheduler_config.json", masking_schedule="exponential"),
        ConfigError,
        ["scheduler_config.json: masking_schedule must be 'cosine' or 'linear', got 'exponential'"],
    ),
    (
        "generation defaults off the token grid",
        edit_json("generation_defaults.json", height=48),
        ConfigError,
        ["generation_defaults.json height 48 is not a multiple of transformer/config.json token stride 32"],
    ),
    (
        "transformer tensor missing",
        edit_weights(T_WEIGHTS, drop=["mlm_layer.conv2.weight"]),
        WeightsError,
        [T_WEIGHTS, "transformer/config.json", "1 missing (e.g. mlm_layer.conv2.weight)"],
    ),
    (
        "transformer tensor unexpected",
        edit_weights(T_WEIGHTS, add={"extra.weight": torch.zeros(2)}),
        WeightsError,
        [T_WEIGHTS, "1 unexpected (e.g. extra.weight)"],
    ),
    (
        "transformer tensor misshapen",
        edit_weights(T_WEIGHTS, reshape={"embed.embeddings.weight": [80, 32]}),
        WeightsError,
        [T_WEIGHTS, "embed.embeddings.weight has shape [80, 32] but the config implies [72, 32]"],
    ),
    (
        "transformer config with more layers than its weights",
        edit_json("transformer/config.json", num_single_layers=3),
        WeightsError,
        ["missing (e.g. single_transformer_blocks.2."],
    ),
    (
        "transformer config invalid",
        edit_json("transformer/config.json", vocab_size=60),
        ConfigError,
        ["transformer/config.json: vocab_size (60) must exceed codebook_size (64)"],
    ),
    (
        "text encoder tensor missing",
        edit_weights(TE_WEIGHTS, drop=["text_model.encoder.layers.1.mlp.fc2.bias"]),
        WeightsError,
        [TE_WEIGHTS, "text_encoder/config.json", "1 missing (e.g. text_model.encoder.layers.1.mlp.fc2.bias)"],
    ),
    (
        "text encoder layer unexpected",
        edit_json("text_encoder/config.json", num_hidden_layers=1),
        WeightsError,
        [TE_WEIGHTS, "unexpected (e.g. text_model.encoder.layers.1."],
    ),
    (
        "text encoder embedding table misshapen",
        edit_weights(TE_WEIGHTS, reshape={"text_model.embeddings.token_embedding.weight": [900, 32]}),
        WeightsError,
        ["text_model.embeddings.token_embedding.weight has shape [900, 32] but the config implies [1000, 32]"],
    ),
    (
        "VQ codebook table misshapen",
        edit_weights(VQ_WEIGHTS, reshape={"quantize.embedding.weight": [128, 8]}),
        WeightsError,
        [VQ_WEIGHTS, "quantize.embedding.weight has shape [128, 8] but the config implies [64, 8]", "vqvae/config"],
    ),
    (
        "VQ codebook table missing",
        edit_weights(VQ_WEIGHTS, drop=["quantize."]),
        WeightsError,
        [VQ_WEIGHTS, "has no tensor quantize.embedding.weight, which vqvae/config.json implies"],
    ),
    (
        "VQ weights with fewer levels than its config",
        edit_weights(VQ_WEIGHTS, drop=["encoder.down_blocks.4."]),
        WeightsError,
        [VQ_WEIGHTS, "has 4 encoder.down_blocks but vqvae/config.json block_out_channels has 5 levels"],
    ),
    (
        "truncated weights (an interrupted download)",
        truncate(T_WEIGHTS),
        WeightsError,
        [T_WEIGHTS, "is truncated", "fetch it again"],
    ),
    (
        "not a safetensors file",
        lambda root: (root / VQ_WEIGHTS).write_bytes(b"garbage" * 10),
        WeightsError,
        [VQ_WEIGHTS, "is not a readable safetensors file"],
    ),
    (
        "pickle checkpoint",
        lambda root: (root / TE_WEIGHTS).rename(root / "text_encoder" / "model.bin"),
        WeightsError,
        ["model.bin is a pickle checkpoint"],
    ),
    (
        "missing component folder",
        remove("vqvae"),
        ModelDirError,
        ["vqvae/ folder not found"],
    ),
]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


@pytest.mark.parametrize("case, breaker, error, fragments", CASES, ids=[c[0] for c in CASES])
def test_each_mismatch_is_one_line_naming_both_sides(model_copy, case, breaker, error, fragments):
    breaker(model_copy)
    with pytest.raises(error) as info:
        check_model_dir(model_copy)
    message = str(info.value)
    print(f"{case}: {message}")
    assert "\n" not in message
    assert type(info.value) is error
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_flat_model_dir", "upstream_layout_model_dir"])
def test_consistent_models_pass(request, fixture):
    check_model_dir(request.getfixturevalue(fixture))


def test_the_demo_model_passes():
    check_model_dir(DEMO_MODEL)


def flat_text_encoder(tiny_model_dir, folder: Path) -> Path:
    """Upstream's CLIP-ViT-H-14 layout: model and tokenizer files in one folder."""
    shutil.copytree(tiny_model_dir / "text_encoder", folder)
    for f in (tiny_model_dir / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def test_a_separate_text_encoder_directory_is_the_one_checked(tiny_model_dir, tmp_path):
    flat = flat_text_encoder(tiny_model_dir, tmp_path / "clip")
    check_model_dir(tiny_model_dir, flat)
    edit_json("config.json", projection_dim=24)(flat)
    check_model_dir(tiny_model_dir)  # the model's own text encoder is untouched
    with pytest.raises(ConfigError) as info:
        check_model_dir(tiny_model_dir, flat)
    assert f"{flat / 'config.json'} projection_dim 24 != transformer/config.json pooled_projection_dim 32" in str(
        info.value
    )


def test_a_full_clip_model_config_is_read_like_transformers(tiny_model_dir, tmp_path):
    """CLIP-ViT-H-14's config.json is a CLIPModel's: the text tower's settings sit in `text_config`."""
    flat = flat_text_encoder(tiny_model_dir, tmp_path / "clip")
    text = json.loads((flat / "config.json").read_text())
    (flat / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": 32, "text_config": text}))
    check_model_dir(tiny_model_dir, flat)
    text["hidden_size"] = 48
    (flat / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": text}))
    with pytest.raises(ConfigError, match="hidden_size 48 != transformer/config.json joint_attention_dim 32"):
        check_model_dir(tiny_model_dir, flat)


def test_tensor_data_is_never_read(tiny_model_dir, monkeypatch):
    """Only the safetensors headers: no loader is called, and no more bytes are read than 8 + the header."""
    import safetensors
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data read")

    for module, name in [(safetensors, "safe_open"), (safetensors.torch, "load_file"), (safetensors.torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    read = {}

    class CountingFile:
        def __init__(self, path, mode):
            self.path, self.file = Path(path), open(path, mode)  # noqa: SIM115

        def read(self, n=-1):
            data = self.file.read(n)
            read[self.path] = read.get(self.path, 0) + len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(consistency, "open", CountingFile, raising=False)
    began = time.perf_counter()
    check_model_dir(tiny_model_dir)
    assert time.perf_counter() - began < 5
    assert len(read) == 3
    for path, n in read.items():
        header = int.from_bytes(path.read_bytes()[:8], "little")
        assert n == 8 + header < path.stat().st_size
