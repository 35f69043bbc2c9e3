"""The graph contracts as PyTorch modules, and writing one of them as an ONNX graph.

Each wrapper's forward is exactly a component's contract (MEISSONIC.md): its inputs and outputs are what
apps feed and read. `export_graph()` is the torch.onnx recipe every ONNX graph of a bundle goes through;
`reference_outputs()` is what PyTorch computes for the same contract, the other side of every parity check.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meissonic_edge import __version__
from meissonic_edge.model.reference import vq_tokens

OPSET = 21  # int4 weights (GatherBlockQuantized) need opset 21 types
EXTERNAL_DATA_BYTES = 100_000_000  # larger weights sit beside the graph: onnxruntime reads them without
# parsing a second copy inside the protobuf, and the guided transformer graph shares them


class TextEncoderGraph(nn.Module):
    """input_ids (B, 77) -> text_embeds (B, Dp), hidden_states (B, 77, Dt) of the penultimate layer."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]


class VQDecoderGraph(nn.Module):
    """tokens (B, h, w) -> image (B, 3, 16h, 16w) in [0, 1]: codebook lookup, decoder, clip."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, tokens):
        batch, height, width = tokens.shape
        shape = (batch, height, width, self.vqvae.config.latent_channels)
        return self.vqvae.decode(tokens, force_not_quantize=True, shape=shape).sample.clamp(0, 1)


def nearest_codebook_entry(vqvae, latents):
    """latents (B, C, h, w) after quant_conv -> the index of the nearest codebook entry (B, h, w)."""
    latents = latents.permute(0, 2, 3, 1)  # (B, h, w, C)
    codebook = vqvae.quantize.embedding.weight  # (K, C)
    distances = codebook.pow(2).sum(-1) - 2 * latents @ codebook.T  # |z|^2 is the same for every entry
    return distances.argmin(-1)  # (B, h, w)


class VQEncoderGraph(nn.Module):
    """image (B, 3, H, W) in [0, 1] -> tokens (B, H/16, W/16): encoder, then the nearest codebook entry."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, image):
        return nearest_codebook_entry(self.vqvae, self.vqvae.encode(image).latents)  # (B, h, w)


class Float16Graph(nn.Module):
    """Run `graph` in fp16 behind the float32 contract: float inputs are cast in, float outputs cast out.

    The model's own float32 islands (RMSNorm statistics, the rotary table) stay float32 inside.
    Converts `graph`'s weights in place: compute the fp32 reference outputs before wrapping.
    """

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.inner = graph.half()

    def forward(self, *args):
        out = self.inner(*(a.half() if a.is_floating_point() else a for a in args))
        outputs = out if isinstance(out, tuple) else (out,)
        outputs = tuple(o.float() if o.is_floating_point() else o for o in outputs)
        return outputs if isinstance(out, tuple) else outputs[0]


# ----------------------------------------------------------------------------------------------- the recipe


FOLD_LIMIT = 1 << 28  # elements: larger than any weight of the model


def fold_weight_expressions(model) -> None:
    """Fold what is computed from weights alone (reshaping a 1x1 conv's kernel, say) into initializers.

    torch.onnx folds only small tensors; a weight left behind a Reshape or Gather is one that MatMul
    quantizers cannot see, and one the runtime recomputes at every step.
    """
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    onnxscript.optimizer.remove_unused_nodes(model)


def hierarchical_names(model) -> None:
    """Name each node after the module that produced it, e.g. `/transformer_blocks.3.attn.to_q/MatMul`."""
    used: dict[str, int] = {}
    for node in model.graph.all_nodes():
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        module = ""
        if scopes:
            path = [s for s in ast.literal_eval(scopes)[:-1] if s and not s.startswith("_")]  # modules only
            module = path[-1] if path else ""
        base = f"/{module}/{node.op_type}" if module else f"/{node.op_type}"
        count = used.get(base, 0)
        used[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx reports on its own internals (missing torchvision ops, deprecations); none of it is ours."""
    names = ["torch.onnx", "torch.export", "onnxscript", "onnx_ir"]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_graph(
    wrapper: nn.Module,
    sample: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict,
    component: str,
    precision: str,
) -> list[str]:
    """Export `wrapper` to `path`; return the bundle-relative files written (the graph and its external data).

    With precision "fp16" the wrapper's weights are converted in place.
    """
    import onnx

    wrapper.eval()
    shapes = tuple(dynamic_shapes.get(name) for name in input_names)
    if precision == "fp16":
        wrapper = Float16Graph(wrapper).eval()
        shapes = (shapes,)  # Float16Graph.forward(*args): torch.export sees one tuple argument
    weight_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            sample,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=shapes,
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    fold_weight_expressions(program.model)
    hierarchical_names(program.model)
    program.model.metadata_props.update(
        {
            "meissonic_edge.component": component,
            "meissonic_edge.precision": precision,
            "meissonic_edge.version": __version__,
        }
    )
    program.save(str(path), external_data=external)
    del program
    gc.collect()
    onnx.checker.check_model(str(path))  # the path form also checks graphs with external data
    files = [path.name]
    if (path.parent / (path.name + ".data")).exists():
        files.append(path.name + ".data")
    return files


def io_spec(session) -> dict:
    def describe(args):
        return [{"name": a.name, "dtype": a.type, "shape": list(a.shape)} for a in args]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def open_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------- parity


def reference_outputs(component: str, graph: nn.Module, inputs: dict) -> list[np.ndarray]:
    """What PyTorch computes for the graph contract of `component` (fp32)."""
    with torch.no_grad():
        if component == "vq_encoder":  # diffusers' own quantizer, not our export wrapper's arithmetic
            return [vq_tokens(graph.vqvae, inputs["image"])]
        out = graph(**inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
