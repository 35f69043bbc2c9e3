"""CoreML export: packages, the graph contract, compression, decompressed-weight fidelity and the bundle.

Core ML cannot run predictions on Linux: here the packages are checked as specs (`skip_model_load`), their
compressed ops are counted, their weights are read back and decompressed, and those weights are run in the
PyTorch reference. The prediction test at the end runs only on macOS.
"""

import sys
from collections import Counter

import numpy as np
import pytest
import torch

from meissonic_edge.errors import OptionsError
from meissonic_edge.export import coreml_compress, coreml_package, coreml_tools, parity
from meissonic_edge.export import to_coreml as exporter
from meissonic_edge.export.cases import check_cases
from meissonic_edge.export.graphs import TextEncoderGraph, VQEncoderGraph, reference_outputs
from meissonic_edge.model.checkpoint import load_vqvae
from meissonic_edge.runtime.bundle import read_manifest, verify_files
from meissonic_edge.runtime.config import TransformerConfig

WEIGHT_FILE = "Data/com.apple.CoreML/weights/weight.bin"
CHECK = (64, 64)


@pytest.fixture(scope="module")
def fp16_bundle(tiny_model_dir, tmp_path_factory):
    """fp16, two sizes: the per-size packages, the contract and the manifest."""
    out = tmp_path_factory.mktemp("coreml") / "fp16"
    return exporter.export_coreml(tiny_model_dir, out, "fp16", sizes=(64, 128), check_size=CHECK, progress=False)


@pytest.fixture(scope="module")
def int4_bundle(tiny_model_dir, tmp_path_factory):
    """int4 text encoder and transformer; the VQ graphs compressed too, as a per-graph recipe can ask."""
    out = tmp_path_factory.mktemp("coreml") / "int4"
    precision = "text_encoder=int4,transformer=int4,vq_decoder=int8,vq_encoder=palettize6"
    return exporter.export_coreml(tiny_model_dir, out, precision, sizes=(64,), check_size=CHECK, progress=False)


def convert(model_dir, out_dir, component, precision, target="iOS18", size=64, batch=2):
    """One graph in one precision, through the exporter's own recipe (what export_coreml runs per graph)."""
    config = TransformerConfig.from_json_file(model_dir / "transformer" / "config.json")
    plan = exporter.make_plan(f"{component}={precision}", target, (size,), batch, config)
    for name, load, inputs in check_cases(model_dir, None, model_dir / "tokenizer", CHECK):
        if name == component:
            return exporter.CONVERTERS[name](load, inputs, out_dir, plan, config, {"source": "tiny"})
    raise AssertionError(component)


@pytest.fixture(scope="module")
def graphs(tiny_model_dir, tmp_path_factory):
    """The text encoder and the transformer in int8 and both palettes (the fp16 and int4 bundles have the rest)."""
    out = tmp_path_factory.mktemp("coreml-graphs")
    found = {}
    for precision in ("int8", "palettize4", "palettize6"):
        folder = out / precision
        folder.mkdir()
        for component in ("text_encoder", "transformer") if precision != "palettize6" else ("transformer",):
            found[component, precision] = (folder, convert(tiny_model_dir, folder, component, precision))
    return found


def weight_bytes(package):
    return (package / WEIGHT_FILE).stat().st_size


def compressed_elements(package):
    """Weights the package stores compressed: the sizes of its constexpr ops' outputs, read from the spec."""
    ct = coreml_tools.import_coremltools()
    function = ct.utils.load_spec(str(package)).mlProgram.functions["main"]
    ops = function.block_specializations[function.opset].operations
    dims = [op.outputs[0].type.tensorType.dimensions for op in ops if op.type.startswith("constexpr_")]
    return sum(int(np.prod([d.constant.size for d in shape])) for shape in dims)


def assert_shrinks(package, fp16_package, bits):
    """fp16 -> `bits` per weight saves (2 - bits/8) bytes per compressed weight, less scales and palettes."""
    saved = weight_bytes(fp16_package) - weight_bytes(package)
    assert saved >= 0.85 * compressed_elements(package) * (2 - bits / 8), package.name


# ----------------------------------------------------------------------------------------------- the contract

