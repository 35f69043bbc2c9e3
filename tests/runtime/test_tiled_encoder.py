"""The tiled VQ encoder: strips of rows with global GroupNorm statistics, against the untiled graph."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from meissonic_edge.export import parity
from meissonic_edge.export import to_onnx as export_onnx
from meissonic_edge.export.graphs import VQEncoderGraph
from meissonic_edge.export.tiled import TiledExportError, require_encoder_structure
from meissonic_edge.model.checkpoint import load_vqvae
from meissonic_edge.model.reference import vq_tokens
from meissonic_edge.runtime.bundle import graph_files
from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline
from meissonic_edge.runtime.tiled_decoder import Stored
from meissonic_edge.runtime.tiled_encoder import TILED_ENCODER_GRAPH, TiledEncoder

MIN_AGREEMENT = 0.99  # share of tokens equal to the untiled graph's


def open_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def tiled(bundle, strip_elements):
    entry = json.loads((bundle / "manifest.json").read_text())["graphs"][TILED_ENCODER_GRAPH]
    return TiledEncoder(bundle, entry, open_session, strip_elements=strip_elements)


def smooth_images(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    """Noise upsampled 8x, plus a little fine noise: (B, 3, H, W) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    coarse = np.kron(rng.random((batch, 3, height // 8, width // 8)), np.ones((8, 8)))
    return np.clip(coarse + 0.05 * rng.standard_normal(coarse.shape), 0, 1).astype(np.float32)


SIZES = [(64, 96), (96, 64), (160, 48), (192, 128)]  # (height, width): odd token grids, both orientations


@pytest.mark.parametrize("strip_elements", [1, 8 * 48 * 5, 1 << 30])  # one row per strip, a few odd rows, whole
def test_tiled_matches_the_untiled_graph(tiny_bundle, strip_elements):
    """Float16 activations move a few near-ties of the random tiny codebook (one in 200 here)."""
    agree = total = 0
    for height, width in SIZES:
        images = smooth_images(2, height, width, seed=height)
        untiled = open_session(tiny_bundle / "vq_encoder.onnx").run(["tokens"], {"image": images})[0]
        got = tiled(tiny_bundle, strip_elements)(images)
        assert got.shape == untiled.shape == (2, height // 16, width // 16) and got.dtype == np.int64
        agree, total = agree + (got == untiled).sum(), total + got.size
    assert agree / total >= MIN_AGREEMENT


@pytest.mark.parametrize("size", SIZES)
def test_strips_compute_what_the_whole_image_does(tiny_bundle, size):
    """Strips of any height give exactly the features of one strip of the whole image; halves encoded with
    their own GroupNorm statistics (what plain tiling does) are far from them."""
    image = smooth_images(1, *size, seed=3)[0]
    whole = tiled(tiny_bundle, 1 << 30).encode_features(image)
    for strip_elements in (1, 8 * 48 * 5):
        np.testing.assert_array_equal(tiled(tiny_bundle, strip_elements).encode_features(image), whole)
    half = size[0] // 2
    encoder = tiled(tiny_bundle, 1 << 30)
    halves = np.concatenate([encoder.encode_features(image[:, :half]), encoder.encode_features(image[:, half:])], 1)
    assert np.abs(halves - whole).max() > 0.1 * np.abs(whole).max()


def test_strips_of_a_downsampler_read_rows_2r_to_2r_plus_2(tiny_bundle):
    encoder = tiled(tiny_bundle, 1)
    source = Stored(np.zeros((8, 6, 4), np.float16))
    assert list(encoder.strips(source, 8, stride=2)) == [(0, 1, 0, 3), (1, 2, 2, 5), (2, 3, 4, 6)]
    assert list(encoder.strips(source, 8))[:2] == [(0, 1, 0, 2), (1, 2, 0, 3)]


def test_bundle_records_the_tiled_encoder(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    entry = manifest["graphs"][TILED_ENCODER_GRAPH]
    assert entry["precision"] == "fp16" and entry["variant_of"] == "vq_encoder"
    check = entry["parity"]["token_agreement"]
    assert check["passed"] and check["threshold"] == parity.MIN_TOKEN_AGREEMENT["fp16"]
    kinds = [op["kind"] for op in entry["ops"]]
    assert kinds[0] == "input" and kinds.count("downsample") == 4  # f=16: four stride-2 convolutions
    files = graph_files(entry)
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in (tiny_bundle / TILED_ENCODER_GRAPH).iterdir()}
    assert entry["file"] == f"{TILED_ENCODER_GRAPH}/tail.onnx" and set(files) == on_disk
    assert all("sha256" in manifest["files"][f] for f in files)


def test_low_memory_editing_encodes_with_the_tiled_encoder(tiny_bundle, monkeypatch):
    calls = []
    run = TiledEncoder.__call__
    monkeypatch.setattr(TiledEncoder, "__call__", lambda self, images: calls.append(images.shape) or run(self, images))
    image = (smooth_images(1, 64, 96, seed=4)[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    from PIL import Image

    pipe = OnnxPipeline(tiny_bundle, low_memory=True, threads=1)
    pipe.generate("a red circle", image=Image.fromarray(image), strength=0.5, steps=2, seed=0)
    assert calls == [(1, 3, 64, 96)] and pipe.sessions == {}
    OnnxPipeline(tiny_bundle, threads=1).generate("x", image=Image.fromarray(image), strength=0.5, steps=2)
    assert len(calls) == 1  # not without --low-memory


def test_bundles_without_it_encode_untiled(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["graphs"][TILED_ENCODER_GRAPH]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    images = smooth_images(1, 64, 64, seed=5)
    untiled = open_session(bundle / "vq_encoder.onnx").run(["tokens"], {"image": images})[0]
    np.testing.assert_array_equal(OnnxPipeline(bundle, low_memory=True).encode(images), untiled)


def test_a_corrupted_layer_graph_fails_the_export(tiny_model_dir, tmp_path, monkeypatch):
    write = export_onnx.write_encoder_layer_graphs

    def corrupted(vqvae, out_dir):
        entry = write(vqvae, out_dir)
        import onnx
        from onnx import numpy_helper

        path = out_dir / entry["ops"][0]["conv"]  # conv_in: its weights negated
        model = onnx.load(str(path))
        weight = next(t for t in model.graph.initializer if t.name.endswith("conv.weight"))
        weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
        onnx.save(model, str(path))
        return entry

    monkeypatch.setattr(export_onnx, "write_encoder_layer_graphs", corrupted)
    images = torch.from_numpy(smooth_images(1, 64, 64, seed=6))
    reference = vq_tokens(load_vqvae(tiny_model_dir), images)

    def load():
        return VQEncoderGraph(load_vqvae(tiny_model_dir))

    with pytest.raises(parity.ParityError, match="vq_encoder_tiled does not match the PyTorch reference"):
        export_onnx.export_tiled_encoder(load, {"image": images}, tmp_path, reference)


def test_encoders_tiling_cannot_do_are_refused(tiny_model_dir):
    vqvae = load_vqvae(tiny_model_dir)
    assert require_encoder_structure(vqvae) == (8, 1e-6)
    vqvae.encoder.down_blocks[1].downsamplers[0].padding = 1
    with pytest.raises(TiledExportError, match=r"down_blocks.1: a downsampler other than pad"):
        require_encoder_structure(vqvae)
