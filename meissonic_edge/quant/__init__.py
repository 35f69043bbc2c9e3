"""Quantization: the per-component precision recipes and onnxruntime's weight quantizers (`quantize`), and the
per-layer-group int4 sensitivity measurement that writes recipes (`sensitivity`). May import the model, the
runtime and the leaf modules."""