TINY_CONTRACT = {  # tiny: Dt = Dp = 32, codebook 64; transformer and text encoder batch 2, VQ graphs batch 1
    "text_encoder.mlpackage": (
        [("input_ids", "int32", [2, 77])],
        [("text_embeds", "float32", [2, 32]), ("hidden_states", "float32", [2, 77, 32])],
    ),
    "transformer_64.mlpackage": (
        [
            ("tokens", "int32", [2, 4, 4]),
            ("encoder_hidden_states", "float32", [2, 77, 32]),
            ("text_embeds", "float32", [2, 32]),
            ("micro_conds", "float32", [2, 5]),
            ("timestep", "float32", [2]),
        ],
        [("logits", "float32", [2, 16, 64])],
    ),
    "transformer_128.mlpackage": (
        [
            ("tokens", "int32", [2, 8, 8]),
            ("encoder_hidden_states", "float32", [2, 77, 32]),
            ("text_embeds", "float32", [2, 32]),
            ("micro_conds", "float32", [2, 5]),
            ("timestep", "float32", [2]),
        ],
        [("logits", "float32", [2, 64, 64])],
    ),
    "vq_decoder_64.mlpackage": ([("tokens", "int32", [1, 4, 4])], [("image", "float32", [1, 3, 64, 64])]),
    "vq_decoder_128.mlpackage": ([("tokens", "int32", [1, 8, 8])], [("image", "float32", [1, 3, 128, 128])]),
    "vq_encoder_64.mlpackage": ([("image", "float32", [1, 3, 64, 64])], [("tokens", "int32", [1, 4, 4])]),
    "vq_encoder_128.mlpackage": ([("image", "float32", [1, 3, 128, 128])], [("tokens", "int32", [1, 8, 8])]),
}


@pytest.mark.slow
def test_packages_load_as_specs_with_the_contract(fp16_bundle):
    ct = coreml_tools.import_coremltools()
    for name, (inputs, outputs) in TINY_CONTRACT.items():
        io = coreml_package.package_io(fp16_bundle / name)
        assert [(f["name"], f["dtype"], f["shape"]) for f in io["inputs"]] == inputs, name
        assert [(f["name"], f["dtype"], f["shape"]) for f in io["outputs"]] == outputs, name
        model = ct.models.MLModel(str(fp16_bundle / name), skip_model_load=True)
        assert all(model.input_description[i[0]] for i in inputs) and all(
            model.output_description[o[0]] for o in outputs
        )
        meta = model.user_defined_metadata
        assert meta["meissonic_edge.precision"] == "fp16" and meta["meissonic_edge.source"] == "tiny"
        assert meta["meissonic_edge.minimum_target"] == "iOS18" and meta["meissonic_edge.mask_token_id"] == "71"
        assert model.get_spec().WhichOneof("Type") == "mlProgram"
    assert sorted(p.name for p in fp16_bundle.glob("*.mlpackage")) == sorted(TINY_CONTRACT)


@pytest.mark.slow
def test_fp16_transformer_keeps_the_models_float32_islands(fp16_bundle):
    from coremltools.proto import MIL_pb2

    ct = coreml_tools.import_coremltools()
    function = ct.utils.load_spec(str(fp16_bundle / "transformer_64.mlpackage")).mlProgram.functions["main"]
    dtypes = {}
    for op in function.block_specializations[function.opset].operations:
        dtype = MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType)
        dtypes.setdefault(op.type, Counter())[dtype] += 1
    assert dtypes["linear"] == {"FLOAT16": 40} and dtypes["scaled_dot_product_attention"] == {"FLOAT16": 3}
    assert dtypes["pow"] == {"FLOAT32": 15} and dtypes["reduce_mean"] == {"FLOAT32": 15}  # RMSNorm statistics
    assert dtypes["cos"] == dtypes["sin"] == {"FLOAT32": 2}  # sinusoidal timestep and micro-condition embeddings
    assert not any(op.startswith("constexpr_") for op in dtypes)


