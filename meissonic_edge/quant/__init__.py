"""Quantization: the per-component precision recipes and onnxruntime's weight quantizers (`quantize`), the
per-layer-group int4 sensitivity measurement (`sensitivity`) and the recipe and report it writes
(`recipe_writer`). May import the model, the runtime and the leaf modules."""
