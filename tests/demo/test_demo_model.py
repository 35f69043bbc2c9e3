"""The shipped demo model (`meissonic_edge/demo_model/`): its size and files, its fp32 prompt adherence
against a stated floor, and `meissonic-edge demo` end to end from its int8 bundle."""

import json
import re

import pytest
from safetensors import safe_open

from meissonic_edge.cli import main
from meissonic_edge.demo.adherence import outline_score
from meissonic_edge.demo.run import DEMO_MODEL, DEMO_PROMPTS, reference_adherence
from meissonic_edge.demo.shapes import evaluation_scenes

MAX_BYTES = 20 * 1024 * 1024  # the limit for a model committed to the repository
# fp32 (PyTorch) adherence on the 45 held-out prompts at the model's defaults (no guidance, token temperature
# 0.5, Gumbel temperature 0) but 64 steps (a quarter of the default 256: the full count takes 90 s here, too
# long for the suite), the protocol of `bench --adherence shapes` (seed 0 for every prompt). Measured on the
# 2-core AMD EPYC dev machine and on a 2-core Intel Xeon: 42/45 (at 256 steps 42/45 too). The floor leaves
# room for float differences between CPUs, which can flip a few borderline squares (at token temperature 1
# and upstream's Gumbel temperature, other seeds scored 33-35/45 at 64 steps here).
HELD_OUT_STEPS = 64
HELD_OUT_MEASURED = 42 / 45
HELD_OUT_FLOOR = 0.7
# The same images' mean outline IoU with the prompted shapes (ground truth: 0.995; the tokenizer's own decodes
# of the true tokens: 0.949). Measured on both machines: 0.913 (at 256 steps 0.918).
OUTLINE_MEASURED = 0.913
OUTLINE_FLOOR = 0.85


def test_shipped_model_is_small_and_safetensors_only():
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    suffixes = {p.suffix for p in files}
    assert suffixes <= {".json", ".safetensors", ".txt"}, suffixes  # no pickles, nothing unexpected
    for component in ("transformer", "text_encoder", "vqvae"):
        (weights,) = (DEMO_MODEL / component).glob("*.safetensors")
        with safe_open(weights, "pt") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        assert dtypes == {"F16"}, (component, dtypes)
    log = json.loads((DEMO_MODEL / "training_log.json").read_text())
    assert log["total_seconds"] <= 75 * 60  # "about an hour" on the 2-core machine it was trained on


def test_shipped_model_adherence_floor():
    score, images = reference_adherence(DEMO_MODEL, held_out=True, steps=HELD_OUT_STEPS)
    assert len(images) == 45
    assert score >= HELD_OUT_FLOOR, (
        f"held-out adherence {score:.3f} under the floor {HELD_OUT_FLOOR} (dev machine: {HELD_OUT_MEASURED:.3f})"
    )
    outline = outline_score(images, evaluation_scenes(held_out=True))
    assert outline >= OUTLINE_FLOOR, (
        f"outline IoU {outline:.3f} under the floor {OUTLINE_FLOOR} (dev: {OUTLINE_MEASURED})"
    )


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "contact_sheet.png") in printed
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == len(DEMO_PROMPTS) + 2  # and the inpainting and the outpainting
    manifest = json.loads((out / "bundle-int8" / "manifest.json").read_text())
    assert manifest["recipe"]["components"]["transformer"]["precision"] == "int8"
    assert all(check["passed"] for graph in manifest["graphs"].values() for check in graph["parity"].values())
    shown = int(printed.split("all right): ")[1].split("/")[0])
    assert shown >= len(DEMO_PROMPTS) // 2, printed  # the int8 bundle draws what it is asked, most of the time
    # The editing examples: both drawn as asked (measured here: both, outline IoU 0.93 and 0.94), and the
    # preserved region as close to the input as the input's own VQ round trip allows (measured: 45.0 against
    # 44.9 dB, 26.6 against 26.6 dB): preserved tokens are never resampled.
    assert (out / "images" / "edit-inpaint.png").is_file() and (out / "images" / "edit-outpaint.png").is_file()
    shown_edits = 0
    for name in ("inpaint", "outpaint"):
        line = next(line for line in printed.splitlines() if line.startswith(f"{name}: "))
        kept, roundtrip = map(float, re.search(r"region ([\d.]+) dB .* round trip: ([\d.]+) dB", line).groups())
        assert kept >= roundtrip - 0.5, line
        shown_edits += line.startswith(f"{name}: shows")
    assert shown_edits >= 1, printed
