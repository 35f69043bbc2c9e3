"""Parity: an exported graph against the PyTorch reference, each measurement beside its named threshold.

Both exporters (ONNX and CoreML) gate every graph here: `require()` raises `ParityError` naming each failed
check, so a graph that does not compute what PyTorch computes is never written into a bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meissonic_edge.errors import MeissonicError

# Parity thresholds: the graph in onnxruntime against the PyTorch reference, same inputs.
# Max-abs thresholds are relative to the reference's largest magnitude (at least 1).
# fp32 and fp16 graphs must compute what PyTorch computes. For int8 and int4 the gate catches a broken
# quantization (a wrong axis or scale gives cosines near 0); what each precision costs is measured against
# fp32 by `meissonic-edge bench` and recorded here as the measured value beside the gate.
MAX_ABS_REL = {"fp32": 1e-3, "fp16": 3e-2, "int8": 0.25, "int4": 0.6}  # text features, logits
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.9995, "int8": 0.99, "int4": 0.9}  # logits and text features, flattened
MIN_PSNR_DB = {"fp32": 40.0, "fp16": 35.0, "int8": 25.0}  # decoded images
MIN_TOKEN_AGREEMENT = {"fp32": 0.995, "fp16": 0.97, "int8": 0.9}  # VQ encoder: share of tokens equal to PyTorch's


class ParityError(MeissonicError):
    """An exported graph does not compute what the PyTorch reference computes."""


@dataclass(frozen=True)
class Check:
    """One parity measurement against its threshold."""

    metric: str
    value: float
    threshold: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def as_dict(self) -> dict:
        return {"value": float(self.value), "threshold": self.threshold, "passed": bool(self.passed)}


def max_abs_check(name: str, got: np.ndarray, ref: np.ndarray, precision: str) -> Check:
    scale = max(1.0, float(np.abs(ref).max()))
    return Check(f"{name}_max_abs_rel", float(np.abs(got - ref).max()) / scale, MAX_ABS_REL[precision], False)


def cosine_check(name: str, got: np.ndarray, ref: np.ndarray, precision: str) -> Check:
    a, b = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return Check(f"{name}_cosine", cosine, MIN_COSINE[precision], True)


def psnr(got: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((got.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def require(component: str, checks: list[Check]) -> dict:
    """Raise ParityError naming every failed check; return the checks for the manifest."""
    failed = [c for c in checks if not c.passed]
    if failed:
        detail = ", ".join(f"{c.metric}={c.value:.6g} (threshold {c.threshold})" for c in failed)
        raise ParityError(f"{component} does not match the PyTorch reference: {detail}")
    return {c.metric: c.as_dict() for c in checks}
