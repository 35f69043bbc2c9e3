import json
import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random `tiny` model directory in the upstream layout (feature compression on)."""
    from meissonic_edge.model.presets import make_random

    return make_random(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_flat_model_dir(tmp_path_factory):
    """The `tiny` preset without feature compression (no down/upsampling of the token grid)."""
    from meissonic_edge.model.presets import make_random

    return make_random(tmp_path_factory.mktemp("models") / "tiny-flat", "tiny", seed=1, feature_compression=False)


def _bundle(tmp_path_factory, model_dir, name, precision="fp32", tiled_decoder=True):
    from meissonic_edge.export.to_onnx import export_onnx

    folder = tmp_path_factory.mktemp("bundles") / name
    return export_onnx(model_dir, folder, precision=precision, progress=False, tiled_decoder=tiled_decoder)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir, tmp_path_factory):
    """The tiny model exported to an fp32 ONNX bundle."""
    return _bundle(tmp_path_factory, tiny_model_dir, "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_fp16_bundle(tiny_model_dir, tmp_path_factory):
    return _bundle(tmp_path_factory, tiny_model_dir, "tiny-fp16", "fp16", tiled_decoder=False)


@pytest.fixture(scope="session")
def upstream_flat_bundle(upstream_layout_model_dir, tmp_path_factory):
    """A model saved in upstream's exact layout, without feature compression, exported to fp32."""
    return _bundle(tmp_path_factory, upstream_layout_model_dir, "upstream-flat-fp32", tiled_decoder=False)


@pytest.fixture(scope="session")
def upstream_layout_model_dir(tiny_flat_model_dir, tmp_path_factory):
    """The tiny-flat model with its transformer replaced by one saved by upstream's own class layout
    (diffusers save_pretrained: upstream file names, `_class_name`, `_diffusers_version`)."""
    from upstream_oracle import random_upstream_model

    root = tmp_path_factory.mktemp("upstream") / "model"
    shutil.copytree(tiny_flat_model_dir, root)
    shutil.rmtree(root / "transformer")
    config = json.loads((tiny_flat_model_dir / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    random_upstream_model(5, **config).save_pretrained(root / "transformer")
    assert "_diffusers_version" in json.loads((root / "transformer" / "config.json").read_text())
    return root
