"""meissonic-edge: Meissonic text-to-image on laptops and phones.

The package is arranged in layers; each may import the ones below it, never one above:

    cli/       the `meissonic-edge` command
    bench/     measuring exported variants against fp32 and PyTorch     demo/   the shapes model and its demo
    export/    ONNX and CoreML bundles, with their parity checks
    quant/     precision recipes, weight quantizers, int4 sensitivity
    model/     the PyTorch reference: transformer, loading, presets, reference pipeline
    runtime/   running a bundle: numpy + onnxruntime, no torch
    errors.py, fileio.py   shared leaf modules

The plain install is the runtime. The public names below are imported on first use, so that
`import meissonic_edge` works without torch (the PyTorch ones need the `export` extra).
"""

from meissonic_edge.errors import MeissonicError

__version__ = "0.1.0"

_PUBLIC = {
    "OnnxPipeline": "meissonic_edge.runtime.onnx_pipeline",
    "load_transformer": "meissonic_edge.model.checkpoint",
    "load_model_dir": "meissonic_edge.model.checkpoint",
    "MeissonicTransformer": "meissonic_edge.model.transformer",
    "ReferencePipeline": "meissonic_edge.model.reference",
    "make_random": "meissonic_edge.model.presets",
    "export_onnx": "meissonic_edge.export.to_onnx",
    "export_coreml": "meissonic_edge.export.to_coreml",
}

__all__ = ["MeissonicError", "__version__", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'meissonic_edge' has no attribute {name!r}")
