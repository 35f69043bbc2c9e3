"""`meissonic-edge demo`: its failure without a shipped model, and its contact sheet.

The shipped model itself is tested in test_demo_model.py."""

import numpy as np

from meissonic_edge.cli import main
from meissonic_edge.demo.run import contact_sheet


def test_demo_without_the_model_is_one_line(tmp_path, monkeypatch, capsys):
    import meissonic_edge.demo.run as demo

    monkeypatch.setattr(demo, "DEMO_MODEL", tmp_path / "missing")
    assert main(["demo", "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the demo model is missing") and err.count("\n") == 1


def test_contact_sheet_layout():
    from PIL import Image

    images = [Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)) for i in range(5)]
    sheet = contact_sheet(images, ["a red circle at the top left"] * 5, [True, False, None, True, True])
    assert sheet.size == (4 * 64, 2 * (64 + 40))
