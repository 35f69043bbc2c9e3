"""The runtime: what an app needs to run an exported bundle (numpy, onnxruntime, tokenizers, Pillow; no torch).

Owns the sampler, the tokenizer, the bundle reader, the image and editing helpers, the tiled VQ decoder and
encoder, and `OnnxPipeline` (`onnx_pipeline.py`; also `meissonic_edge.OnnxPipeline`). May import only itself
and the shared leaf modules (`meissonic_edge.errors`, `meissonic_edge.fileio`); tests/test_architecture.py
walks its imports.
"""