@pytest.mark.slow
def test_bundle_manifest(fp16_bundle):
    manifest = read_manifest(fp16_bundle)
    verify_files(fp16_bundle, manifest)  # every file of every package is checksummed
    assert manifest["backend"] == "coreml" and manifest["minimum_target"] == "iOS18"
    assert manifest["sizes"] == [[64, 64], [128, 128]] and manifest["transformer_batch"] == 2
    assert (fp16_bundle / "tokenizer" / "vocab.json").is_file()
    assert manifest["tokenizer"]["parity"]["id_agreement"]["value"] == 1.0
    assert manifest["model"]["mask_token_id"] == 71 and manifest["defaults"]["steps"] == 64
    transformer = manifest["graphs"]["transformer"]
    assert set(transformer["packages"]) == {"64", "128"}
    assert transformer["file"] == "transformer_64.mlpackage/Manifest.json"
    files = [transformer["file"], *transformer["external_data"]]
    assert any(f.startswith("transformer_128.mlpackage/") for f in files) and all(f in manifest["files"] for f in files)
    assert manifest["graphs"]["text_encoder"]["packages"]["any"]["package"] == "text_encoder.mlpackage"
    for graph in manifest["graphs"].values():
        assert graph["precision"] == "fp16" and all(c["passed"] for c in graph["parity"].values())
        for package in graph["packages"].values():
            assert package["compression"]["compressed_weights"] == 0 and package["compression"]["float16_weights"] > 0


# ----------------------------------------------------------------------------------------------- compression


@pytest.mark.slow
def test_int4_bundle_compresses_every_linear_layer_and_embedding(int4_bundle, fp16_bundle):
    manifest = read_manifest(int4_bundle)
    verify_files(int4_bundle, manifest)
    for component in ("text_encoder", "transformer"):
        graph = manifest["graphs"][component]
        assert graph["precision"] == "int4" and graph["settings"]["block_size"] == 32
        package = next(iter(graph["packages"].values()))
        assert package["compression"]["float16_weights"] == [] and package["compression"]["fallbacks"] == []
        assert graph["quantization"]["float_weight_ops"] == 0
    transformer = int4_bundle / "transformer_64.mlpackage"
    assert coreml_package.package_ops(transformer)["constexpr_blockwise_shift_scale"] == 41  # 40 linear + embedding
    assert coreml_package.package_weight_dtypes(transformer) == {"constexpr_blockwise_shift_scale:data:INT4": 41}
    assert_shrinks(transformer, fp16_bundle / "transformer_64.mlpackage", bits=4)
    assert_shrinks(int4_bundle / "text_encoder.mlpackage", fp16_bundle / "text_encoder.mlpackage", bits=4)
    # the VQ graphs asked for by name: int8 convolutions and codebook, 6-bit palettes
    decoder = int4_bundle / "vq_decoder_64.mlpackage"
    assert coreml_package.package_weight_dtypes(decoder)["constexpr_blockwise_shift_scale:data:INT8"] > 0
    assert coreml_package.package_ops(int4_bundle / "vq_encoder_64.mlpackage")["constexpr_lut_to_dense"] > 0
    assert_shrinks(decoder, fp16_bundle / "vq_decoder_64.mlpackage", bits=8)


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision, data_type, bits",
    [
        ("int8", "constexpr_blockwise_shift_scale:data:INT8", 8),
        ("palettize4", "constexpr_lut_to_dense:indices:UINT4", 4),
        ("palettize6", "constexpr_lut_to_dense:indices:UINT6", 6),
    ],
)
def test_compressed_graphs(graphs, fp16_bundle, precision, data_type, bits):
    for component, package_name, weights in (
        ("text_encoder", "text_encoder.mlpackage", 14),
        ("transformer", "transformer_64.mlpackage", 41),
    ):
        if (component, precision) not in graphs:  # 6-bit palettes: the transformer only, to keep the suite short
            continue
        folder, entry = graphs[component, precision]
        package = folder / package_name
        assert sum(coreml_package.package_weight_dtypes(package).values()) == weights  # each weight, fallbacks included
        assert data_type in coreml_package.package_weight_dtypes(package)
        report = entry["packages"][next(iter(entry["packages"]))]["compression"]
        assert report["compressed_weights"] == weights and report["float16_weights"] == []
        assert_shrinks(package, fp16_bundle / package_name, bits)
        assert all(check["passed"] for check in entry["parity"].values())
    # 16-row palettes need a multiple of 16 rows: the tiny embedding tables (72 and 1000 rows) fall back
    _, entry = graphs["transformer", precision]
    if precision.startswith("palettize"):
        assert entry["packages"]["64"]["compression"]["fallbacks"] == ["p_inner_embed_embeddings_weight"]


