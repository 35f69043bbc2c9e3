"""int8 / int4 bundles: every linear layer quantized, recipes checked, fidelity within the gates."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from torch import nn

from meissonic_edge import load_transformer
from meissonic_edge.errors import OptionsError
from meissonic_edge.export.parity import MIN_COSINE
from meissonic_edge.export.to_onnx import export_onnx
from meissonic_edge.model.transformer import Downsample, PointwiseConv, Upsample
from meissonic_edge.quant.quantize import (
    ComponentPrecision,
    float_weights_left,
    parse_recipe,
    quantize_graph,
)
from meissonic_edge.runtime.bundle import read_manifest
from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline


@pytest.fixture(scope="session")
def int8_bundle(tiny_model_dir, tmp_path_factory):
    return export_onnx(
        tiny_model_dir, tmp_path_factory.mktemp("q") / "int8", precision="int8", progress=False, tiled_decoder=False
    )


@pytest.fixture(scope="session")
def int4_bundle(tiny_model_dir, tmp_path_factory):
    return export_onnx(
        tiny_model_dir, tmp_path_factory.mktemp("q") / "int4", precision="int4", progress=False, tiled_decoder=False
    )


def linear_layers(model_dir) -> int:
    """Every matrix the transformer multiplies by: linears, 1x1 convs, the 2x2 down/up convolutions."""
    kinds = (nn.Linear, PointwiseConv, Downsample, Upsample)
    return sum(isinstance(m, kinds) for m in load_transformer(model_dir).modules())


def ops(path):
    return [n for n in onnx.load(str(path)).graph.node]


def test_int4_transformer_quantizes_every_linear_layer(int4_bundle, tiny_model_dir):
    nodes = ops(int4_bundle / "transformer.onnx")
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == linear_layers(tiny_model_dir)
    assert {n.name.split("/")[1] for n in nbits} >= {
        "mlm_layer.conv2",
        "embed.conv",
        "transformer_blocks.0.norm1.linear",
    }
    assert sum(n.op_type == "GatherBlockQuantized" for n in nodes) == 1  # the token embedding
    assert float_weights_left(onnx.load(str(int4_bundle / "transformer.onnx"))) == []
    entry = read_manifest(int4_bundle)["graphs"]["transformer"]
    assert entry["precision"] == "int4" and entry["quantization"]["float_weight_ops"] == 0
    assert entry["settings"] == {
        "algorithm": "rtn",
        "block_size": 32,
        "symmetric": True,
        "accuracy_level": 4,
        "int8_layers": [],
        "float_layers": [],
    }


def test_int8_transformer_quantizes_every_linear_layer(int8_bundle, tiny_model_dir):
    model = onnx.load(str(int8_bundle / "transformer.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == linear_layers(tiny_model_dir)
    assert any(n.name == "/embed.embeddings/GatherInt8" for n in model.graph.node)
    assert float_weights_left(model) == []
    manifest = read_manifest(int8_bundle)
    assert manifest["graphs"]["vq_decoder"]["precision"] == "fp32"  # convolutional: plain int8 leaves it
    assert manifest["recipe"]["components"]["transformer"]["precision"] == "int8"


@pytest.mark.parametrize("bundle_name", ["int8_bundle", "int4_bundle"])
def test_quantized_bundles_generate_and_stay_close_to_fp32(bundle_name, request, tiny_bundle):
    bundle = request.getfixturevalue(bundle_name)
    precision = bundle_name.split("_")[0]
    for graph in ("text_encoder", "transformer"):
        parity = read_manifest(bundle)["graphs"][graph]["parity"]
        cosines = [c["value"] for name, c in parity.items() if name.endswith("cosine")]
        assert cosines and min(cosines) >= MIN_COSINE[precision]
    settings = dict(steps=4, seed=0, height=64, width=64)
    quantized = OnnxPipeline(bundle).generate("a red circle", **settings)
    reference = OnnxPipeline(tiny_bundle).generate("a red circle", **settings)
    assert quantized.images[0].size == (64, 64)
    assert quantized.tokens.shape == reference.tokens.shape


def test_quantized_bundle_is_smaller(int8_bundle, int4_bundle, tiny_bundle):
    size = {b: (b / "transformer.onnx").stat().st_size for b in (tiny_bundle, int8_bundle, int4_bundle)}
    assert size[int4_bundle] < size[int8_bundle] < size[tiny_bundle]


@pytest.fixture
def fp32_transformer(tiny_bundle, tmp_path):
    path = tmp_path / "transformer.onnx"
    shutil.copy(tiny_bundle / "transformer.onnx", path)
    return path


def transformer_feed(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, 72, (2, 4, 6)).astype(np.int64),
        "encoder_hidden_states": rng.normal(size=(2, 77, 32)).astype(np.float32),
        "text_embeds": rng.normal(size=(2, 32)).astype(np.float32),
        "micro_conds": np.array([[96, 64, 0, 0, 6]] * 2, dtype=np.float32),
        "timestep": np.array([3, 3], dtype=np.float32),
    }


def run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.mark.parametrize("algorithm", ["hqq", "gptq"])
def test_int4_algorithms(fp32_transformer, tiny_bundle, algorithm):
    feed = transformer_feed()
    reference = run(tiny_bundle / "transformer.onnx", feed)
    settings = ComponentPrecision(precision="int4", algorithm=algorithm)
    calibration = [transformer_feed(seed) for seed in range(3)] if algorithm == "gptq" else None
    report = quantize_graph(fp32_transformer, settings, "transformer", calibration)
    assert report["quantized_ops"]["MatMulNBits"] == 40 and report["float_weight_ops"] == 0
    assert cosine(run(fp32_transformer, feed), reference) >= MIN_COSINE["int4"]


def test_gptq_needs_calibration(fp32_transformer):
    with pytest.raises(OptionsError, match="GPTQ needs a calibration set.*empty"):
        quantize_graph(fp32_transformer, ComponentPrecision(precision="int4", algorithm="gptq"), "transformer", [])


def test_sensitive_layers_stay_at_8_bits(fp32_transformer):
    settings = ComponentPrecision(precision="int4", int8_layers=("mlm_layer.*", "transformer_blocks.0.attn.to_q"))
    quantize_graph(fp32_transformer, settings, "transformer")
    bits = {
        n.name.split("/")[1]: next(a.i for a in n.attribute if a.name == "bits")
        for n in ops(fp32_transformer)
        if n.op_type == "MatMulNBits"
    }
    assert bits["mlm_layer.conv1"] == bits["mlm_layer.conv2"] == bits["transformer_blocks.0.attn.to_q"] == 8
    assert bits["transformer_blocks.0.attn.to_k"] == 4 and list(bits.values()).count(8) == 3


def test_float_layers_are_left_alone_and_reported(fp32_transformer):
    settings = ComponentPrecision(precision="int8", float_layers=("mlm_layer.conv2",))
    report = quantize_graph(fp32_transformer, settings, "transformer")
    assert report["float_weight_op_names"] == ["/mlm_layer.conv2/MatMul"]


def test_recipe_naming_a_missing_layer_is_an_error(fp32_transformer, tiny_model_dir, tmp_path):
    message = "layer 'transformer_blocks.99.\\*', which matches no layer of the transformer graph"
    with pytest.raises(OptionsError, match=message):
        quantize_graph(
            fp32_transformer, ComponentPrecision("int4", int8_layers=("transformer_blocks.99.*",)), "transformer"
        )
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"components": {"transformer": {"precision": "int8", "float_layers": ["nope.*"]}}}))
    with pytest.raises(OptionsError, match="'nope.\\*'"):
        export_onnx(tiny_model_dir, tmp_path / "bundle", precision=str(recipe), progress=False)
    assert not (tmp_path / "bundle").exists()


def test_recipe_parsing(tmp_path):
    recipe = parse_recipe("int4")
    assert recipe["transformer"].precision == "int4" and recipe["vq_decoder"].precision == "fp32"
    mixed = parse_recipe("transformer=int4,text_encoder=int8,vq_decoder=fp16")
    assert [mixed[c].precision for c in ("transformer", "text_encoder", "vq_decoder", "vq_encoder")] == [
        "int4",
        "int8",
        "fp16",
        "fp32",
    ]
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {"name": "x", "default": "int8", "components": {"transformer": {"precision": "int4", "block_size": 64}}}
        )
    )
    from_file = parse_recipe(str(path))
    assert from_file.name == "x" and from_file["transformer"].block_size == 64
    assert from_file["text_encoder"].precision == "int8" and from_file["vq_decoder"].precision == "fp32"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("int3", "unknown precision 'int3'"),
        ("transformer=int5", "unknown precision 'int5' for transformer"),
        ("unet=int4", "unknown precision key 'unet'"),
        ("vq_decoder=int4", "vq_decoder is convolutional and int4"),
        ("missing.json", "recipe file not found"),
    ],
)
def test_bad_precision_specs(spec, message):
    with pytest.raises(OptionsError, match=message):
        parse_recipe(spec)


@pytest.mark.parametrize(
    "component, message",
    [
        ({"precision": "int4", "algorithm": "awq"}, "unknown int4 algorithm 'awq'"),
        ({"precision": "int4", "block_size": 48}, "block_size must be"),
        ({"precision": "int4", "calibration_steps": 0}, "calibration set would be empty"),
        ({"precision": "int4", "colour": "red"}, "unknown setting.*colour"),
        ({"precision": "int4", "symmetric": "yes"}, "symmetric must be bool"),
    ],
)
def test_bad_recipe_files(tmp_path, component, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"components": {"transformer": component}}))
    with pytest.raises(OptionsError, match=message):
        parse_recipe(str(path))


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "export" / "recipes").glob("*.json"))
    assert recipes
    for path in recipes:
        recipe = parse_recipe(str(path))
        assert recipe["transformer"].precision in ("int8", "int4"), path.name
