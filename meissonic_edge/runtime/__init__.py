"""The runtime: what an app needs to run an exported bundle (numpy, onnxruntime, tokenizers, Pillow; no torch).

Owns the sampler, the tokenizer, the bundle reader, the image and editing helpers, the tiled VQ decoder and
encoder, and `OnnxPipeline`. May import only itself and the shared leaf modules (`meissonic_edge.errors`,
`meissonic_edge.fileio`); tests/test_architecture.py walks its imports.
"""

_EXPORTS = {
    "OnnxPipeline": "meissonic_edge.runtime.onnx_pipeline",
    "session_options": "meissonic_edge.runtime.onnx_pipeline",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    # On first use, so that `meissonic_edge.runtime.config` (which the model reads) does not load onnxruntime.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'meissonic_edge.runtime' has no attribute {name!r}")