@pytest.mark.slow
def test_ios17_int8_uses_the_ios16_dequantize_op(tiny_model_dir, tmp_path):
    entry = convert(tiny_model_dir, tmp_path, "text_encoder", "int8", target="iOS17", batch=1)
    package = tmp_path / "text_encoder.mlpackage"
    assert coreml_package.package_ops(package)["constexpr_affine_dequantize"] == 14
    assert entry["packages"]["any"]["inputs"] == [{"name": "input_ids", "dtype": "int32", "shape": [1, 77]}]


@pytest.mark.slow
def test_package_weights_are_the_quantization_math_applied_to_the_pytorch_weights(int4_bundle, graphs, tiny_model_dir):
    """Decompressed from the package == symmetric quantization in numpy of the fp16 PyTorch weight."""
    from meissonic_edge import load_transformer

    weight = load_transformer(tiny_model_dir).single_transformer_blocks[0].proj_mlp.weight.detach()  # (128, 32)
    w16 = weight.half().numpy()
    for package, levels, block in (
        (int4_bundle / "transformer_64.mlpackage", 7, 32),
        (graphs["transformer", "int8"][0] / "transformer_64.mlpackage", 127, w16.shape[1]),
    ):
        blocks = w16.reshape(w16.shape[0], -1, block)
        peak = np.abs(blocks).max(-1, keepdims=True)
        scale = (peak - -peak) / np.float16(2 * levels)
        expected = (np.clip(np.round(blocks / scale), -levels, levels) * scale).reshape(w16.shape)
        got = coreml_package.decompressed_weights(package)["p_inner_single_transformer_blocks_0_proj_mlp_weight"]
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=1e-3, atol=1e-6)
        assert not np.array_equal(got, w16)  # really quantized


# ----------------------------------------------------------------------------------------------- fidelity

# Measured on the tiny model (random weights, widths 32-128, so one int4 block is a whole row): int8 logits
# cosine 0.99993, max-abs 0.013; int4 0.978 and 0.23; palettize6 0.998; palettize4 0.985.
FIDELITY_BOUNDS = {  # precision -> (min logits cosine, max logits max-abs relative, min text cosine)
    "int8": (0.9995, 0.05, 0.999),
    "int4": (0.95, 0.4, 0.9),
}


@pytest.mark.slow
def test_int8_and_int4_fidelity_within_bounds(int4_bundle, graphs):
    int4 = read_manifest(int4_bundle)["graphs"]
    found = {
        "int4": (int4["transformer"]["parity"], int4["text_encoder"]["parity"]),
        "int8": (graphs["transformer", "int8"][1]["parity"], graphs["text_encoder", "int8"][1]["parity"]),
    }
    for precision, (logits_cosine, logits_max_abs, text_cosine) in FIDELITY_BOUNDS.items():
        transformer, text = found[precision]
        assert transformer["logits_cosine"]["value"] >= logits_cosine, precision
        assert transformer["logits_max_abs_rel"]["value"] <= logits_max_abs, precision
        assert (
            text["hidden_states_cosine"]["value"] >= text_cosine and text["text_embeds_cosine"]["value"] >= text_cosine
        )
    assert int4["vq_decoder"]["parity"]["image_psnr_db"]["value"] >= 25  # int8 VQ decoder
    assert int4["vq_encoder"]["parity"]["token_agreement"]["value"] >= 0.9  # 6-bit VQ encoder


