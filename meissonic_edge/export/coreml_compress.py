"""Weight compression of a converted CoreML program: which weights (those of `WEIGHT_OPS`), the coremltools
configs of each precision and their fallbacks, 1-D k-means palettes, and the report of what was compressed.

The decisions behind it are in `to_coreml`'s docstring.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from meissonic_edge.export.coreml_tools import import_coremltools, quiet_coremltools

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8", "int4", "palettize4", "palettize6")
BLOCKWISE_TARGETS = ("iOS18", "macOS15")  # constexpr_blockwise_shift_scale, grouped-channel palettes
WEIGHT_OPS = ("linear", "matmul", "conv", "conv_transpose", "gather")  # their constant weights are compressed
INT4_BLOCK_SIZE = 32  # int4: weights per scale, along the input dimension (a row of an embedding table)
PALETTE_GROUP_SIZE = 16  # palettes: output channels (embedding rows) sharing one look-up table
KMEANS_ITERATIONS = 30
COMPRESSED_SUFFIXES = ("_quantized", "_palettized")  # what coremltools appends to a compressed constant's name


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
