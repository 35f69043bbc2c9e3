"""The command line: the main job works, and bad input is one line on stderr with a non-zero exit."""

import shutil
import subprocess
import sys

import pytest

from meissonic_edge.cli.app import build_parser, main, overrides


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, pattern):
    import re

    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def test_generate_writes_a_png(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    code, stdout, _ = run(
        capsys,
        "generate",
        tiny_model_dir,
        "a red circle",
        "-o",
        out,
        "--steps",
        3,
        "--height",
        64,
        "--width",
        64,
    )
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--guidance-scale", "-2"], "guidance scale must be >= 0"),
        (["--height", "40"], "height must be a positive multiple of 32"),
        (["--width", "48"], "width must be a positive multiple of 32"),
        (["--token-temperature", "0"], "token temperature must be > 0"),
        (["--gumbel-temperature", "1", "-1"], "temperature must be two numbers >= 0"),
    ],
)
def test_bad_generation_options(tiny_model_dir, tmp_path, capsys, args, pattern):
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "generate", tiny_model_dir, "p", "-o", out, "--height", 64, "--width", 64, *args)
    one_line_error(code, err, pattern)
    assert not out.exists()


def test_sampling_options_reach_the_generation_options():
    args = build_parser().parse_args(
        ["generate", "m", "p", "--gumbel-temperature", "0.5", "0", "--token-temperature", "0.7", "--seed", "3"]
    )
    assert overrides(args) == {"seed": 3, "temperature": (0.5, 0.0), "token_temperature": 0.7}
    assert overrides(build_parser().parse_args(["generate", "m", "p"])) == {"seed": 0}  # the rest: the bundle's


def test_missing_model_dir(tmp_path, capsys):
    code, _, err = run(capsys, "generate", tmp_path / "nope", "p", "-o", tmp_path / "x.png")
    one_line_error(code, err, "model directory not found: .*nope")


def test_missing_subfolder_and_pickle(tiny_model_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(model / "text_encoder")
    code, _, err = run(capsys, "generate", model, "p", "-o", tmp_path / "x.png", "--height", 64, "--width", 64)
    one_line_error(code, err, "text_encoder/ folder not found")

    model = shutil.copytree(tiny_model_dir, tmp_path / "m2")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".ckpt"))
    code, _, err = run(capsys, "generate", model, "p", "-o", tmp_path / "x.png", "--height", 64, "--width", 64)
    one_line_error(code, err, "is a pickle checkpoint; only safetensors are loaded")


def test_unwritable_output(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", tiny_model_dir, "p", "-o", tmp_path / "no" / "x.png", "--steps", 1)
    one_line_error(code, err, "cannot write .*folder .* does not exist")
    code, _, err = run(capsys, "generate", tiny_model_dir, "p", "-o", tmp_path, "--steps", 1)
    one_line_error(code, err, "is a directory")


def test_make_random_refuses_to_overwrite(tiny_model_dir, capsys):
    code, _, err = run(capsys, "make-random", tiny_model_dir)
    one_line_error(code, err, "already exists")


def test_make_random_is_deterministic(tmp_path, capsys):
    assert run(capsys, "make-random", tmp_path / "a", "--seed", 3, "--feature-compression", "off")[0] == 0
    assert run(capsys, "make-random", tmp_path / "b", "--seed", 3, "--feature-compression", "off")[0] == 0
    for name in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vqvae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
    ):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no partial folders left


def test_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "meissonic_edge.cli", "generate", str(tmp_path / "missing"), "p"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: model directory not found")
    assert "Traceback" not in result.stderr


def test_make_random_creates_parents_but_not_over_files(tmp_path, capsys):
    assert run(capsys, "make-random", tmp_path / "models" / "tiny")[0] == 0
    assert (tmp_path / "models" / "tiny" / "transformer" / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "make-random", tmp_path / "file" / "tiny")
    one_line_error(code, err, "cannot write .*file/tiny")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--format", "coreml", "--int4-block-size", "32"], "--int4-\\* options apply to --format onnx"),
        (["--sizes", "512"], "--sizes apply to --format coreml"),
    ],
)
def test_export_option_mixups(tiny_model_dir, tmp_path, capsys, args, pattern):
    code, _, err = run(capsys, "export", tiny_model_dir, tmp_path / "b", *args)
    one_line_error(code, err, pattern)
    assert not (tmp_path / "b").exists()
