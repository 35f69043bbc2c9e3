"""int8 and int4 quantization of exported graphs, with onnxruntime's own quantizers.

- int8: dynamic quantization (`onnxruntime.quantization.quantize_dynamic`): MatMul weights and embedding
  tables (Gather) become int8 (MatMulInteger / DynamicQuantizeMatMul, per output channel); activations are
  quantized on the fly. Convolutions (the VQ graphs) only when asked (`quantize_convs`), as ConvInteger.
- int4: block-wise weight-only `MatMulNBits` through onnxruntime's `MatMulNBitsQuantizer`, with RTN, HQQ
  or GPTQ (calibrated on inputs recorded from real sampling steps), a block size, symmetric or not, and
  `accuracy_level` (4: int8 arithmetic on CPU). Embedding tables become `GatherBlockQuantized`. Layers a
  recipe marks as sensitive stay at 8 bits (MatMulNBits with bits=8); layers it marks as float stay float.

Linear layers the exporter wrote as `Gemm` (2-D inputs: the adaptive-norm and conditioning layers) are
first rewritten as MatMul + Add so that every linear layer is quantized. What is left in float is
reported per graph and recorded in the manifest.

A precision *recipe* says what each graph gets. It is written as one precision for all
("int8"), per graph ("transformer=int4,text_encoder=int8,vq_decoder=fp16"), or a JSON file:

    {"name": "int4-mixed",
     "default": "fp32",
     "components": {"text_encoder": "int8",
                    "transformer": {"precision": "int4", "algorithm": "hqq", "block_size": 32,
                                    "int8_layers": ["single_transformer_blocks.27.*", "mlm_layer.*"]}}}

Layer patterns are fnmatch patterns over module paths (the node names' first part); one that matches no
layer is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meissonic_edge.errors import OptionsError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
COMPONENTS = ("text_encoder", "transformer", "vq_decoder", "vq_encoder")
CONVOLUTIONAL = ("vq_decoder", "vq_encoder")  # no MatMul weights: int4 does not apply
ALGORITHMS = ("rtn", "hqq", "gptq")
EXTERNAL_DATA_BYTES = 100_000_000  # larger weights sit beside the graph: onnxruntime reads them without
# parsing a second copy inside the protobuf, and the guided transformer graph shares them
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")


@dataclass(frozen=True)
class ComponentPrecision:
    """How one graph is stored and computed."""

    precision: str = "fp32"  # fp32 | fp16 | int8 | int4
    algorithm: str = "rtn"  # int4: rtn | hqq | gptq
    block_size: int = 32  # int4: weights per quantization block (16, 32, 64, 128, 256)
    symmetric: bool = True  # int4: no zero point
    accuracy_level: int = 4  # int4: MatMulNBits arithmetic (0: default, 1: fp32, 2: fp16, 3: bf16, 4: int8)
    calibration_steps: int = 4  # int4 gptq: sampling steps recorded as calibration inputs
    int8_layers: tuple[str, ...] = ()  # int4: module-path patterns kept at 8 bits
    float_layers: tuple[str, ...] = ()  # int8/int4: module-path patterns left in float
    quantize_convs: bool = False  # int8: also Conv -> ConvInteger (what the VQ graphs are made of)

    @property
    def torch_precision(self) -> str:
        """The precision the graph is exported in before any quantization."""
        return "fp16" if self.precision == "fp16" else "fp32"

    def settings(self) -> dict:
        """What the manifest records: only the settings that apply to this precision."""
        if self.precision == "int4":
            keys = ["algorithm", "block_size", "symmetric", "accuracy_level", "int8_layers", "float_layers"]
            if self.algorithm == "gptq":
                keys.append("calibration_steps")
        elif self.precision == "int8":
            keys = ["float_layers", "quantize_convs"]
        else:
            keys = []
        return {key: (list(v) if isinstance(v := getattr(self, key), tuple) else v) for key in keys}

    def validate(self, component: str, source: str) -> None:
        if self.precision not in PRECISIONS:
            raise OptionsError(
                f"{source}: unknown precision {self.precision!r} for {component}: use {', '.join(PRECISIONS)}"
            )
        if self.algorithm not in ALGORITHMS:
            raise OptionsError(f"{source}: unknown int4 algorithm {self.algorithm!r}: use {', '.join(ALGORITHMS)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise OptionsError(f"{source}: block_size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OptionsError(f"{source}: accuracy_level must be 0-4, got {self.accuracy_level}")
        if self.calibration_steps < 1:
            raise OptionsError(f"{source}: calibration_steps must be >= 1 (the calibration set would be empty)")
        if component in CONVOLUTIONAL and self.precision == "int4":
            raise OptionsError(
                f"{source}: {component} is convolutional and int4 (MatMulNBits) does not apply to it: "
                "use fp32, fp16 or int8"
            )


@dataclass(frozen=True)
class Recipe:
    """A precision for every graph of a bundle."""

    name: str
    components: dict[str, ComponentPrecision] = field(default_factory=dict)

    def __getitem__(self, component: str) -> ComponentPrecision:
        return self.components[component]

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "components": {c: {"precision": p.precision, **p.settings()} for c, p in self.components.items()},
        }


def _component_precision(value, component: str, source: str) -> ComponentPrecision:
    if isinstance(value, str):
        value = {"precision": value}
    if not isinstance(value, dict):
        raise OptionsError(f"{source}: {component} must be a precision or an object of settings, got {value!r}")
    known = {f.name: f for f in dataclasses.fields(ComponentPrecision)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise OptionsError(f"{source}: unknown setting(s) for {component}: {', '.join(unknown)}")
    settings = {}
    for key, item in value.items():
        default = known[key].default
        if isinstance(default, tuple):
            if not isinstance(item, list) or not all(isinstance(p, str) for p in item):
                raise OptionsError(f"{source}: {component}.{key} must be a list of layer patterns")
            item = tuple(item)
        elif type(item) is not type(default):
            raise OptionsError(f"{source}: {component}.{key} must be {type(default).__name__}, got {item!r}")
        settings[key] = item
    if component in CONVOLUTIONAL and settings.get("precision") == "int8":
        settings.setdefault("quantize_convs", True)  # convolutions are all these graphs have to quantize
    precision = ComponentPrecision(**settings)
    precision.validate(component, source)
    return precision


def default_for(component: str, precision: str) -> str:
    """A plain "int8"/"int4" applies to the graphs it can apply to; the convolutional VQ graphs stay fp32."""
    if component in CONVOLUTIONAL and precision in ("int8", "int4"):
        return "fp32"
    return precision


def parse_recipe(spec: str, int4_settings: dict | None = None) -> Recipe:
    """A recipe from "int4", "transformer=int4,text_encoder=int8", or the path of a JSON recipe file.

    `int4_settings` (e.g. {"algorithm": "hqq", "block_size": 64}) override the settings of every int4 graph.
    """
    recipe = _parse_recipe(spec.strip())
    if not int4_settings:
        return recipe
    components = {}
    for component, precision in recipe.components.items():
        if precision.precision == "int4":
            precision = dataclasses.replace(precision, **int4_settings)
            precision.validate(component, "int4 options")
        components[component] = precision
    return Recipe(recipe.name, components)


def _parse_recipe(spec: str) -> Recipe:
    if spec.endswith(".json"):
        return load_recipe_file(Path(spec))
    if "=" not in spec:
        if spec not in PRECISIONS:
            raise OptionsError(
                f"unknown precision {spec!r}: use one of {', '.join(PRECISIONS)}, key=value pairs, or a .json recipe"
            )
        components = {c: _component_precision(default_for(c, spec), c, "precision") for c in COMPONENTS}
        return Recipe(spec, components)
    given = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in COMPONENTS:
            raise OptionsError(f"unknown precision key {key!r} in {spec!r}: use {', '.join(COMPONENTS)}")
        given[key] = _component_precision(value, key, "precision")
    components = {c: given.get(c, ComponentPrecision()) for c in COMPONENTS}
    return Recipe(re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-"), components)


def load_recipe_file(path: Path) -> Recipe:
    if not path.is_file():
        raise OptionsError(f"recipe file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OptionsError(f"recipe {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"recipe {path} must hold a JSON object")
    unknown = sorted(set(data) - {"name", "default", "components", "description"})
    if unknown:
        raise OptionsError(f"recipe {path}: unknown key(s) {', '.join(unknown)}")
    components = data.get("components", {})
    if not isinstance(components, dict):
        raise OptionsError(f"recipe {path}: components must be an object")
    for key in components:
        if key not in COMPONENTS:
            raise OptionsError(f"recipe {path}: unknown component {key!r}: use {', '.join(COMPONENTS)}")
    default = data.get("default", "fp32")
    recipe = {
        c: _component_precision(components.get(c, default_for(c, default)), c, f"recipe {path}") for c in COMPONENTS
    }
    return Recipe(str(data.get("name", path.stem)), recipe)


# ----------------------------------------------------------------------------------------------- graph passes


def module_of(node_name: str) -> str:
    """`/transformer_blocks.3.attn.to_q/MatMul` -> `transformer_blocks.3.attn.to_q`."""
    parts = node_name.split("/")
    return parts[1] if len(parts) > 2 else ""


def initializer_names(model) -> set[str]:
    return {init.name for init in model.graph.initializer}


def weight_nodes(model, op_types=WEIGHT_OPS) -> list:
    """Nodes of `op_types` whose weight (second input; first for Gather's table) is a constant initializer."""
    inits = initializer_names(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        weight = node.input[0] if node.op_type == "Gather" else (node.input[1] if len(node.input) > 1 else "")
        if weight in inits:
            nodes.append(node)
    return nodes


def select_nodes(model, patterns: tuple[str, ...], component: str, op_types=WEIGHT_OPS) -> list[str]:
    """Names of weight nodes whose module path matches any pattern; a pattern matching none is an error."""
    candidates = weight_nodes(model, op_types)
    chosen = []
    for pattern in patterns:
        matched = [n.name for n in candidates if fnmatch.fnmatchcase(module_of(n.name), pattern)]
        if not matched:
            raise OptionsError(f"recipe names layer {pattern!r}, which matches no layer of the {component} graph")
        chosen += matched
    return sorted(set(chosen))


def replace_nodes(model, nodes: list) -> None:
    """Give the graph `nodes` as its node list and drop the initializers nothing reads any more."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, B, C) with a constant B as MatMul(A, B') + Add(C), so MatMul quantizers see it."""
    from onnx import numpy_helper
    from onnx.helper import make_node

    inits = {init.name: init for init in model.graph.initializer}
    rewritten = 0
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        plain = all(attrs[k].f == 1.0 if k in ("alpha", "beta") else attrs[k].i == 0 for k in attrs if k != "transB")
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if "transB" in attrs and attrs["transB"].i:
            weight = weight.T
        name = node.input[1] + "_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        product = node.output[0] + "_matmul" if len(node.input) > 2 else node.output[0]
        nodes.append(make_node("MatMul", [node.input[0], name], [product], name=node.name.replace("Gemm", "MatMul")))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(
                make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name.replace("Gemm", "Add"))
            )
        rewritten += 1
    replace_nodes(model, nodes)
    return rewritten


def constant_tensors(model) -> set[str]:
    """Tensors computable from initializers alone (initializers, and what nodes make of them)."""
    constant = initializer_names(model)
    for node in model.graph.node:  # nodes are in topological order
        if node.input and all(not name or name in constant for name in node.input):
            constant.update(node.output)
    return constant


def float_weights_left(model) -> list[str]:
    """Nodes that still multiply by (or look up) a float weight: what quantization did not reach.

    A weight counts whether it is an initializer or computed from initializers (behind a Reshape, say).
    """
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    inits = {init.name: init for init in model.graph.initializer}
    constant = constant_tensors(model)
    left = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or node.name.endswith("/GatherScale"):  # row scales of int8 tables
            continue
        weight = node.input[0] if node.op_type == "Gather" else (node.input[1] if len(node.input) > 1 else "")
        if weight not in constant:
            continue
        if weight not in inits or inits[weight].data_type in floats:
            left.append(node.name)
    return left


def quantized_op_counts(model) -> dict[str, int]:
    quantized = {"MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger"}
    counts = Counter(n.op_type for n in model.graph.node if n.op_type in quantized)
    counts["Gather(int8 rows)"] = sum(1 for n in model.graph.node if n.name.endswith("/GatherInt8"))
    counts["DequantizeLinear(weights)"] = sum(
        1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializer_names(model)
    )
    return {k: v for k, v in sorted(counts.items()) if v}


# ----------------------------------------------------------------------------------------------- quantizers


def quantize_gathers_int8(model, excluded: set[str]) -> int:
    """Embedding tables to int8 with one scale per row: Gather(int8 rows) * Gather(row scales).

    onnxruntime's dynamic quantizer leaves Gather in float; this keeps the table at a quarter of its size
    and dequantizes only the rows a prompt or token grid looks up.
    """
    from onnx import TensorProto, numpy_helper
    from onnx.helper import make_node

    inits = {init.name: init for init in model.graph.initializer}
    rewritten, nodes = 0, []
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or axis != 0 or len(table.dims) != 2 or node.name in excluded:
            nodes.append(node)
            continue
        weights = numpy_helper.to_array(table).astype(np.float32)
        scales = np.maximum(np.abs(weights).max(axis=1, keepdims=True), 1e-12) / 127.0  # (V, 1)
        quantized = np.clip(np.round(weights / scales), -127, 127).astype(np.int8)
        q_name, s_name, out = table.name + "_int8", table.name + "_row_scale", node.output[0]
        model.graph.initializer.extend(
            [numpy_helper.from_array(quantized, q_name), numpy_helper.from_array(scales.astype(np.float32), s_name)]
        )
        prefix = node.name.rsplit("/", 1)[0] if node.name.startswith("/") else node.name
        nodes += [
            make_node("Gather", [q_name, node.input[1]], [out + "_int8"], name=f"{prefix}/GatherInt8"),
            make_node("Cast", [out + "_int8"], [out + "_cast"], to=TensorProto.FLOAT, name=f"{prefix}/Cast"),
            make_node("Gather", [s_name, node.input[1]], [out + "_scale"], name=f"{prefix}/GatherScale"),
            make_node("Mul", [out + "_cast", out + "_scale"], [out], name=f"{prefix}/Dequantize"),
        ]
        rewritten += 1
    replace_nodes(model, nodes)
    return rewritten


def quantize_int8(path: Path, settings: ComponentPrecision, component: str):
    """onnxruntime's dynamic quantization of the graph at `path` (already rewritten and saved); returns the model."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = ["MatMul"] + (["Conv"] if settings.quantize_convs else [])
    excluded = select_nodes(onnx.load(str(path), load_external_data=False), settings.float_layers, component)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        target = Path(tmp) / "quantized.onnx"
        quantize_dynamic(
            path,
            target,
            op_types_to_quantize=op_types,
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            use_external_data_format=True,
        )
        return onnx.load(str(target))


def quantize_int4(model, settings: ComponentPrecision, component: str, calibration: list[dict] | None):
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    excluded = set(select_nodes(model, settings.float_layers, component))
    eight_bit = [n for n in select_nodes(model, settings.int8_layers, component, ("MatMul",)) if n not in excluded]

    def run(config, exclude=()):
        quantizer = nbits.MatMulNBitsQuantizer(
            model,
            block_size=settings.block_size,
            is_symmetric=settings.symmetric,
            accuracy_level=settings.accuracy_level,
            nodes_to_exclude=list(exclude),
            algo_config=config,
        )
        quantizer.process()
        result = quantizer.model  # an ONNXModel wrapper, or a ModelProto after GPTQ
        return result.model if hasattr(result, "model") else result

    common = dict(block_size=settings.block_size, accuracy_level=settings.accuracy_level)
    if eight_bit:  # sensitive layers first, at 8 bits: they are no longer MatMul for the passes below
        config = nbits.DefaultWeightOnlyQuantConfig(is_symmetric=settings.symmetric, bits=8, **common)
        others = [n.name for n in weight_nodes(model, ("MatMul",)) if n.name not in eight_bit]
        model = run(config, exclude=others)  # onnxruntime's nodes_to_include adds to the op types, it does not narrow
    if settings.algorithm == "rtn":
        config = nbits.DefaultWeightOnlyQuantConfig(
            is_symmetric=settings.symmetric,
            bits=4,
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            **common,
        )
        return run(config, exclude=excluded)
    if settings.algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=4)
    else:
        if not calibration:
            raise OptionsError(f"GPTQ needs a calibration set, and the one for {component} is empty")
        config = nbits.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=CalibrationReader(calibration),
            block_size=settings.block_size,
            percdamp=0.01,
            actorder=False,
            mse=False,
            perchannel=True,
        )
    model = run(config, exclude=excluded)
    # HQQ and GPTQ quantize MatMul only: embedding tables get the block-wise RTN of GatherBlockQuantized.
    gather = nbits.DefaultWeightOnlyQuantConfig(
        is_symmetric=settings.symmetric, bits=4, op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),), **common
    )
    return run(gather, exclude=excluded)


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over a list of input feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.position = 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def __iter__(self):
        return iter(self.feeds)

    def __deepcopy__(self, memo):
        return CalibrationReader(self.feeds)


def save(model, path: Path) -> None:
    """Write `model` to `path`; weights over protobuf's 2 GB limit go to `path.data` beside it."""
    import onnx

    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    weight_bytes = sum(len(init.raw_data) for init in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


@contextlib.contextmanager
def quiet_quantizers():
    """onnxruntime's quantizers log advice (pre-processing, opset upgrades) at WARNING on the root logger."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def quantize_graph(
    path: Path, settings: ComponentPrecision, component: str, calibration: list[dict] | None = None
) -> dict:
    """Quantize the fp32 graph at `path` in place; return what was done, for the manifest."""
    import onnx

    model = onnx.load(str(path))
    rewritten = gemm_to_matmul(model)
    with quiet_quantizers():
        if settings.precision == "int8":
            quantize_gathers_int8(model, set(select_nodes(model, settings.float_layers, component)))
            save(model, path)  # onnxruntime's dynamic quantizer works file to file: free our copy first
            del model
            model = quantize_int8(path, settings, component)
        elif settings.precision == "int4":
            model = quantize_int4(model, settings, component, calibration)
        else:
            raise ValueError(f"not a quantized precision: {settings.precision}")
    save(model, path)
    left = float_weights_left(model)
    report = {
        "gemm_rewritten_as_matmul": rewritten,
        "quantized_ops": quantized_op_counts(model),
        "float_weight_ops": len(left),
        "float_weight_op_names": left[:50],
    }
    if left:
        logger.info("%s: %d weight op(s) left in float, e.g. %s", component, len(left), ", ".join(left[:5]))
    return report
