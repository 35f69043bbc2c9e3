"""The plain install is the runtime: importing it must not pull in torch or the exporters' libraries."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "diffusers", "onnx", "coremltools", "safetensors")


def test_runtime_modules_import_without_torch():
    code = (
        "import sys, meissonic_edge, meissonic_edge.runtime.sampler, meissonic_edge.runtime.tokenizer, "
        "meissonic_edge.cli.app, meissonic_edge.runtime.config, meissonic_edge.runtime.imaging, meissonic_edge.fileio\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_api_is_reachable_lazily():
    import meissonic_edge

    assert callable(meissonic_edge.load_transformer)
    assert meissonic_edge.MeissonicTransformer.__name__ == "MeissonicTransformer"
