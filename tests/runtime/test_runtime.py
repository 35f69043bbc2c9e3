"""The onnxruntime runtime: same tokens as the PyTorch reference, no torch needed, and careful with bundles."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from meissonic_edge.cli import main
from meissonic_edge.errors import OptionsError
from meissonic_edge.model.reference import ReferencePipeline
from meissonic_edge.runtime.bundle import BundleError
from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline

SETTINGS = dict(steps=6, seed=5, height=64, width=96, guidance_scale=9.0, negative_prompt="blurry")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def rewrite_manifest(bundle, change):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("low_memory", [False, True])
def test_same_tokens_every_step_as_the_reference(tiny_bundle, tiny_model_dir, low_memory):
    runtime = OnnxPipeline(tiny_bundle, low_memory=low_memory, threads=1)
    reference = ReferencePipeline.from_model_dir(tiny_model_dir)
    ours, theirs = [], []
    a = runtime.generate("a red circle", callback=lambda i, t: ours.append(t.copy()), **SETTINGS)
    b = reference.generate("a red circle", callback=lambda i, t: theirs.append(t.copy()), **SETTINGS)
    assert len(ours) == len(theirs) == SETTINGS["steps"]
    for step, (x, y) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_array_equal(x, y, err_msg=f"step {step}")
    pixels = np.asarray(a.images[0], np.float64) - np.asarray(b.images[0], np.float64)
    if low_memory:  # the tiled decoder: float16 weights and activations, within the 35 dB bound
        assert 10 * np.log10(255.0**2 / max(np.mean(pixels**2), 1e-12)) >= 35.0
    else:
        assert np.abs(pixels).max() <= 1  # float noise only: the same tokens decode to the same image
    assert (
        runtime.sessions == {}
        if low_memory
        else set(runtime.sessions) == {"text_encoder", "transformer_guided", "vq_decoder"}
    )


def test_fp16_bundle_generates_close_to_fp32(tiny_fp16_bundle, tiny_bundle):
    a = OnnxPipeline(tiny_fp16_bundle).generate("a red circle", **SETTINGS).tokens
    b = OnnxPipeline(tiny_bundle).generate("a red circle", **SETTINGS).tokens
    assert a.shape == b.shape and (a == b).mean() > 0.5  # sampling amplifies fp16 noise; most tokens agree


def test_empty_and_overlong_prompts(tiny_bundle, caplog):
    runtime = OnnxPipeline(tiny_bundle)
    assert runtime("", steps=2, height=64, width=64).size == (64, 64)
    with caplog.at_level(logging.WARNING):
        runtime(" ".join(["circle"] * 120), steps=2, height=64, width=64)
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_bundle_defaults_come_from_the_manifest(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m["defaults"].update(steps=3, height=64, width=64))
    seen = []
    result = OnnxPipeline(bundle_copy, verify_checksums=False).generate("x", callback=lambda i, t: seen.append(i))
    assert seen == [0, 1, 2] and result.images[0].size == (64, 64)


def test_token_temperature_comes_from_the_manifest(bundle_copy):
    assert OnnxPipeline(bundle_copy, verify_checksums=False).default_options().token_temperature == 1.0
    rewrite_manifest(bundle_copy, lambda m: m["defaults"].update(token_temperature=0.5))
    assert OnnxPipeline(bundle_copy, verify_checksums=False).default_options().token_temperature == 0.5
    rewrite_manifest(bundle_copy, lambda m: m["defaults"].pop("token_temperature"))  # bundles before the option
    assert OnnxPipeline(bundle_copy, verify_checksums=False).default_options().token_temperature == 1.0


def test_missing_manifest(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="is not a bundle: no manifest.json"):
        OnnxPipeline(bundle_copy)


def test_unknown_format_version(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="bundle format version 99 is not supported"):
        OnnxPipeline(bundle_copy)


def test_checksum_mismatch(bundle_copy):
    with open(bundle_copy / "vq_decoder.onnx", "r+b") as f:
        f.seek(-20, os.SEEK_END)
        byte = f.read(1)
        f.seek(-20, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="checksum mismatch for vq_decoder.onnx"):
        OnnxPipeline(bundle_copy)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "sub/../../x"])
def test_manifest_paths_outside_the_bundle(bundle_copy, bad):
    def point_outside(m):
        m["graphs"]["transformer"]["file"] = bad
        m["files"][bad] = {"sha256": "0" * 64, "bytes": 1}

    rewrite_manifest(bundle_copy, point_outside)
    with pytest.raises(BundleError, match="points outside the bundle"):
        OnnxPipeline(bundle_copy)


def test_symlink_out_of_the_bundle(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle_copy / "transformer.onnx", outside)
    (bundle_copy / "transformer.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        OnnxPipeline(bundle_copy)


def test_graph_inputs_must_match_the_manifest(bundle_copy):
    rewrite_manifest(
        bundle_copy, lambda m: m["graphs"]["transformer_guided"]["inputs"][0].update(dtype="tensor(float)")
    )
    with pytest.raises(BundleError, match="transformer_guided graph input 'tokens' is tensor.int64."):
        OnnxPipeline(bundle_copy)
    rewrite_manifest(bundle_copy, lambda m: m["graphs"]["transformer_guided"]["inputs"][0].update(name="ids"))
    with pytest.raises(BundleError, match="transformer_guided graph has no input 'ids'"):
        OnnxPipeline(bundle_copy)


def test_low_memory_arena_only_for_the_transformer(tiny_bundle):
    """The transformer keeps its arena (same shapes every step) without a memory pattern; single-run graphs
    free tensors at once; the tiled decoder's layers (strip after strip) keep their arena."""
    low, normal = OnnxPipeline(tiny_bundle, low_memory=True), OnnxPipeline(tiny_bundle)
    for name in ("transformer", "transformer_guided"):
        options = low.session_options(name)
        assert options.enable_cpu_mem_arena and not options.enable_mem_pattern, name
        assert normal.session_options(name).enable_mem_pattern, name
    assert low.session_options("vq_decoder_tiled").enable_cpu_mem_arena
    for name in ("text_encoder", "vq_decoder", "vq_encoder"):
        options = low.session_options(name)
        assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern, name
        assert normal.session_options(name).enable_cpu_mem_arena, name


