"""ONNX export: the graph contract, parity with PyTorch at other shapes, and the bundle it writes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from meissonic_edge import load_transformer
from meissonic_edge.export import parity
from meissonic_edge.export.graphs import VQDecoderGraph
from meissonic_edge.export.parity import ParityError
from meissonic_edge.export.to_onnx import export_onnx
from meissonic_edge.model.checkpoint import load_vqvae
from meissonic_edge.runtime.bundle import read_manifest, verify_files

CONTRACT = {
    "text_encoder": (
        [("input_ids", "tensor(int64)", 2)],
        [("text_embeds", "tensor(float)", 2), ("hidden_states", "tensor(float)", 3)],
    ),
    "transformer": (
        [
            ("tokens", "tensor(int64)", 3),
            ("encoder_hidden_states", "tensor(float)", 3),
            ("text_embeds", "tensor(float)", 2),
            ("micro_conds", "tensor(float)", 2),
            ("timestep", "tensor(float)", 1),
        ],
        [("logits", "tensor(float)", 3)],
    ),
    "vq_decoder": ([("tokens", "tensor(int64)", 3)], [("image", "tensor(float)", 4)]),
    "vq_encoder": ([("image", "tensor(float)", 4)], [("tokens", "tensor(int64)", 3)]),
}


def session(bundle, name):
    return ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bundle_name", ["tiny_bundle", "upstream_flat_bundle", "tiny_fp16_bundle"])
def test_bundle_contract_and_recorded_parity(bundle_name, request):
    bundle = request.getfixturevalue(bundle_name)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    tiled = {"vq_decoder_tiled", "vq_encoder_tiled"} if bundle_name == "tiny_bundle" else set()
    variants = {"transformer_guided"} | tiled  # test_guided.py, test_tiled_decoder.py, test_tiled_encoder.py
    assert set(manifest["graphs"]) == set(CONTRACT) | variants
    for name, (inputs, outputs) in CONTRACT.items():
        graph = manifest["graphs"][name]
        assert [(i["name"], i["dtype"], len(i["shape"])) for i in graph["inputs"]] == inputs
        assert [(o["name"], o["dtype"], len(o["shape"])) for o in graph["outputs"]] == outputs
        assert isinstance(graph["inputs"][0]["shape"][0], str), "batch must be dynamic"
        assert graph["parity"] and all(check["passed"] for check in graph["parity"].values())
        assert graph["precision"] == ("fp16" if "fp16" in bundle_name else "fp32")
    assert manifest["tokenizer"]["parity"]["id_agreement"]["value"] == 1.0
    assert (bundle / "tokenizer" / "vocab.json").is_file()
    model = manifest["model"]
    assert model["mask_token_id"] == 71 and model["codebook_size"] == 64
    assert manifest["defaults"]["steps"] == 64 and manifest["defaults"]["guidance_scale"] == 9.0


def test_transformer_graph_matches_pytorch_at_other_shapes(tiny_bundle, tiny_model_dir):
    transformer = load_transformer(tiny_model_dir)
    graph = session(tiny_bundle, "transformer")
    rng = torch.Generator().manual_seed(3)
    for batch, height, width in [(1, 2, 2), (3, 6, 10), (2, 12, 4)]:
        inputs = {
            "tokens": torch.randint(0, 72, (batch, height, width), generator=rng),
            "encoder_hidden_states": torch.randn(batch, 77, 32, generator=rng),
            "text_embeds": torch.randn(batch, 32, generator=rng),
            "micro_conds": torch.tensor([[width * 16.0, height * 16.0, 0, 0, 6]] * batch),
            "timestep": torch.arange(batch, dtype=torch.float32) * 5,
        }
        with torch.no_grad():
            ref = transformer(**inputs).numpy()
        got = graph.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert got.shape == (batch, height * width, 64)
        assert np.abs(got - ref).max() <= parity.MAX_ABS_REL["fp32"] * max(1, np.abs(ref).max())


def test_vq_decoder_graph_non_square(tiny_bundle, tiny_model_dir):
    vq = VQDecoderGraph(load_vqvae(tiny_model_dir))
    tokens = torch.randint(0, 64, (1, 3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vq(tokens).numpy()
    got = session(tiny_bundle, "vq_decoder").run(None, {"tokens": tokens.numpy()})[0]
    assert got.shape == (1, 3, 48, 80)
    assert parity.psnr(got, ref) >= parity.MIN_PSNR_DB["fp32"]


def test_vq_encoder_round_trip_shapes(tiny_bundle):
    image = np.random.default_rng(0).random((2, 3, 48, 80), dtype=np.float32)
    tokens = session(tiny_bundle, "vq_encoder").run(None, {"image": image})[0]
    assert tokens.shape == (2, 3, 5) and tokens.dtype == np.int64 and tokens.max() < 64


def test_nodes_have_hierarchical_names(tiny_bundle):
    names = [n.name for n in onnx.load(str(tiny_bundle / "transformer.onnx"), load_external_data=False).graph.node]
    assert len(names) == len(set(names))
    assert any(n.startswith("/transformer_blocks.0.attn.to_q/") for n in names)
    assert any(n.startswith("/single_transformer_blocks.1.proj_out/") for n in names)
    assert any(n.startswith("/mlm_layer.conv2/") for n in names)
    meta = {p.key: p.value for p in onnx.load(str(tiny_bundle / "transformer.onnx")).metadata_props}
    assert meta["meissonic_edge.component"] == "transformer" and meta["meissonic_edge.precision"] == "fp32"


def test_failed_parity_check_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    # impossible for a cosine: the first graph's check (the text encoder's) fails and the export stops there
    monkeypatch.setitem(parity.MIN_COSINE, "fp32", 1.01)
    with pytest.raises(ParityError, match=r"text_encoder does not match the PyTorch reference: \w+_cosine="):
        export_onnx(tiny_model_dir, tmp_path / "bundle", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_export_options(tiny_model_dir, tmp_path):
    from meissonic_edge.errors import OptionsError

    with pytest.raises(OptionsError, match="unknown precision 'int3'"):
        export_onnx(tiny_model_dir, tmp_path / "b", precision="int3")
    with pytest.raises(OptionsError, match="height must be a positive multiple of 32"):
        export_onnx(tiny_model_dir, tmp_path / "b", check_size=(48, 64))
    assert list(tmp_path.iterdir()) == []
