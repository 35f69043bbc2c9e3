"""The demo: the shapes world, its adherence evaluator, training the demo model, and the `demo` command's
contact sheet with its editing examples. May import the exporters, quantization, the model, the runtime and
the leaf modules; not the bench (they are tools side by side)."""
