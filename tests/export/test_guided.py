"""The guided transformer graph: guidance before the vocabulary projection, the transformer's weights shared."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from meissonic_edge.export.guided import GUIDED_GRAPH, GuidedGraphError, guided_reference, make_guided


def run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]


def random_feed(bundle, batch=2, grid=(4, 6), seed=0):
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = manifest["model"]
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, model["codebook_size"], (batch, *grid)).astype(np.int64),
        "encoder_hidden_states": rng.standard_normal((batch, 77, model["text_hidden_size"])).astype(np.float32),
        "text_embeds": rng.standard_normal((batch, model["pooled_projection_dim"])).astype(np.float32),
        "micro_conds": np.tile(np.array([64, 96, 0, 0, 6], np.float32), (batch, 1)),
        "timestep": np.full((batch,), 3.0, np.float32),
    }


@pytest.mark.parametrize("scale", [1.0, 4.0, 9.0])
def test_guided_graph_equals_guidance_on_the_plain_logits(tiny_bundle, scale):
    feed = random_feed(tiny_bundle, batch=4)  # two prompts: [uncond x2; cond x2]
    plain = run(tiny_bundle / "transformer.onnx", feed)
    guided = run(tiny_bundle / f"{GUIDED_GRAPH}.onnx", {**feed, "guidance_scale": np.array([scale], np.float32)})
    assert guided.shape == (2, 24, plain.shape[-1])
    np.testing.assert_allclose(guided, guided_reference(plain, scale), rtol=1e-4, atol=1e-4 * scale)


def test_bundle_records_and_checks_the_guided_graph(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    entry = manifest["graphs"][GUIDED_GRAPH]
    assert entry["variant_of"] == "transformer" and entry["precision"] == manifest["graphs"]["transformer"]["precision"]
    assert entry["parity"]["logits_cosine"]["passed"] and entry["parity_guidance_scale"] == 9.0
    assert [i["name"] for i in entry["inputs"]][-1] == "guidance_scale"


def test_guided_graph_shares_external_weights(tiny_model_dir, tmp_path, monkeypatch):
    """With weights beside the graph, the guided graph is a small file reading the same .data file."""
    import meissonic_edge.export.graphs as graphs
    import meissonic_edge.export.to_onnx as export_onnx
    import meissonic_edge.quant.quantize as quantize

    monkeypatch.setattr(graphs, "EXTERNAL_DATA_BYTES", 1000)
    monkeypatch.setattr(quantize, "EXTERNAL_DATA_BYTES", 1000)
    bundle = export_onnx.export_onnx(
        tiny_model_dir, tmp_path / "b", precision="int4", progress=False, tiled_decoder=False
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    plain, guided = manifest["graphs"]["transformer"], manifest["graphs"][GUIDED_GRAPH]
    assert plain["external_data"] == guided["external_data"] == ["transformer.onnx.data"]
    size = {name: (bundle / name).stat().st_size for name in ("transformer.onnx", "transformer_guided.onnx")}
    assert size["transformer_guided.onnx"] < size["transformer.onnx"] + 10_000  # the graph, not the weights again
    feed = random_feed(bundle)
    out = run(bundle / "transformer_guided.onnx", {**feed, "guidance_scale": np.array([5.0], np.float32)})
    assert out.shape[0] == 1 and np.isfinite(out).all()


def test_a_graph_without_the_head_is_refused():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["logits"], name="/other/Identity")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1])],
    )
    with pytest.raises(GuidedGraphError, match="mlm_layer.layer_norm"):
        make_guided(onnx.helper.make_model(graph))


def test_a_tail_that_reshapes_after_the_norm_is_refused():
    """After the split the batch is B, not 2B: a Reshape built from the tokens' shape would be wrong there."""
    nodes = [
        onnx.helper.make_node("Mul", ["x", "x"], ["n"], name="/mlm_layer.layer_norm/Mul"),
        onnx.helper.make_node("Reshape", ["n", "shape"], ["logits"], name="/Reshape"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [2]) for name in ("x", "shape")],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2])],
    )
    with pytest.raises(GuidedGraphError, match=r"/Reshape \(Reshape\) lies between the head's norm and the logits"):
        make_guided(onnx.helper.make_model(graph))
