import json

import pytest

from meissonic_edge.errors import ConfigError, ModelDirError
from meissonic_edge.runtime.config import SchedulerConfig, TransformerConfig

MEISSONIC = {
    "_class_name": "Transformer2DModel",
    "_diffusers_version": "0.30.3",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "codebook_size": 8192,
    "downsample": True,
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 1024,
    "num_attention_heads": 8,
    "num_layers": 14,
    "num_single_layers": 28,
    "patch_size": 1,
    "pooled_projection_dim": 1024,
    "upsample": True,
    "vocab_size": 8256,
}


def test_reads_upstream_config_ignoring_meta_keys():
    config = TransformerConfig.from_dict(MEISSONIC)
    assert config.inner_dim == 1024 and config.axes_dims_rope == (16, 56, 56)
    assert config.token_stride == 32
    again = TransformerConfig.from_dict(config.to_dict())
    assert again == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 3}, "unknown key.*hidden_size"),
        ({"num_layers": None}, "num_layers must be int"),
        ({"axes_dims_rope": [16, 56]}, "axes_dims_rope must be"),
        ({"axes_dims_rope": [16, 56, 58]}, "must be even and sum to attention_head_dim"),
        ({"pooled_projection_dim": 768}, "pooled_projection_dim .768. must equal"),
        ({"vocab_size": 8192}, "vocab_size .* must exceed codebook_size"),
        ({"upsample": False}, "downsample and upsample must be equal"),
        ({"guidance_embeds": True}, "guidance_embeds=true is not supported"),
        ({"downsample": "yes"}, "downsample must be bool"),
    ],
)
def test_bad_transformer_config(change, message):
    data = dict(MEISSONIC, **change)
    with pytest.raises(ConfigError, match=message):
        TransformerConfig.from_dict(data)


def test_missing_key_is_named():
    data = {k: v for k, v in MEISSONIC.items() if k != "codebook_size"}
    with pytest.raises(ConfigError, match="missing key.*codebook_size"):
        TransformerConfig.from_dict(data)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ModelDirError, match="missing file: .*config.json"):
        TransformerConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        TransformerConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        TransformerConfig.from_json_file(tmp_path / "config.json")


def test_scheduler_config(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "Scheduler", "mask_token_id": 8255, "masking_schedule": "cosine"}))
    assert SchedulerConfig.from_json_file(path).mask_token_id == 8255
    path.write_text(json.dumps({"mask_token_id": 8255, "masking_schedule": "sigmoid"}))
    with pytest.raises(ConfigError, match="masking_schedule must be"):
        SchedulerConfig.from_json_file(path)