@pytest.mark.slow
def test_fidelity_reads_the_package_weights(int4_bundle, tiny_model_dir):
    """The fidelity module holds the package's int4 weights (not PyTorch's), the converter's folded layouts undone."""
    from meissonic_edge import load_transformer
    from meissonic_edge.export.graphs import Float16Graph

    config = TransformerConfig.from_json_file(tiny_model_dir / "transformer" / "config.json")
    expected = coreml_package.contract("transformer", 2, (64, 64), config)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator),
        "text_embeds": torch.randn(2, 32, generator=generator),
        "micro_conds": torch.tensor([[64.0, 64, 0, 0, 6]] * 2),
        "timestep": torch.tensor([3.0, 3.0]),
    }
    sample = exporter.example_inputs("transformer", inputs, 2, (64, 64), config)
    fp16 = Float16Graph(load_transformer(tiny_model_dir))
    mlmodel = exporter.convert_package(fp16, sample, "transformer", expected, "iOS18")
    sources = coreml_package.weight_sources(mlmodel._mil_program, fp16.inner, "inner.")
    assert len(sources) == 41
    folded = {s.param: s.axes for name, s in sources.items() if not name.startswith("p_")}
    assert folded == {  # 1x1 and 2x2 convolutions computed as matrix products: new constants
        "embed.conv.weight": None,
        "down_block.downsample.conv.weight": None,
        "up_block.upsample.conv.weight": (2, 3, 1, 0),
        "mlm_layer.conv1.weight": None,
        "mlm_layer.conv2.weight": None,
    }
    reference, module = load_transformer(tiny_model_dir), load_transformer(tiny_model_dir)
    coreml_package.load_package_weights(module, int4_bundle / "transformer_64.mlpackage", sources)
    for name in ("embed.embeddings.weight", "mlm_layer.conv2.weight", "up_block.upsample.conv.weight"):
        got, ref = dict(module.named_parameters())[name].detach(), dict(reference.named_parameters())[name].detach()
        assert not torch.equal(got, ref) and torch.allclose(got, ref, atol=0.2 * float(ref.abs().max()))


def test_trace_constant_finds_permuted_and_scaled_parameters():
    generator = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(4, 6, 2, 2, generator=generator), "b": torch.randn(96, generator=generator)}
    value = (-2 * params["a"].permute(2, 3, 1, 0).reshape(24, 4)).half().numpy()
    source = coreml_package.trace_constant(value, params)
    assert source == coreml_package.Source("a", (2, 3, 1, 0), pytest.approx(-2.0, rel=1e-3))
    assert coreml_package.trace_constant(np.ones((5, 5), np.float16), params) is None


def test_kmeans_palette():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((16, 64)).astype(np.float16)
    lut, indices = coreml_compress.kmeans_palette(4)(weights)
    assert lut.shape == (16,) and lut.dtype == np.float16 and indices.shape == (weights.size,)
    assert indices.dtype == np.uint8 and indices.max() < 16 and np.all(np.diff(lut.astype(np.float32)) >= 0)
    error = np.abs(lut[indices].reshape(weights.shape).astype(np.float32) - weights).mean()
    uniform = np.linspace(weights.min(), weights.max(), 16).astype(np.float32)
    uniform_error = np.abs(uniform[np.abs(weights.ravel()[:, None] - uniform).argmin(1)] - weights.ravel()).mean()
    assert error < 0.7 * uniform_error
    lut2, indices2 = coreml_compress.kmeans_palette(4)(weights)
    assert np.array_equal(lut, lut2) and np.array_equal(indices, indices2)  # deterministic
    few = np.array([[0.5, -1.0, 0.5]], dtype=np.float16)  # fewer distinct values than entries: exact
    lut, indices = coreml_compress.kmeans_palette(6)(few)
    assert np.array_equal(lut[indices], few.ravel()) and lut.shape == (64,)


def test_dropping_aliases_keeps_the_text_encoders_outputs(tiny_model_dir):
    """coremltools cannot translate `aten.alias`: the rewrite that removes them must not change the graph."""
    from meissonic_edge.model.checkpoint import load_text_encoder

    graph = TextEncoderGraph(load_text_encoder(tiny_model_dir)).eval()
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    program = torch.export.export(graph, (ids,)).run_decompositions({})
    assert any(n.target == torch.ops.aten.alias.default for n in program.graph.nodes)
    exporter.drop_aliases(program)
    assert not any(n.target == torch.ops.aten.alias.default for n in program.graph.nodes)
    other = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for got, ref in zip(program.module()(other), graph(other), strict=True):
            torch.testing.assert_close(got, ref)


