"""Exporters: PyTorch graphs to an ONNX or CoreML bundle, with the parity checks that gate every graph. May
import quantization, the model, the runtime and the leaf modules."""
