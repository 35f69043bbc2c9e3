"""CoreML export of a model directory into a bundle: one `.mlpackage` per graph and image size.

Every `convert_<component>()` follows the same recipe (`convert_component`):
  1. load the fp32 module and compute the PyTorch reference on the real check inputs (`export_onnx.check_cases`);
  2. for each package shape: capture the graph contract (`export_onnx`'s wrappers, our transformer) with
     `torch.export` at that fixed shape, convert it with coremltools to an fp16 ML program, compress its
     weights with `coremltools.optimize.coreml`, attach descriptions and metadata, save it, and check the
     saved package's inputs and outputs against the contract;
  3. read the weights back from the saved package, decompress them, load them into the fp32 PyTorch module
     and compare it with the reference against named thresholds; a failure raises `ParityError` and the
     bundle is not written. CoreML cannot run predictions on Linux, so this measures what the weight
     compression (and fp16 storage) does; fp16 arithmetic is measured on a Mac (tests/test_export_coreml.py).

Decisions (runtimes/swift/README.md says what an app sees):
- Fixed shapes, one package per image size (`transformer_512.mlpackage`): coremltools 9 cannot convert the
  transformer with flexible (enumerated) shapes — torch.export's integer `//` on sizes becomes fp32 and
  `expand` then fails, `split` with symbolic sizes fails, and tracing fails on size arithmetic — and fixed
  shapes are what Core ML schedules best (Apple's Stable Diffusion ships one model per shape). An app
  ships only the sizes it needs. The text encoder does not depend on the size: one package.
- Integers are int32 (ML programs have no int64 inputs); everything else is the ONNX contract's.
- fp16: the transformer is captured in fp16 from PyTorch (`Float16Graph`, as the ONNX fp16 export), so its
  own float32 islands (RMSNorm statistics, rotary application, sinusoidal embeddings of timestep and
  micro-conditions, whose angles reach 63,000 rad where fp16's spacing is 32) stay float32. coremltools
  cannot convert CLIP's LayerNorm or diffusers' GroupNorm from an fp16 graph, so the text encoder and the
  VQ graphs are captured in fp32 and coremltools' fp16 pass makes every op fp16.
- Compression (`compress`): the weights of every `linear`, `matmul`, `conv` and `gather` op — the output
  head, every linear layer, and the embedding tables — and nothing else (not the rotary table, biases
  or norms). Embedding tables are compressed along their rows, as ONNX's int8 rows and
  `GatherBlockQuantized`: int8 one scale per row, int4 one scale per 32 values of a row, palettes per 16
  rows. A weight the main scheme cannot take (a dimension not divisible by its block or group) gets the
  fallback (int8 per channel for int4, a per-tensor palette for palettes); what stays fp16 is listed.
- A plain precision compresses the text encoder and the transformer; the convolutional VQ graphs stay fp16
  (as the ONNX export leaves them float) unless named: "transformer=int4,text_encoder=int8,vq_decoder=int8".
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from meissonic_edge import __version__
from meissonic_edge.errors import MeissonicError, OptionsError
from meissonic_edge.export.parity import (
    MIN_PSNR_DB,
    MIN_TOKEN_AGREEMENT,
    Check,
    ParityError,
    cosine_check,
    max_abs_check,
    psnr,
    require,
)
from meissonic_edge.export.to_onnx import (
    Float16Graph,
    check_cases,
    check_tokenizer,
    copy_tokenizer,
    defaults_section,
    model_section,
    parse_size,
    quiet_exporter,
    reference_outputs,
    source_section,
)
from meissonic_edge.fileio import atomic_directory
from meissonic_edge.model.checkpoint import load_clip_tokenizer, load_scheduler_config, transformer_folder
from meissonic_edge.model.consistency import check_model_dir
from meissonic_edge.runtime.bundle import write_manifest
from meissonic_edge.runtime.config import VQ_STRIDE, TransformerConfig
from meissonic_edge.runtime.sampler import GenerationOptions
from meissonic_edge.runtime.tokenizer import MAX_LENGTH

logger = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "transformer", "vq_decoder", "vq_encoder")
CONVOLUTIONAL = ("vq_decoder", "vq_encoder")  # a plain precision leaves them fp16
TORCH_FP16 = ("transformer",)  # captured in fp16 from PyTorch: its float32 islands stay float32
PRECISIONS = ("fp16", "int8", "int4", "palettize4", "palettize6")
TARGETS = ("iOS17", "iOS18", "macOS14", "macOS15")
BLOCKWISE_TARGETS = ("iOS18", "macOS15")  # constexpr_blockwise_shift_scale, grouped-channel palettes
WEIGHT_OPS = ("linear", "matmul", "conv", "conv_transpose", "gather")  # their constant weights are compressed
INT4_BLOCK_SIZE = 32  # int4: weights per scale, along the input dimension (a row of an embedding table)
PALETTE_GROUP_SIZE = 16  # palettes: output channels (embedding rows) sharing one look-up table
KMEANS_ITERATIONS = 30
COMPRESSED_SUFFIXES = ("_quantized", "_palettized")  # what coremltools appends to a compressed constant's name
MANIFEST_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32"}

# Fidelity thresholds: the fp32 PyTorch module holding the package's decompressed weights, against the
# fp32 reference on the same inputs. The ONNX export's thresholds for the same number of bits.
THRESHOLD_KEY = {"fp16": "fp16", "int8": "int8", "int4": "int4", "palettize6": "int8", "palettize4": "int4"}
MIN_PSNR_DB_4BIT = 20.0  # decoded images, VQ decoder compressed to 4 bits (only when asked)
MIN_TOKEN_AGREEMENT_4BIT = 0.7  # VQ encoder compressed to 4 bits (only when asked)

DESCRIPTIONS = {
    "input_ids": "CLIP BPE token ids: start token, prompt, end token, then the pad token up to 77",
    "text_embeds": "projected pooled text embedding (the text encoder's text_embeds)",
    "hidden_states": "hidden states of the text encoder's penultimate layer",
    "encoder_hidden_states": "the text encoder's hidden_states, batch [negative prompt; prompt] with guidance",
    "micro_conds": "[width, height, crop x, crop y, aesthetic score], e.g. [512, 512, 0, 0, 6]",
    "timestep": "sampling steps remaining: N-1 at the first step, 0 at the last",
    "logits": "unnormalised log-probabilities over the VQ codebook for every token, row-major",
    "image": "RGB, channels first, values in [0, 1]",
}
TOKENS_DESCRIPTION = {
    "transformer": "VQ token grid (image size / 16), mask_token_id where not decided yet",
    "vq_decoder": "VQ token grid (image size / 16), every token decided",
    "vq_encoder": "the nearest VQ codebook entry of every 16x16 patch",
}
SUMMARIES = {
    "text_encoder": "Meissonic text encoder (CLIP): prompt tokens -> conditioning",
    "transformer": "Meissonic transformer: one masked-token sampling step",
    "vq_decoder": "Meissonic VQ decoder: token grid -> image",
    "vq_encoder": "Meissonic VQ encoder: image -> token grid",
}


class ContractError(MeissonicError):
    """A converted package's inputs or outputs are not the graph contract's."""


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Plan:
    """Everything an export needs to know, checked before any work."""

    precisions: dict  # component -> precision
    target: str  # canonical minimum deployment target name
    sizes: tuple  # ((height, width), ...) in pixels
    transformer_batch: int

    def shapes(self, component: str) -> list[tuple[str, tuple[int, int] | None]]:
        """(package label, image size) for each package of `component`; the text encoder has one."""
        if component == "text_encoder":
            return [("", None)]
        return [(size_label(size), size) for size in self.sizes]


def size_label(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def parse_target(name: str) -> str:
    for target in TARGETS:
        if str(name).lower() == target.lower():
            return target
    raise OptionsError(f"unknown minimum target {name!r}: use {', '.join(TARGETS)}")


def parse_precision(precision: str) -> dict[str, str]:
    """ "int4" (text encoder and transformer; VQ graphs fp16) or "transformer=int4,vq_decoder=int8,..."."""
    text = str(precision).strip()
    if "=" not in text:
        if text not in PRECISIONS:
            raise OptionsError(f"unknown CoreML precision {text!r}: use {', '.join(PRECISIONS)} (or GRAPH=P,...)")
        return {c: "fp16" if c in CONVOLUTIONAL else text for c in COMPONENTS}
    plan = dict.fromkeys(COMPONENTS, "fp16")
    for part in text.split(","):
        component, _, value = (s.strip() for s in part.partition("="))
        if component not in COMPONENTS:
            raise OptionsError(f"unknown graph {component!r} in precision {text!r}: use {', '.join(COMPONENTS)}")
        if value not in PRECISIONS:
            raise OptionsError(f"unknown CoreML precision {value!r} for {component}: use {', '.join(PRECISIONS)}")
        plan[component] = value
    return plan


def parse_sizes(sizes) -> tuple[tuple[int, int], ...]:
    """512, "512,1024", "512x768", or a list of sizes (N, "HxW" or (H, W)) -> ((512, 512), ...)."""
    if isinstance(sizes, str):
        sizes = [s for s in sizes.split(",") if s.strip()]
    elif isinstance(sizes, int):
        sizes = [sizes]
    parsed = []
    for size in sizes:
        if isinstance(size, str):
            size = parse_size(size.strip())
        elif isinstance(size, int):
            size = (size, size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise OptionsError(f"an image size is N or (height, width) in pixels, got {size!r}")
        parsed.append(tuple(size))
    if not parsed:
        raise OptionsError("give at least one image size to export")
    if len(set(parsed)) != len(parsed):
        raise OptionsError(f"image sizes repeat: {', '.join(size_label(s) for s in parsed)}")
    return tuple(parsed)


def make_plan(precision: str, minimum_target: str, sizes, transformer_batch: int, config: TransformerConfig) -> Plan:
    target = parse_target(minimum_target)
    precisions = parse_precision(precision)
    for component, value in precisions.items():
        if value == "int4" and target not in BLOCKWISE_TARGETS:
            raise OptionsError(
                f"int4 per-block weights ({component}) need iOS18 or macOS15 (constexpr_blockwise_shift_scale); "
                f"--minimum-target {target} can take int8, palettize4 or palettize6"
            )
    parsed = parse_sizes(sizes)
    for height, width in parsed:
        GenerationOptions(height=height, width=width).validate(config.token_stride)
    if transformer_batch not in (1, 2):
        raise OptionsError(
            f"transformer batch must be 2 (guidance in one call) or 1 (one call per half), got {transformer_batch!r}"
        )
    return Plan(precisions, target, parsed, transformer_batch)


# ----------------------------------------------------------------------------------------------- coremltools


@contextlib.contextmanager
def quiet_coremltools():
    """coremltools reports on itself (untested torch version, no Linux runtime, its progress bars): not ours."""
    names = ["coremltools"]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def import_coremltools():
    with quiet_coremltools():
        import coremltools
        import coremltools.optimize.coreml  # noqa: F401

    return coremltools


def kmeans_palette(nbits: int):
    """A look-up-table function for coremltools' "custom" palettizer: 1-D k-means over the weights.

    Weighted Lloyd iterations over the distinct fp16 values, started at their quantiles: deterministic, and
    no scikit-learn (which coremltools' own "kmeans" mode needs).
    """
    size = 1 << nbits

    def lut_function(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, inverse, counts = np.unique(weights.ravel(), return_inverse=True, return_counts=True)
        if len(values) <= size:
            lut = np.zeros(size, dtype=weights.dtype)
            lut[: len(values)] = values
            return lut, inverse.ravel().astype(np.uint8)
        x, w = values.astype(np.float64), counts.astype(np.float64)
        quantiles = (np.cumsum(w) - w / 2) / w.sum()
        centroids = np.interp((np.arange(size) + 0.5) / size, quantiles, x)
        for _ in range(KMEANS_ITERATIONS):
            cluster = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
            total, count = np.bincount(cluster, w * x, size), np.bincount(cluster, w, size)
            updated = np.sort(np.where(count > 0, total / np.maximum(count, 1e-30), centroids))
            if np.allclose(updated, centroids, rtol=0, atol=1e-7):
                break
            centroids = updated
        centroids = centroids.astype(weights.dtype).astype(np.float64)  # assign to what the package stores
        cluster = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
        return centroids.astype(weights.dtype), cluster[inverse.ravel()].astype(np.uint8)

    return lut_function


def compression_configs(precision: str, target: str):
    """(compress function, main config, fallback function, fallback config) for a precision; None for fp16."""
    ct = import_coremltools()
    cto = ct.optimize.coreml
    if precision == "fp16":
        return None
    if precision == "int8":
        config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
        )
        return cto.linear_quantize_weights, config, None, None
    if precision == "int4":
        config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype="int4",
            granularity="per_block",
            block_size=INT4_BLOCK_SIZE,
            weight_threshold=0,
        )
        fallback = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
        )
        return cto.linear_quantize_weights, config, cto.linear_quantize_weights, fallback
    nbits = int(precision.removeprefix("palettize"))
    per_tensor = cto.OpPalettizerConfig(
        mode="custom", lut_function=kmeans_palette(nbits), granularity="per_tensor", weight_threshold=0
    )
    if target not in BLOCKWISE_TARGETS:  # iOS17 / macOS14 palettes are per tensor
        return cto.palettize_weights, per_tensor, None, None
    grouped = cto.OpPalettizerConfig(
        mode="custom",
        lut_function=kmeans_palette(nbits),
        granularity="per_grouped_channel",
        group_size=PALETTE_GROUP_SIZE,
        weight_threshold=0,
    )
    return cto.palettize_weights, grouped, cto.palettize_weights, per_tensor


def compression_settings(precision: str, target: str) -> dict:
    """What the manifest and the package metadata record about a precision."""
    weights = {"ops": list(WEIGHT_OPS), "embedding_tables": "compressed along their rows"}
    if precision == "fp16":
        return {"weights": "float16", "compute": "float16"}
    if precision == "int8":
        return {**weights, "dtype": "int8", "mode": "linear_symmetric", "granularity": "per_channel"}
    if precision == "int4":
        return {
            **weights,
            "dtype": "int4",
            "mode": "linear_symmetric",
            "granularity": "per_block",
            "block_size": INT4_BLOCK_SIZE,
            "fallback": "int8 per_channel",
        }
    grouped = target in BLOCKWISE_TARGETS
    return {
        **weights,
        "nbits": int(precision.removeprefix("palettize")),
        "algorithm": "k-means (1-D, weighted Lloyd)",
        "granularity": "per_grouped_channel" if grouped else "per_tensor",
        **({"group_size": PALETTE_GROUP_SIZE, "fallback": "per_tensor"} if grouped else {}),
    }


def weight_constants(program) -> list:
    """The constant weights (rank >= 2) of the ops whose weights compression applies to."""
    found = {}
    for op in program.functions["main"].operations:
        if op.op_type not in WEIGHT_OPS:
            continue
        for var in op.inputs.values():
            producer = getattr(var, "op", None)
            if producer is not None and producer.op_type == "const" and var.rank >= 2:
                found[producer.name] = producer
    return list(found.values())


def compression_report(program) -> dict:
    """Which weights of `WEIGHT_OPS` are compressed (constexpr ops) and which stayed fp16."""
    ops = Counter()
    compressed, left = 0, []
    for op in program.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            ops[op.op_type] += 1
        if op.op_type not in WEIGHT_OPS:
            continue
        for var in op.inputs.values():
            producer = getattr(var, "op", None)
            if producer is None or var.rank is None or var.rank < 2:
                continue
            if producer.op_type.startswith("constexpr_"):
                compressed += 1
            elif producer.op_type == "const":
                left.append({"name": producer.name, "shape": list(var.shape), "op": op.op_type})
    return {"constexpr_ops": dict(sorted(ops.items())), "compressed_weights": compressed, "float16_weights": left}


def compress(mlmodel, precision: str, target: str):
    """Compress the weights of `WEIGHT_OPS`; return the compressed model and its compression report."""
    ct = import_coremltools()
    configs = compression_configs(precision, target)
    if configs is None:  # fp16: every weight is float16 by choice; count them rather than list them
        report = compression_report(mlmodel._mil_program)
        return mlmodel, {**report, "float16_weights": len(report["float16_weights"]), "fallbacks": []}
    compressor, config, fallback_compressor, fallback = configs
    names = [op.name for op in weight_constants(mlmodel._mil_program)]
    with quiet_coremltools():
        model = compressor(mlmodel, ct.optimize.coreml.OptimizationConfig(op_name_configs=dict.fromkeys(names, config)))
    skipped = [op.name for op in weight_constants(model._mil_program)]
    if skipped and fallback is not None:
        logger.info("fallback compression for %d weight(s): %s", len(skipped), ", ".join(skipped))
        with quiet_coremltools():
            options = ct.optimize.coreml.OptimizationConfig(op_name_configs=dict.fromkeys(skipped, fallback))
            model = fallback_compressor(model, options)
    left = {op.name for op in weight_constants(model._mil_program)}
    return model, {**compression_report(model._mil_program), "fallbacks": [n for n in skipped if n not in left]}


# ----------------------------------------------------------------------------------------------- the contract


def contract(component: str, batch: int, size: tuple[int, int] | None, config: TransformerConfig) -> dict:
    """The inputs and outputs a package must have: (name, dtype, shape), the ONNX contract at a fixed shape."""
    dt, dp, k = config.joint_attention_dim, config.pooled_projection_dim, config.codebook_size
    if component == "text_encoder":
        return {
            "inputs": [("input_ids", "int32", [batch, MAX_LENGTH])],
            "outputs": [("text_embeds", "float32", [batch, dp]), ("hidden_states", "float32", [batch, MAX_LENGTH, dt])],
        }
    height, width = size
    h, w = height // VQ_STRIDE, width // VQ_STRIDE
    if component == "transformer":
        return {
            "inputs": [
                ("tokens", "int32", [batch, h, w]),
                ("encoder_hidden_states", "float32", [batch, MAX_LENGTH, dt]),
                ("text_embeds", "float32", [batch, dp]),
                ("micro_conds", "float32", [batch, 5]),
                ("timestep", "float32", [batch]),
            ],
            "outputs": [("logits", "float32", [batch, h * w, k])],
        }
    if component == "vq_decoder":
        return {"inputs": [("tokens", "int32", [1, h, w])], "outputs": [("image", "float32", [1, 3, height, width])]}
    return {"inputs": [("image", "float32", [1, 3, height, width])], "outputs": [("tokens", "int32", [1, h, w])]}


def package_io(path: Path) -> dict:
    """The inputs and outputs a saved package declares, read from its spec."""
    ct = import_coremltools()
    from coremltools.proto import FeatureTypes_pb2

    spec = ct.utils.load_spec(str(path))
    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType

    def describe(features):
        return [
            {
                "name": f.name,
                "dtype": MANIFEST_DTYPES.get(names.Name(f.type.multiArrayType.dataType), "?"),
                "shape": [int(d) for d in f.type.multiArrayType.shape],
            }
            for f in features
        ]

    return {"inputs": describe(spec.description.input), "outputs": describe(spec.description.output)}


def package_ops(path: Path) -> Counter:
    """Op types of a saved package's main function, counted from its spec (compressed weights are constexpr_*)."""
    ct = import_coremltools()
    spec = ct.utils.load_spec(str(path))
    function = spec.mlProgram.functions["main"]
    return Counter(op.type for op in function.block_specializations[function.opset].operations)


def constexpr_counts(path: Path) -> dict:
    return {op: n for op, n in sorted(package_ops(path).items()) if op.startswith("constexpr_")}


def package_weight_dtypes(path: Path) -> Counter:
    """Data types of the values the constexpr ops of a saved package decompress (INT8, INT4, UINT4, ...)."""
    ct = import_coremltools()
    from coremltools.proto import MIL_pb2

    spec = ct.utils.load_spec(str(path))
    function = spec.mlProgram.functions["main"]
    found = Counter()
    for op in function.block_specializations[function.opset].operations:
        if op.type.startswith("constexpr_"):
            for name in ("data", "indices"):
                if name in op.inputs:
                    value = op.inputs[name].arguments[0].value
                    found[f"{op.type}:{name}:{MIL_pb2.DataType.Name(value.type.tensorType.dataType)}"] += 1
    return found


def check_contract(component: str, path: Path, expected: dict) -> dict:
    found = package_io(path)
    for kind in ("inputs", "outputs"):
        got = [(f["name"], f["dtype"], f["shape"]) for f in found[kind]]
        if got != [tuple(e) for e in expected[kind]]:
            raise ContractError(f"{path.name}: {kind} {got} are not the {component} contract's {expected[kind]}")
    return found


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def ordinary_permissions(path: Path) -> None:
    """coremltools writes packages private (0600/0700); give them the permissions of any file we write."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *Path(path).rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


# ----------------------------------------------------------------------------------------------- conversion


def drop_aliases(program) -> None:
    """Replace `aten.alias` nodes by their input: coremltools 9 has no translation for them (CLIP's position ids)."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()


def convert_package(module: nn.Module, sample: tuple, component: str, expected: dict, target: str):
    """torch.export at the sample's fixed shape, then coremltools; returns the (uncompressed) fp16 MLModel."""
    ct = import_coremltools()
    with torch.no_grad(), quiet_exporter():
        program = torch.export.export(module.eval(), sample).run_decompositions({})
    drop_aliases(program)
    numpy_types = {"int32": np.int32, "float32": np.float32}
    inputs = [ct.TensorType(name=n, shape=tuple(s), dtype=numpy_types[d]) for n, d, s in expected["inputs"]]
    outputs = [ct.TensorType(name=n, dtype=numpy_types[d]) for n, d, _ in expected["outputs"]]
    torch_fp16 = component in TORCH_FP16
    with quiet_coremltools():
        mlmodel = ct.convert(
            program,
            inputs=inputs,
            outputs=outputs,
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=ct.precision.FLOAT32 if torch_fp16 else ct.precision.FLOAT16,
            skip_model_load=True,  # Linux has no Core ML runtime
        )
    del program
    return mlmodel


def describe(mlmodel, component: str, label: str, metadata: dict) -> None:
    """Descriptions of every input and output, and what the package is, for Xcode and for apps."""
    mlmodel.author = f"meissonic-edge {__version__}"
    mlmodel.version = __version__
    mlmodel.short_description = SUMMARIES[component] + (f" at {label} pixels" if label else "")
    spec = mlmodel.get_spec()  # names only; descriptions are set through the model
    for feature in list(spec.description.input):
        text = TOKENS_DESCRIPTION[component] if feature.name == "tokens" else DESCRIPTIONS[feature.name]
        mlmodel.input_description[feature.name] = text
    for feature in list(spec.description.output):
        text = TOKENS_DESCRIPTION[component] if feature.name == "tokens" else DESCRIPTIONS[feature.name]
        mlmodel.output_description[feature.name] = text
    mlmodel.user_defined_metadata.update({f"meissonic_edge.{k}": str(v) for k, v in metadata.items()})


def example_inputs(component: str, inputs: dict, batch: int, size, config: TransformerConfig) -> tuple:
    """Sample inputs of the package's fixed shape (values only need the right shape and type)."""
    generator = torch.Generator().manual_seed(0)
    if component == "text_encoder":
        return (inputs["input_ids"][:batch],)
    grid = (size[0] // VQ_STRIDE, size[1] // VQ_STRIDE)
    if component == "transformer":
        tokens = torch.randint(0, config.codebook_size, (batch, *grid), generator=generator)
        rest = [inputs[name][:batch] for name in ("encoder_hidden_states", "text_embeds", "micro_conds", "timestep")]
        return (tokens, *rest)
    if component == "vq_decoder":
        return (torch.randint(0, config.codebook_size, (1, *grid), generator=generator),)
    return (torch.rand((1, 3, *size), generator=generator),)


# ----------------------------------------------------------------------------------------------- fidelity


def mangle(name: str) -> str:
    """How torch.export names a parameter's placeholder, and coremltools the constant it becomes."""
    return "p_" + name.replace(".", "_")


def strip_suffixes(name: str) -> str:
    for suffix in (*COMPRESSED_SUFFIXES, "_to_fp16"):
        name = name.removesuffix(suffix)
    return name


@dataclass(frozen=True)
class Source:
    """Where a package weight comes from: constant = scale * parameter.permute(axes).reshape(constant shape)."""

    param: str
    axes: tuple[int, ...] | None = None  # None: a plain reshape
    scale: float = 1.0


def weight_sources(program, module: nn.Module, prefix: str) -> dict[str, Source]:
    """Map each weight constant of the fp16 program (before compression) to the PyTorch parameter it holds.

    Most constants keep their parameter's name. The converter folds a few into new constants: the reshapes
    and permutations of the 1x1 and 2x2 convolutions our transformer computes as matrix products, and
    constant factors (the VQ encoder's `2 *` moves into its `quant_conv`). Those are found by value.
    """
    params = dict(module.named_parameters())
    by_name = {mangle(prefix + name): name for name in params}
    sources, unmatched = {}, []
    for op in weight_constants(program):
        name = by_name.get(strip_suffixes(op.name))
        if name is not None and params[name].numel() == op.outputs[0].val.size:
            sources[op.name] = Source(name)
        else:
            unmatched.append(op)
    used = {source.param for source in sources.values()}
    for op in unmatched:
        source = trace_constant(op.outputs[0].val, {k: v for k, v in params.items() if k not in used})
        if source is None:
            raise ParityError(f"cannot trace the package weight {op.name} back to a PyTorch parameter")
        sources[op.name] = source
        used.add(source.param)
    return sources


def trace_constant(value: np.ndarray, params: dict) -> Source | None:
    """The parameter, axis permutation and factor whose product is `value` (up to fp16 rounding), if any."""
    value = value.astype(np.float32)
    peak = float(np.abs(value).max())
    for name, param in params.items():
        if param.numel() != value.size:
            continue
        candidate = param.detach().float().numpy()
        candidate_peak = float(np.abs(candidate).max())
        if peak == 0 or candidate_peak == 0:
            continue
        for sign in (1.0, -1.0):
            scale = sign * peak / candidate_peak
            close = dict(rtol=2e-3, atol=2e-3 * peak)
            if not np.allclose(np.sort(value.ravel()), np.sort(scale * candidate.ravel()), **close):
                continue
            for axes in itertools.permutations(range(candidate.ndim)):
                if np.allclose(value, scale * candidate.transpose(axes).reshape(value.shape), **close):
                    return Source(name, None if axes == tuple(range(candidate.ndim)) else axes, scale)
    return None


def decompressed_weights(path: Path) -> dict[str, np.ndarray]:
    """Every constant of a saved package, read from disk, compressed ones decompressed by coremltools.

    The package's ML program is loaded the way `coremltools.optimize.coreml.decompress_weights` loads it
    (its MIL loader), and each constexpr op is materialised by coremltools' own reference implementation
    of it; `decompress_weights` itself also re-serialises the model, which is ten times slower.
    """
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_program

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    with quiet_coremltools():
        program = load_program(
            spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir
        )
    values = {}
    for op in program.functions["main"].operations:
        if op.op_type == "const" and op.outputs[0].val is not None:
            values[strip_suffixes(op.name)] = op.outputs[0].val
        elif op.op_type.startswith("constexpr_"):
            values[strip_suffixes(op.name)] = op.materialized_val_inference()
    return values


def load_package_weights(module: nn.Module, path: Path, sources: dict) -> None:
    """Put the package's (decompressed) weights into `module`'s parameters, undoing the converter's layouts."""
    values = decompressed_weights(path)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for constant, source in sources.items():
            key = strip_suffixes(constant)
            if key not in values:
                raise ParityError(f"{path.name} has no weight {key} (expected for {source.param})")
            param = params[source.param]
            value = torch.from_numpy(np.asarray(values[key], dtype=np.float32)) / source.scale
            if source.axes is None:
                param.copy_(value.reshape(param.shape))
            else:
                permuted = [param.shape[a] for a in source.axes]
                param.copy_(value.reshape(permuted).permute(*np.argsort(source.axes).tolist()))


def fidelity_checks(component: str, got: list[np.ndarray], refs: list[np.ndarray], precision: str) -> list[Check]:
    key = THRESHOLD_KEY[precision]
    if component == "text_encoder":
        checks = []
        for name, g, r in zip(["text_embeds", "hidden_states"], got, refs, strict=True):
            checks += [max_abs_check(name, g, r, key), cosine_check(name, g, r, key)]
        return checks
    if component == "transformer":
        return [max_abs_check("logits", got[0], refs[0], key), cosine_check("logits", got[0], refs[0], key)]
    if component == "vq_decoder":
        return [Check("image_psnr_db", psnr(got[0], refs[0]), MIN_PSNR_DB.get(key, MIN_PSNR_DB_4BIT), True)]
    agreement = float((got[0] == refs[0]).mean()) if got[0].shape == refs[0].shape else 0.0
    threshold = MIN_TOKEN_AGREEMENT.get(key, MIN_TOKEN_AGREEMENT_4BIT)
    return [Check("token_agreement", agreement, threshold, True)]


def measure_fidelity(component: str, load, path: Path, sources: dict, inputs: dict, refs, precision: str) -> dict:
    """The fp32 module with the package's decompressed weights against the fp32 reference; raises ParityError."""
    module = load()
    load_package_weights(module, path, sources)
    with torch.no_grad():
        out = module(**inputs)
    got = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    del module
    return require(component, fidelity_checks(component, got, refs, precision))


# ----------------------------------------------------------------------------------------------- components


def convert_component(
    component: str, load, inputs: dict, out_dir: Path, plan: Plan, config: TransformerConfig, metadata: dict
) -> dict:
    """The recipe shared by every graph: reference, one package per shape, compression, contract, fidelity."""
    precision = plan.precisions[component]
    batch = plan.transformer_batch if component in ("text_encoder", "transformer") else 1
    graph = load()
    refs = reference_outputs(component, graph, inputs)
    module, prefix = (Float16Graph(graph), "inner.") if component in TORCH_FP16 else (graph, "")
    packages, sources, files = {}, None, []
    for label, size in plan.shapes(component):
        expected = contract(component, batch, size, config)
        sample = example_inputs(component, inputs, batch, size, config)
        mlmodel = convert_package(module, sample, component, expected, plan.target)
        if sources is None:  # the same weights in every package of the graph
            sources = weight_sources(mlmodel._mil_program, graph, prefix)
        mlmodel, compression = compress(mlmodel, precision, plan.target)
        package_metadata = {
            **metadata,
            "component": component,
            "precision": precision,
            "settings": json.dumps(compression_settings(precision, plan.target)),
            "batch": batch,
            **({"height": size[0], "width": size[1]} if size else {}),
        }
        describe(mlmodel, component, label, package_metadata)
        path = out_dir / (f"{component}_{label}.mlpackage" if label else f"{component}.mlpackage")
        with quiet_coremltools():
            mlmodel.save(str(path))
        del mlmodel
        gc.collect()
        ordinary_permissions(path)
        io_spec = check_contract(component, path, expected)
        packages[label or "any"] = {
            "package": path.name,
            **({"height": size[0], "width": size[1]} if size else {}),
            "batch": batch,
            **io_spec,
            "bytes": package_bytes(path),
            "compression": {**compression, "constexpr_ops_on_disk": constexpr_counts(path)},
        }
        files += sorted(p.relative_to(out_dir).as_posix() for p in path.rglob("*") if p.is_file())
    del module, graph  # plain modules: reference counting frees them (the converter's programs need gc, above)
    first = out_dir / next(iter(packages.values()))["package"]
    parity = measure_fidelity(component, load, first, sources, inputs, refs, precision)
    root_file = f"{first.name}/Manifest.json"
    entry = {
        "precision": precision,
        "settings": compression_settings(precision, plan.target),
        "file": root_file,
        "external_data": [f for f in files if f != root_file],
        "packages": packages,
        "parity": parity,
        "parity_method": "the package's decompressed weights in the fp32 PyTorch reference, on the check inputs",
    }
    if precision != "fp16":
        left = sorted({w["name"] for p in packages.values() for w in p["compression"]["float16_weights"]})
        entry["quantization"] = {"float_weight_ops": len(left), "float_weight_op_names": left}
    return entry


def convert_text_encoder(load, inputs, out_dir, plan, config, metadata) -> dict:
    return convert_component("text_encoder", load, inputs, out_dir, plan, config, metadata)


def convert_transformer(load, inputs, out_dir, plan, config, metadata) -> dict:
    return convert_component("transformer", load, inputs, out_dir, plan, config, metadata)


def convert_vq_decoder(load, inputs, out_dir, plan, config, metadata) -> dict:
    return convert_component("vq_decoder", load, inputs, out_dir, plan, config, metadata)


def convert_vq_encoder(load, inputs, out_dir, plan, config, metadata) -> dict:
    return convert_component("vq_encoder", load, inputs, out_dir, plan, config, metadata)


CONVERTERS = {
    "text_encoder": convert_text_encoder,
    "transformer": convert_transformer,
    "vq_decoder": convert_vq_decoder,
    "vq_encoder": convert_vq_encoder,
}


# ----------------------------------------------------------------------------------------------- the bundle


def export_coreml(
    model_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp16",
    minimum_target: str = "iOS18",
    sizes=(512, 1024),
    transformer_batch: int = 2,
    text_encoder_dir: str | Path | None = None,
    check_size: tuple[int, int] = (256, 256),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert every component of `model_dir` to CoreML packages in the bundle `out_dir`; return its path.

    `precision`: fp16, int8, int4 (iOS18 / macOS15), palettize4, palettize6 — for the text encoder and the
    transformer, the VQ graphs staying fp16 — or per graph: "transformer=int4,text_encoder=int8,vq_decoder=fp16".
    `minimum_target`: iOS17, iOS18, macOS14 or macOS15. `sizes`: image sizes in pixels (N, "HxW" or (H, W)),
    one package of the transformer and of each VQ graph per size. `transformer_batch`: 2 runs guidance in one
    call ([negative; prompt]), 1 takes one call per half; the text encoder gets the same batch.

    Options are checked before any work; every graph's decompressed weights are checked against PyTorch at
    `check_size`, and on any failure nothing is left at `out_dir`.
    """
    model_dir = Path(model_dir)
    text_encoder_dir = Path(text_encoder_dir) if text_encoder_dir else None
    check_model_dir(model_dir, text_encoder_dir)  # every file agrees with the others, before any work
    scheduler = load_scheduler_config(model_dir)
    config = TransformerConfig.from_json_file(transformer_folder(model_dir) / "config.json")
    plan = make_plan(precision, minimum_target, sizes, transformer_batch, config)
    check_size = tuple(check_size)
    GenerationOptions(height=check_size[0], width=check_size[1]).validate(config.token_stride)
    reference_tokenizer = load_clip_tokenizer(model_dir, text_encoder_dir)
    import_coremltools()  # the export extra, before anything is written
    metadata = {
        "version": __version__,
        "source": model_dir.name,
        "text_encoder_source": text_encoder_dir.name if text_encoder_dir else model_dir.name,
        "minimum_target": plan.target,
        "mask_token_id": scheduler.mask_token_id,
        "codebook_size": config.codebook_size,
    }
    graphs: dict[str, dict] = {}

    with atomic_directory(out_dir, overwrite) as tmp:
        copy_tokenizer(model_dir, text_encoder_dir, tmp)
        tokenizer_parity = check_tokenizer(reference_tokenizer, tmp / "tokenizer")
        cases = check_cases(model_dir, text_encoder_dir, tmp / "tokenizer", check_size)
        bar = tqdm(total=len(CONVERTERS), disable=not progress, unit="graph")
        for component, load, inputs in cases:
            bar.set_description(f"converting {component} ({plan.precisions[component]})")
            logger.info("converting %s (%s)", component, plan.precisions[component])
            graphs[component] = CONVERTERS[component](load, inputs, tmp, plan, config, metadata)
            bar.update()
        bar.close()

        manifest = {
            "created_by": f"meissonic-edge {__version__}",
            "backend": "coreml",
            "minimum_target": plan.target,
            "sizes": [list(s) for s in plan.sizes],
            "transformer_batch": plan.transformer_batch,
            "recipe": {
                "name": str(precision),
                "components": {
                    c: {"precision": p, **compression_settings(p, plan.target)} for c, p in plan.precisions.items()
                },
            },
            "source": source_section(model_dir, text_encoder_dir),
            "model": model_section(scheduler, config),
            "defaults": defaults_section(Path(model_dir)),
            "tokenizer": {"dir": "tokenizer", "parity": tokenizer_parity},
            "graphs": graphs,
            "check_size": list(check_size),
        }
        write_manifest(tmp, manifest)
    return Path(out_dir)
