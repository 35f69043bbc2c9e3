"""The guided transformer graph: classifier-free guidance inside the graph, before the vocabulary projection.

With guidance the transformer runs on [unconditional; conditional] and the sampler needs
uncond + s (cond - uncond) of the logits. The logits are large: at 1024x1024, [2, 4096, 8192] float32 is
268 MB, and combining them in numpy holds that twice. But the last layer, `mlm_layer.conv2`, is linear
(no bias) in its input n, and the guidance weights (1 + s) and -s sum to one, so

    W n_u + s (W n_c - W n_u) = W (n_u + s (n_c - n_u))

The guided graph combines the two halves of n (width C, 1024 in Meissonic) and projects once: the
vocabulary projection does half the work and the graph hands back [B, h*w, K], one copy, already guided.

It is made from the exported (and quantized) transformer graph by rewiring its tail, and shares its
weights: next to `transformer.onnx.data` it adds a graph file of a few hundred KB. Inputs are the
transformer's (batch 2B, unconditional half first) plus `guidance_scale` float32 [1]; the output `logits`
is [B, h*w, codebook_size].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meissonic_edge.errors import MeissonicError

GUIDED_GRAPH = "transformer_guided"
HEAD_NORM_SCOPE = "mlm_layer.layer_norm/"  # node names of the RMSNorm right before the vocabulary projection


class GuidedGraphError(MeissonicError):
    """The transformer graph does not have the tail the guided variant is made from."""


def head_input(graph) -> str:
    """The tensor the vocabulary projection reads: the output of the last node of the head's RMSNorm."""
    norm_nodes = [node for node in graph.node if HEAD_NORM_SCOPE in node.name]
    if not norm_nodes:
        raise GuidedGraphError(f"no node named after {HEAD_NORM_SCOPE!r} in the transformer graph")
    return norm_nodes[-1].output[0]


SHAPE_OPS = ("Reshape", "Expand", "Tile", "Shape", "Slice", "Concat", "Split", "ConstantOfShape")


def require_pointwise_tail(graph, source: str) -> None:
    """Between `source` and `logits` no op that builds or reads shapes (which would take the model batch, 2B,
    from the tokens after the split into halves): the projection, quantization and casts only."""
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier, seen = [source], set()
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in SHAPE_OPS:
                raise GuidedGraphError(f"{node.name} ({node.op_type}) lies between the head's norm and the logits")
            frontier.extend(node.output)


def make_guided(model):
    """Rewire a transformer ModelProto (in place) into the guided variant; return it."""
    from onnx import TensorProto, helper

    graph = model.graph
    source = head_input(graph)
    require_pointwise_tail(graph, source)
    consumers = [node for node in graph.node if source in node.input]
    if not consumers:
        raise GuidedGraphError(f"nothing reads {source!r} in the transformer graph")

    prefix = "/guidance/"
    graph.input.append(helper.make_tensor_value_info("guidance_scale", TensorProto.FLOAT, [1]))
    nodes = [
        helper.make_node(
            "Split", [source], [prefix + "uncond", prefix + "cond"], name=prefix + "Split", axis=0, num_outputs=2
        ),
        helper.make_node("CastLike", ["guidance_scale", source], [prefix + "scale"], name=prefix + "CastLike"),
        helper.make_node("Sub", [prefix + "cond", prefix + "uncond"], [prefix + "delta"], name=prefix + "Sub"),
        helper.make_node("Mul", [prefix + "delta", prefix + "scale"], [prefix + "scaled"], name=prefix + "Mul"),
        helper.make_node("Add", [prefix + "uncond", prefix + "scaled"], [prefix + "guided"], name=prefix + "Add"),
    ]
    for node in consumers:
        for i, name in enumerate(node.input):
            if name == source:
                node.input[i] = prefix + "guided"
    position = max(i for i, node in enumerate(graph.node) if node.output and node.output[0] == source) + 1
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)

    del graph.value_info[:]  # recorded shapes downstream of the split no longer hold; runtimes infer them
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[0].dim_param = "half_batch"
    model.metadata_props.add(key="meissonic_edge.variant", value=GUIDED_GRAPH)
    return model


def write_guided(transformer_path: Path) -> list[str]:
    """Write `transformer_guided.onnx` beside `transformer_path`, sharing its external weights if it has them.

    Returns the bundle-relative files of the new graph (its external data is the transformer's file).
    """
    import onnx

    model = onnx.load(str(transformer_path), load_external_data=False)
    make_guided(model)
    path = transformer_path.with_name(GUIDED_GRAPH + ".onnx")
    path.write_bytes(model.SerializeToString())  # external references stay as they are: the same .data file
    onnx.checker.check_model(str(path))
    data = transformer_path.name + ".data"
    return [path.name] + ([data] if (transformer_path.parent / data).exists() else [])


def guided_reference(logits: np.ndarray, scale: float) -> np.ndarray:
    """uncond + scale (cond - uncond) of [uncond; cond] logits (2B, L, K), in float64 arithmetic."""
    batch = logits.shape[0] // 2
    uncond, cond = logits[:batch].astype(np.float64), logits[batch:].astype(np.float64)
    return (uncond + scale * (cond - uncond)).astype(np.float32)
