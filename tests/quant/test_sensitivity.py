import fnmatch
import json

import numpy as np
import pytest
import torch

from meissonic_edge.errors import MeissonicError, OptionsError
from meissonic_edge.model.checkpoint import load_transformer
from meissonic_edge.quant import recipe_writer, sensitivity
from meissonic_edge.quant.quantize import load_recipe_file
from meissonic_edge.quant.recipe_writer import Sizes, int4_bytes, int8_bytes, write_recipe
from meissonic_edge.quant.sensitivity import (
    ALL_GROUPS,
    QUANTIZED_LAYERS,
    fake_quantize,
    layer_groups,
    measure_sensitivity,
)

PROMPTS = ["a red fox in the snow", "a lighthouse at sunset"]


def matmul_model(weight: np.ndarray):
    """A one-node ONNX graph y = x @ weight, weight (K, N) as the exporter writes linear layers."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"], name="/layer/MatMul")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight, "weight")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_matches_onnxruntime_matmul_nbits(bits):
    import onnxruntime as ort
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((80, 24)).astype(np.float32)  # K = 80: the last block of each column is padded
    weight[:, 3] *= 50.0  # one column far larger than the others: scales are per column block
    weight[:32, 5] = 0.0  # an all-zero block: scale 0
    weight[10, 7] = -9.0  # a negative extreme: it, not its mirror image, must come out exact
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, accuracy_level=None)
    quantizer = nbits.MatMulNBitsQuantizer(matmul_model(weight), algo_config=config)
    quantizer.process()
    graph = quantizer.model.model
    assert [node.op_type for node in graph.graph.node] == ["MatMulNBits"]
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    dequantized = session.run(None, {"x": np.eye(80, dtype=np.float32)})[0]  # identity in: the stored weights out
    ours = fake_quantize(torch.from_numpy(weight.T.copy()), block_size=32, bits=bits).T.numpy()  # (N, K) rows
    np.testing.assert_array_equal(ours, dequantized)
    assert ours[10, 7] == -9.0
    x = rng.standard_normal((5, 80)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ ours, rtol=1e-5, atol=1e-4)


def test_weight_matrix_round_trips_for_every_layer_kind(tiny_model_dir):
    model = load_transformer(tiny_model_dir)
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    assert {type(m).__name__ for m in layers} >= {"Linear", "PointwiseConv", "Conv2d", "ConvTranspose2d", "Embedding"}
    for layer in layers:
        before = layer.weight.detach().clone()
        sensitivity.set_weight_matrix(layer, sensitivity.weight_matrix(layer))
        assert torch.equal(layer.weight, before)
    up = model.up_block.upsample.conv  # blocks must run along Cin, the transposed convolution's first axis
    assert sensitivity.weight_matrix(up).shape == (4 * up.weight.shape[1], up.weight.shape[0])


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_flat_model_dir"])
def test_staged_forward_is_the_model_forward(fixture, request):
    model = load_transformer(request.getfixturevalue(fixture))
    config = model.config
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randint(0, config.vocab_size, (3, 4, 6), generator=g),
        torch.randn(3, 77, config.joint_attention_dim, generator=g),
        torch.randn(3, config.pooled_projection_dim, generator=g),
        torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]] * 3),
        torch.tensor([3.0, 1.0, 0.0]),
    )
    staged = sensitivity.StagedForward(model)
    with torch.inference_mode():
        expected = model(*inputs)
        entering = []
        got = staged.run(staged.stem(*inputs), keep=entering)
        resumed = staged.run(entering[2], start=3)  # from a cached stage: the same numbers
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(resumed, expected, rtol=0, atol=0)


def test_groups_cover_every_parameter_once_with_valid_patterns(tiny_model_dir):
    model = load_transformer(tiny_model_dir)
    groups = layer_groups(model)
    config = model.config
    names = [g.name for g in groups]
    assert names == [
        "embed",
        "cond_embed+time_text_embed",
        "context_embedder",
        "down_block",
        "project_to_hidden",
        *(f"transformer_blocks.{i}" for i in range(config.num_layers)),
        *(f"single_transformer_blocks.{i}" for i in range(config.num_single_layers)),
        "project_from_hidden",
        "up_block",
        "mlm_layer",
    ]
    layers = {path: m for path, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}
    assert sum(g.params for g in groups) == sum(m.weight.numel() for m in layers.values())
    assert sum(g.params + g.float_params for g in groups) == sum(p.numel() for p in model.parameters())
    # node module paths of the exported graph: the layers', and the down/up blocks' (their matmul is theirs)
    paths = list(layers) + ["down_block.downsample", "up_block.upsample"]
    for path in paths:
        owners = [g.name for g in groups if any(fnmatch.fnmatchcase(path, p) for p in g.patterns)]
        assert len(owners) == 1, (path, owners)
    for group in groups:
        for pattern in group.patterns:
            assert any(fnmatch.fnmatchcase(path, pattern) for path in group.layer_paths), pattern
    assert dict(zip(names, (g.patterns for g in groups), strict=True))["context_embedder"] == ("context_embedder",)


def test_groups_without_feature_compression(tiny_flat_model_dir):
    names = [g.name for g in layer_groups(load_transformer(tiny_flat_model_dir))]
    assert "down_block" not in names and "up_block" not in names


@pytest.fixture(scope="module")
def measured(tiny_model_dir):
    return measure_sensitivity(tiny_model_dir, steps=3, prompts=PROMPTS, progress=False)


def test_measurement_covers_every_group(measured, tiny_model_dir):
    groups = layer_groups(load_transformer(tiny_model_dir))
    singles = [r for r in measured if r.scope == "group"]
    assert [r.name for r in singles] == [g.name for g in groups]
    assert [r.patterns for r in singles] == [g.patterns for g in groups]
    combined = measured[-1]
    assert combined.scope == "all" and combined.name == ALL_GROUPS
    assert combined.params == sum(r.params for r in singles) == sum(g.params for g in groups)
    for r in measured:
        assert np.isfinite(r.kl) and r.kl >= 0 and 0 <= r.agreement <= 1, r
    assert max(r.kl for r in singles) > 0
    # Damage adds up, roughly: every group at once hurts at least about as much as the worst alone.
    assert combined.kl >= 0.5 * max(r.kl for r in singles)
    assert combined.agreement <= max(r.agreement for r in singles)


def test_unquantized_measurement_is_exactly_zero(tiny_model_dir, monkeypatch):
    """With quantization switched off, every cached re-run must reproduce the reference logits."""
    monkeypatch.setattr(sensitivity, "fake_quantize", lambda matrix, block_size=32, bits=4: matrix.clone())
    for r in measure_sensitivity(tiny_model_dir, steps=2, prompts=PROMPTS[:1], progress=False):
        assert r.kl < 1e-12 and r.agreement == 1.0, r


def test_recipe_loads_and_respects_the_budget(measured, tmp_path):
    singles = [r for r in measured if r.scope == "group"]
    sizes = Sizes.of(singles, 32)
    budget = (sizes.all_int4 + sizes.all_int8) // 2
    out = tmp_path / "mixed.json"
    recipe = write_recipe(measured, out, budget_mb=budget / recipe_writer.MB, measurement={"steps": 3})

    loaded = load_recipe_file(out)
    transformer = loaded["transformer"]
    assert (transformer.precision, transformer.algorithm, transformer.block_size) == ("int4", "rtn", 32)
    assert transformer.symmetric and loaded["text_encoder"].precision == "int8"
    assert list(transformer.int8_layers) == recipe["components"]["transformer"]["int8_layers"]
    assert json.loads(out.read_text()) == recipe

    report = json.loads((tmp_path / "mixed.sensitivity.json").read_text())
    chosen = [g for g in report["groups"] if g["precision"] == "int8"]
    estimate = sizes.all_int4 + sum(int8_bytes(g["params"], 32) - int4_bytes(g["params"], 32) for g in chosen)
    assert 0 < len(chosen) < len(singles)
    assert estimate <= budget and report["estimated_mb"] == pytest.approx(estimate / recipe_writer.MB)
    assert transformer.int8_layers == tuple(p for g in chosen for p in g["patterns"])
    # the most sensitive group goes first
    top = max(singles, key=lambda r: r.kl)
    assert report["groups"][0]["name"] == top.name and report["groups"][0]["precision"] == "int8"
    assert transformer.int8_layers[: len(top.patterns)] == top.patterns
    table = (tmp_path / "mixed.sensitivity.md").read_text()
    assert all(f"| {r.name} |" in table for r in singles) and "All groups at int4 at once" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mixed.json",
        "mixed.sensitivity.json",
        "mixed.sensitivity.md",
    ]
    # the report holds the measurements: another budget needs no new measurement
    assert recipe_writer.read_report(tmp_path / "mixed.sensitivity.json") == measured
    with pytest.raises(OptionsError, match="not a sensitivity report"):
        recipe_writer.read_report(out)


def test_budget_for_exactly_the_top_group_takes_it_alone(measured, tmp_path):
    singles = [r for r in measured if r.scope == "group"]
    sizes = Sizes.of(singles, 32)
    top = max(singles, key=lambda r: r.kl)
    budget = sizes.all_int4 + int8_bytes(top.params, 32) - int4_bytes(top.params, 32)
    recipe = write_recipe(measured, tmp_path / "top.json", budget_mb=(budget + 0.5) / recipe_writer.MB)
    assert recipe["components"]["transformer"]["int8_layers"] == list(top.patterns)

    everything = write_recipe(measured, tmp_path / "all.json", budget_ratio=1.0)
    assert len(everything["components"]["transformer"]["int8_layers"]) == sum(len(r.patterns) for r in singles)
    just_int4 = write_recipe(measured, tmp_path / "int4.json", budget_mb=(sizes.all_int4 + 1) / recipe_writer.MB)
    assert just_int4["components"]["transformer"]["int8_layers"] == []
    load_recipe_file(tmp_path / "int4.json")


def test_budget_below_all_int4_names_the_minimum(measured, tmp_path, tiny_model_dir):
    sizes = Sizes.of([r for r in measured if r.scope == "group"], 32)
    with pytest.raises(OptionsError, match=r"below this transformer's all-int4 size.*--budget-mb [0-9.]+") as e:
        write_recipe(measured, tmp_path / "r.json", budget_mb=0.001)
    assert "\n" not in str(e.value) and f"{sizes.all_int4 / recipe_writer.MB:.2f}" in str(e.value)
    with pytest.raises(OptionsError, match="all-int4"):
        write_recipe(measured, tmp_path / "r.json", budget_ratio=0.01)
    with pytest.raises(OptionsError, match="all-int4"):  # checked from the config alone, before measuring
        recipe_writer.check_budget(tiny_model_dir, budget_ratio=0.01)
    assert recipe_writer.check_budget(tiny_model_dir, budget_ratio=0.3) == int(0.3 * sizes.fp32)
    assert recipe_writer.model_sizes(tiny_model_dir) == sizes
    with pytest.raises(OptionsError, match="positive"):
        write_recipe(measured, tmp_path / "r.json", budget_mb=-1)
    with pytest.raises(OptionsError, match=r"\.json"):
        write_recipe(measured, tmp_path / "recipe.txt")
    with pytest.raises(OptionsError, match="does not exist"):
        write_recipe(measured, tmp_path / "missing" / "r.json")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"size": 100}, "size must be a positive multiple of 32"),
        ({"size": 16}, "size must be a positive multiple of 32"),
        ({"prompts": []}, "prompt list is empty"),
        ({"block_size": 48}, "block size must be one of"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_model_dir, kwargs, message):
    with pytest.raises(OptionsError, match=message) as e:
        measure_sensitivity(tiny_model_dir, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_missing_model_dir(tmp_path):
    with pytest.raises(MeissonicError, match="not found"):
        measure_sensitivity(tmp_path / "nowhere", progress=False)
    with pytest.raises(MeissonicError, match="not found"):
        recipe_writer.check_budget(tmp_path / "nowhere")


def test_command(tiny_model_dir, tmp_path, capsys):
    import argparse

    from meissonic_edge.cli.args import Parser
    from meissonic_edge.cli.sensitivity import add_sensitivity_parser

    parser = Parser(prog="meissonic-edge")
    add_sensitivity_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    out = tmp_path / "mixed.json"
    args = parser.parse_args(
        ["quant-sensitivity", str(tiny_model_dir), "--out", str(out), "--steps", "2", "--prompts", "a fox", "--quiet"]
    )
    assert args.budget_ratio == 0.3 and args.budget_mb is None and args.size == 256
    args.func(args)
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "all groups at once" in printed
    load_recipe_file(out)

    args = parser.parse_args(["quant-sensitivity", str(tiny_model_dir), "--out", str(out), "--budget-ratio", "0.01"])
    with pytest.raises(OptionsError, match="all-int4"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["quant-sensitivity", "m", "--out", "r.json", "--budget-mb", "5", "--budget-ratio", "0.2"])
    assert "not allowed with" in capsys.readouterr().err
    assert isinstance(parser, argparse.ArgumentParser)


def test_fake_quantized_model_is_onnxruntime_int4_graph(tiny_model_dir, tmp_path):
    """Every group at int4 in PyTorch == the exported transformer quantized to int4 (RTN, fp32 arithmetic) by
    onnxruntime: the layouts of the embedding, 1x1, 2x2 and transposed convolutions all agree."""
    import logging
    import warnings

    import onnxruntime as ort

    from meissonic_edge.quant.quantize import ComponentPrecision, quantize_graph

    model = load_transformer(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "tokens": torch.randint(0, 72, (2, 8, 8), generator=g),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
        "text_embeds": torch.randn(2, 32, generator=g),
        "micro_conds": torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]] * 2),
        "timestep": torch.tensor([3.0, 0.0]),
    }
    graph = tmp_path / "transformer.onnx"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():  # a plain static export: only the numbers matter here
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, tuple(inputs.values()), input_names=list(inputs), dynamo=True)
    program.save(str(graph))
    report = quantize_graph(graph, ComponentPrecision(precision="int4", accuracy_level=0), "transformer")
    assert report["float_weight_ops"] == 0 and "GatherBlockQuantized" in report["quantized_ops"]
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])

    with torch.inference_mode():
        reference = model(*inputs.values()).numpy()
        for group in layer_groups(model):
            sensitivity.quantize_layers(group.layers, 32, keep=False)
        ours = model(*inputs.values()).numpy()
    theirs = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(theirs - reference).max() > 1e-2  # int4 is visible...
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=5e-5)  # ...and the same in both


def test_command_module_imports_without_torch():
    """cli.py registers the command at import: that must not pull torch into the runtime-only install."""
    import subprocess
    import sys

    code = "import sys, meissonic_edge.cli.sensitivity\nassert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