def test_bad_options(tiny_bundle):
    runtime = OnnxPipeline(tiny_bundle, low_memory=True)
    with pytest.raises(OptionsError, match="height must be a positive multiple of 32"):
        runtime("x", height=80, width=64)
    with pytest.raises(OptionsError, match="steps must be"):
        runtime("x", steps=0, height=64, width=64)
    with pytest.raises(BundleError, match="provider.*NoSuchExecutionProvider"):
        OnnxPipeline(tiny_bundle, providers=["NoSuchExecutionProvider"])


# ----------------------------------------------------------------------------------------------- command line

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "diffusers", "safetensors", "onnxscript"}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from meissonic_edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(*args):
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *map(str, args)], capture_output=True, text=True)


def test_generate_from_a_bundle_without_torch(tiny_bundle, tmp_path):
    out = tmp_path / "img.png"
    result = cli("generate", tiny_bundle, "a blue square", "-o", out, "--steps", 3, "--height", 64, "--width", 64)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    result = cli("generate", tiny_bundle, "a blue square", "-o", tmp_path / "lm.png", "--steps", 3, "--low-memory",
                 "--height", 64, "--width", 64, "--threads", 1)  # fmt: skip
    assert result.returncode == 0, result.stderr
    from PIL import Image  # same tokens; the tiled decoder's float16 stays within the 35 dB bound

    a, b = (np.asarray(Image.open(p), np.float64) for p in (out, tmp_path / "lm.png"))
    assert a.shape == b.shape and 10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)) >= 35.0


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--steps", "0"], "error: steps must be an integer >= 1, got 0"),
        (["--height", "100"], "error: height must be a positive multiple of 32"),
        (["--guidance-scale", "-1"], "error: guidance scale must be >= 0"),
        (["-o", "/nonexistent-dir/x.png"], "error: cannot write /nonexistent-dir/x.png: folder"),
        (["--steps", "x"], "error: argument --steps: expected an integer"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_bundle, tmp_path, args, pattern):
    result = cli("generate", tiny_bundle, "p", "-o", tmp_path / "x.png", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(pattern), result.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_bundle_errors(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").unlink()
    result = cli("generate", bundle_copy, "p", "-o", tmp_path / "x.png")
    assert result.returncode == 1 and "is not a bundle: no manifest.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_checksums_and_parity(tiny_bundle, tiny_model_dir, bundle_copy, capsys):
    assert main(["verify", str(tiny_bundle)]) == 0
    assert "checksums OK" in capsys.readouterr().out
    assert main(["verify", str(tiny_bundle), "--model", str(tiny_model_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (
        "parity OK" in out and "transformer: logits_max_abs_rel=" in out and "vq_decoder_tiled: image_psnr_db=" in out
    )
    (bundle_copy / "tokenizer" / "vocab.json").write_text("{}")
    assert main(["verify", str(bundle_copy)]) == 1
    assert "bundle file tokenizer/vocab.json has 2 bytes, manifest says" in capsys.readouterr().err


def test_verify_detects_a_bundle_from_another_model(tiny_bundle, tiny_flat_model_dir, capsys):
    assert main(["verify", str(tiny_bundle), "--model", str(tiny_flat_model_dir), "--quiet"]) == 1
    assert "does not match the PyTorch reference" in capsys.readouterr().err


def test_cli_export_writes_a_bundle(tiny_flat_model_dir, tmp_path, capsys):
    args = ["export", str(tiny_flat_model_dir), str(tmp_path / "b"), "--precision", "fp32", "--quiet"]
    code = main([*args, "--no-tiled-decoder"])
    assert code == 0 and "every graph passed its parity check" in capsys.readouterr().out
    assert (tmp_path / "b" / "manifest.json").is_file() and not (tmp_path / "b" / "vq_decoder_tiled").exists()
    assert "vq_decoder_tiled" not in json.loads((tmp_path / "b" / "manifest.json").read_text())["graphs"]
    runtime = OnnxPipeline(tmp_path / "b", low_memory=True)  # without it, low-memory decodes untiled
    assert runtime.generate("a cat", steps=2, height=64, width=64).images[0].size == (64, 64)
    assert main(["export", str(tiny_flat_model_dir), str(tmp_path / "b")]) == 1
    assert "already exists" in capsys.readouterr().err
