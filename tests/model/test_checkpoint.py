"""Loading model directories: strict, local, safetensors only, with errors that name the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meissonic_edge import load_model_dir, load_transformer
from meissonic_edge.errors import ConfigError, ModelDirError, WeightsError
from meissonic_edge.model.checkpoint import load_text_encoder


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_loads_every_component(tiny_model_dir):
    c = load_model_dir(tiny_model_dir)
    assert c.scheduler.mask_token_id == 71
    assert c.transformer.config.downsample
    assert not c.transformer.training
    assert c.vqvae.config.num_vq_embeddings == c.transformer.config.codebook_size
    ids = c.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)


def test_transformer_folder_itself_loads(tiny_model_dir):
    a = load_transformer(tiny_model_dir)
    b = load_transformer(tiny_model_dir / "transformer")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_fp16_checkpoint_is_loaded_as_fp32(model_copy):
    path = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(path).items()}, path)
    model = load_transformer(model_copy)
    assert next(model.parameters()).dtype == torch.float32


def test_missing_paths_are_named(model_copy, tmp_path):
    with pytest.raises(ModelDirError, match="model directory not found: .*nowhere"):
        load_model_dir(tmp_path / "nowhere")
    shutil.rmtree(model_copy / "vqvae")
    with pytest.raises(ModelDirError, match="vqvae/ folder not found"):
        load_model_dir(model_copy)
    (model_copy / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelDirError, match="missing file: .*scheduler_config.json"):
        load_model_dir(model_copy)


@pytest.mark.parametrize("component, stem", [("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")])
def test_pickle_checkpoints_are_refused(model_copy, component, stem):
    folder = model_copy / component
    (folder / f"{stem}.safetensors").rename(folder / f"{stem}.bin")
    with pytest.raises(WeightsError, match=rf"{stem}.bin is a pickle checkpoint.*safetensors.*save_file"):
        load_model_dir(model_copy)


def test_tensor_shape_mismatch_is_named(model_copy):
    config_path = model_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = 80
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        WeightsError, match=r"embed.embeddings.weight has shape \[72, 32\] but the config implies \[80, 32\]"
    ):
        load_transformer(model_copy)


def test_missing_and_unexpected_tensors_are_named(model_copy):
    path = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.pop("mlm_layer.conv2.weight")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, path)
    with pytest.raises(WeightsError, match="1 missing .e.g. mlm_layer.conv2.weight.; 1 unexpected .e.g. extra.weight"):
        load_transformer(model_copy)


def test_unknown_config_key_is_named(model_copy):
    config_path = model_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_heads"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unknown key.*num_heads"):
        load_model_dir(model_copy)


def test_not_safetensors_is_an_error(model_copy):
    (model_copy / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_transformer(model_copy)


def test_text_encoder_from_another_directory(tiny_model_dir, tmp_path):
    """Upstream takes CLIP-ViT-H-14 from elsewhere; that folder is flat (model and tokenizer together)."""
    flat = tmp_path / "clip"
    shutil.copytree(tiny_model_dir / "text_encoder", flat)
    for f in (tiny_model_dir / "tokenizer").iterdir():
        shutil.copy(f, flat / f.name)
    model = load_text_encoder(tiny_model_dir, flat)
    reference = load_text_encoder(tiny_model_dir)
    ids = torch.arange(77)[None] % 50
    torch.testing.assert_close(model(ids).text_embeds, reference(ids).text_embeds)
    components = load_model_dir(tiny_model_dir, text_encoder_dir=flat)
    assert components.tokenizer.vocab_size == reference.config.vocab_size or components.tokenizer is not None
