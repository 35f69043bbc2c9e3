"""`meissonic-edge bench`: exported variants measured side by side in child processes, and their report. May
import the exporters, quantization, the model, the runtime and the leaf modules."""
