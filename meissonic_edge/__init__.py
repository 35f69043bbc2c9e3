"""meissonic-edge: Meissonic text-to-image on laptops and phones.

The plain install is the runtime (numpy + onnxruntime). The PyTorch parts (the reference model, loading
a model directory, the random presets) need the `export` extra; they are imported on first use so that
`import meissonic_edge` works without torch.
"""

from meissonic_edge.errors import MeissonicError

__version__ = "0.1.0"

_TORCH_EXPORTS = {
    "load_transformer": "meissonic_edge.model.checkpoint",
    "load_model_dir": "meissonic_edge.model.checkpoint",
    "MeissonicTransformer": "meissonic_edge.model.transformer",
    "ReferencePipeline": "meissonic_edge.model.reference",
    "make_random": "meissonic_edge.model.presets",
}

__all__ = ["MeissonicError", "__version__", *_TORCH_EXPORTS]


def __getattr__(name):
    if name in _TORCH_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_TORCH_EXPORTS[name]), name)
    raise AttributeError(f"module 'meissonic_edge' has no attribute {name!r}")