def test_vq_encoder_graph_converts_argmin_like_diffusers(tiny_model_dir):
    """The VQ encoder wrapper (argmin over distances, which coremltools converts) picks diffusers' tokens."""
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    graph = VQEncoderGraph(load_vqvae(tiny_model_dir)).eval()
    with torch.no_grad():
        assert np.array_equal(graph(image).numpy(), reference_outputs("vq_encoder", graph, {"image": image})[0])


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "int4", "minimum_target": "iOS17"}, "int4 per-block weights (text_encoder) need iOS18"),
        ({"precision": "transformer=int4", "minimum_target": "macOS14"}, "need iOS18 or macOS15"),
        ({"minimum_target": "iOS16"}, "unknown minimum target 'iOS16'"),
        ({"precision": "fp32"}, "unknown CoreML precision 'fp32'"),
        ({"precision": "unet=int8"}, "unknown graph 'unet'"),
        ({"sizes": (512, 72)}, "must be a positive multiple of 32"),
        ({"sizes": ("512x100",)}, "width must be a positive multiple of 32"),
        ({"sizes": (512, 512)}, "image sizes repeat"),
        ({"transformer_batch": 3}, "transformer batch must be 2"),
        ({"check_size": (50, 64)}, "height must be a positive multiple of 32"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(tiny_model_dir, tmp_path, kwargs, message):
    out = tmp_path / "bundle"
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        exporter.export_coreml(tiny_model_dir, out, progress=False, **kwargs)
    assert "\n" not in str(error.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_plain_precision_leaves_the_vq_graphs_fp16():
    assert exporter.parse_precision("int4") == {
        "text_encoder": "int4",
        "transformer": "int4",
        "vq_decoder": "fp16",
        "vq_encoder": "fp16",
    }
    assert exporter.parse_sizes("512,512x768") == ((512, 512), (512, 768))
    assert exporter.parse_sizes((512, 1024)) == ((512, 512), (1024, 1024))
    assert exporter.parse_target("macos15") == "macOS15"


# ----------------------------------------------------------------------------------------------- macOS


def prediction_feeds(component: str, shapes: dict, inputs: dict, decoder) -> dict:
    """Inputs of a package's fixed shapes: the check inputs, or tokens and decoded images of that size."""
    generator = torch.Generator().manual_seed(0)
    if component == "text_encoder":
        return {"input_ids": inputs["input_ids"][: shapes["input_ids"][0]]}
    if component == "transformer":
        feeds = {name: value[: shapes[name][0]] for name, value in inputs.items() if name != "tokens"}
        return {"tokens": torch.randint(0, 64, shapes["tokens"], generator=generator), **feeds}
    if component == "vq_decoder":
        return {"tokens": torch.randint(0, 64, shapes["tokens"], generator=generator)}
    _, _, height, width = shapes["image"]
    with torch.no_grad():  # a decoded image is a realistic input for the encoder
        return {"image": decoder(torch.randint(0, 64, (1, height // 16, width // 16), generator=generator))}


@pytest.mark.slow
@pytest.mark.skipif(
    sys.platform != "darwin", reason="Core ML predictions need macOS: coremltools has no runtime on Linux"
)
def test_packages_predict_like_pytorch_on_macos(fp16_bundle, int4_bundle, tiny_model_dir):  # pragma: no cover
    """On a Mac: run every package (CPU, fp16 arithmetic) and compare with PyTorch, thresholds of the precision."""
    from meissonic_edge.export.graphs import VQDecoderGraph

    ct = coreml_tools.import_coremltools()
    decoder = VQDecoderGraph(load_vqvae(tiny_model_dir)).eval()
    for bundle in (fp16_bundle, int4_bundle):
        graphs = read_manifest(bundle)["graphs"]
        for component, load, inputs in check_cases(tiny_model_dir, None, tiny_model_dir / "tokenizer", CHECK):
            module = load()
            for package in graphs[component]["packages"].values():
                shapes = {spec["name"]: spec["shape"] for spec in package["inputs"]}
                feeds = prediction_feeds(component, shapes, inputs, decoder)
                refs = reference_outputs(component, module, feeds)
                model = ct.models.MLModel(str(bundle / package["package"]), compute_units=ct.ComputeUnit.CPU_ONLY)
                types = {
                    spec["name"]: np.int32 if spec["dtype"] == "int32" else np.float32 for spec in package["inputs"]
                }
                out = model.predict({name: value.numpy().astype(types[name]) for name, value in feeds.items()})
                got = [np.asarray(out[spec["name"]]) for spec in package["outputs"]]
                checks = coreml_package.fidelity_checks(component, got, refs, graphs[component]["precision"])
                parity.require(f"{package['package']} on Core ML", checks)
