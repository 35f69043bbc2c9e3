"""The tiled VQ decoder: strips of rows with global GroupNorm statistics, against the untiled graph."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from meissonic_edge.export.tiled import TiledExportError, require_structure
from meissonic_edge.model.checkpoint import load_vqvae
from meissonic_edge.runtime.bundle import BundleError
from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline
from meissonic_edge.runtime.tiled_decoder import TILED_GRAPH, GroupStats, TiledDecodeError, TiledDecoder, strip_rows

PSNR_BOUND_DB = 35.0  # the bound for tiled against untiled decoding


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def open_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def tiled(bundle, strip_elements):
    entry = json.loads((bundle / "manifest.json").read_text())["graphs"][TILED_GRAPH]
    return TiledDecoder(bundle, entry, open_session, strip_elements=strip_elements)


@pytest.mark.parametrize("strip_elements", [1, 8 * 96 * 7, 1 << 30])  # one row per strip, a few rows, whole image
def test_tiled_matches_the_untiled_graph(tiny_bundle, strip_elements):
    tokens = np.random.default_rng(0).integers(0, 64, (2, 6, 8))  # 96 x 128 pixels, batch 2
    untiled = open_session(tiny_bundle / "vq_decoder.onnx").run(["image"], {"tokens": tokens})[0]
    got = tiled(tiny_bundle, strip_elements)(tokens)
    assert got.shape == untiled.shape == (2, 3, 96, 128) and got.dtype == np.float32
    assert got.min() >= 0 and got.max() <= 1
    assert psnr(got, untiled) >= PSNR_BOUND_DB


def test_statistics_are_of_the_whole_image_not_of_a_strip(tiny_bundle):
    """Strips normalised with their own statistics (what plain tiling does) land far from the untiled image."""
    tokens = np.random.default_rng(1).integers(0, 64, (1, 8, 8))
    untiled = open_session(tiny_bundle / "vq_decoder.onnx").run(["image"], {"tokens": tokens})[0]
    decoder = tiled(tiny_bundle, 1 << 30)
    features = open_session(decoder.stem_file).run(["features"], {"tokens": tokens})[0][0]
    halves = [decoder.decode_features(features[:, rows]) for rows in (slice(0, 4), slice(4, 8))]
    plain_tiles = np.concatenate(halves, axis=1)[None]
    assert psnr(plain_tiles, untiled) < PSNR_BOUND_DB <= psnr(decoder(tokens), untiled)


def test_group_stats_summed_over_strips_are_groupnorm_statistics():
    x = np.random.default_rng(2).normal(3.0, 2.0, (16, 13, 9)).astype(np.float16)
    stats = GroupStats(16, 4)
    for start in (0, 5, 6, 12):
        stats.add(x[:, start : {0: 5, 5: 6, 6: 12, 12: 13}[start]])
    mean, rstd = stats.normalisation(1e-6)
    reference = torch.nn.functional.group_norm(torch.from_numpy(x.astype(np.float32))[None], 4, eps=1e-6)
    normed = (x.astype(np.float32)[None] - mean) * rstd
    np.testing.assert_allclose(normed, reference.numpy(), atol=1e-4)


def test_strip_rows():
    assert strip_rows(128, 1024, 1, 1 << 22) == 32
    assert strip_rows(256, 512, 2, 1 << 22) == 8  # upsampling: the strip's output is 4x its input
    assert strip_rows(768, 4096, 2, 1) == 1


def test_bundle_records_the_tiled_check(tiny_bundle):
    entry = json.loads((tiny_bundle / "manifest.json").read_text())["graphs"][TILED_GRAPH]
    assert entry["precision"] == "fp16" and entry["variant_of"] == "vq_decoder"
    assert entry["parity"]["image_psnr_db"]["passed"] and entry["parity"]["image_psnr_db"]["threshold"] == 35.0
    assert [op["kind"] for op in entry["ops"]][-1] == "output"
    assert sum(op["kind"] == "upsample" for op in entry["ops"]) == 4  # f=16: four 2x upsamplers


def test_activations_beyond_float16_are_an_error(tiny_bundle):
    with pytest.raises(TiledDecodeError, match="float16"):
        tiled(tiny_bundle, 1 << 30).to_float16(np.array([1e6], np.float32))


def test_missing_layer_graph_is_a_bundle_error(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    entry = json.loads((bundle / "manifest.json").read_text())["graphs"][TILED_GRAPH]
    (bundle / entry["ops"][0]["conv1"]).unlink()
    with pytest.raises(BundleError, match="bundle file missing"):
        OnnxPipeline(bundle, low_memory=True, verify_checksums=False).decode(np.zeros((1, 2, 2), np.int64))


def test_decoders_tiling_cannot_do_are_refused(tiny_model_dir):
    vqvae = load_vqvae(tiny_model_dir)
    assert require_structure(vqvae) == (8, 1e-6)
    vqvae.decoder.up_blocks[1].resnets[0].conv1 = torch.nn.Conv2d(16, 16, 5, padding=2)
    with pytest.raises(TiledExportError, match=r"up_blocks.1.resnets.0: a convolution other than 3x3"):
        require_structure(vqvae)
