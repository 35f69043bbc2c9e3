"""What the bench's parent, its child processes and its report share: the names in the result files (the
phases, the reference variants) and the strict JSON they are written in. A leaf of the bench: it imports none
of its modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from meissonic_edge.fileio import write_atomic

REFERENCE_SPEC = "fp32"  # the variant every other one is compared with
TORCH_NAME = "torch-fp32"  # the PyTorch reference's name in the report
PHASES = ("load", "text_encoding", "sampling", "vq_decode")


def write_json(path: Path, data) -> Path:
    return write_atomic(path, lambda f: f.write((json.dumps(json_safe(data), indent=2) + "\n").encode()))


def json_safe(value):
    """Strict JSON: infinite and NaN floats become the strings "inf", "-inf" and "nan"."""
    if isinstance(value, float) and not np.isfinite(value):
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
