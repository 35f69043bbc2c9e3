"""A saved `.mlpackage`, read back: the graph contract its inputs and outputs must match, its ops, weight
dtypes, size and permissions, and its weights, decompressed and put into the fp32 PyTorch module to measure
what compression did (the fidelity check that raises `ParityError`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meissonic_edge import fileio
from meissonic_edge.errors import MeissonicError
from meissonic_edge.export.coreml_compress import COMPRESSED_SUFFIXES, weight_constants
from meissonic_edge.export.coreml_tools import import_coremltools, quiet_coremltools
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
from meissonic_edge.runtime.config import VQ_STRIDE, TransformerConfig
from meissonic_edge.runtime.tokenizer import MAX_LENGTH

MANIFEST_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32"}

# Fidelity thresholds: the fp32 PyTorch module holding the package's decompressed weights, against the
# fp32 reference on the same inputs. The ONNX export's thresholds for the same number of bits.
THRESHOLD_KEY = {"fp16": "fp16", "int8": "int8", "int4": "int4", "palettize6": "int8", "palettize4": "int4"}
MIN_PSNR_DB_4BIT = 20.0  # decoded images, VQ decoder compressed to 4 bits (only when asked)
MIN_TOKEN_AGREEMENT_4BIT = 0.7  # VQ encoder compressed to 4 bits (only when asked)


class ContractError(MeissonicError):
    """A converted package's inputs or outputs are not the graph contract's."""


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
    for p in [path, *Path(path).rglob("*")]:
        fileio.ordinary_permissions(p, 0o777 if p.is_dir() else 0o666)


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
