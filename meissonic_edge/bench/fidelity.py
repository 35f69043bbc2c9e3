"""How far a run's outputs are from the fp32 variant's: transformer logits on the same inputs (cosine, KL,
top-1 agreement), final tokens, and images (PSNR, SSIM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meissonic_edge.errors import OptionsError

LOGIT_CHUNK = 256  # positions per float64 softmax chunk: bounds the temporaries to LOGIT_CHUNK x codebook


# ------------------------------------------------------------------------------------------------------- logits


def logit_agreement(reference: np.ndarray, got: np.ndarray) -> dict:
    """Cosine of two logit tensors (..., K), mean KL(softmax(reference) || softmax(got)) per position, and the
    share of positions with the same top entry; in float64, LOGIT_CHUNK positions at a time."""
    codebook = reference.shape[-1]
    reference, got = reference.reshape(-1, codebook), got.reshape(-1, codebook)
    dot = norm_ref = norm_got = kl = 0.0
    same_top = 0
    for start in range(0, len(reference), LOGIT_CHUNK):
        p = reference[start : start + LOGIT_CHUNK].astype(np.float64)  # (n, K)
        q = got[start : start + LOGIT_CHUNK].astype(np.float64)
        dot += float((p * q).sum())
        norm_ref += float((p * p).sum())
        norm_got += float((q * q).sum())
        same_top += int((p.argmax(-1) == q.argmax(-1)).sum())
        log_p = p - p.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        log_q = q - q.max(-1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
        kl += float((np.exp(log_p) * (log_p - log_q)).sum())
    positions = len(reference)
    return {
        "cosine": dot / max(np.sqrt(norm_ref * norm_got), 1e-300),
        "kl_mean": kl / positions,
        "top1_agreement": same_top / positions,
    }


def summarize_logits(logits: dict) -> dict:
    steps = logits["steps"]
    return {
        "steps": steps,
        "cosine_min": min(s["cosine"] for s in steps),
        "kl_mean_max": max(s["kl_mean"] for s in steps),
        "top1_agreement_min": min(s["top1_agreement"] for s in steps),
    }


# ----------------------------------------------------------------------------------------------- image fidelity


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    window = np.exp(-(x**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004) of two (H, W, C) images: 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, over the positions where the window fits, per channel, averaged."""
    window = gaussian_window()
    if min(a.shape[:2]) < len(window):
        raise OptionsError(f"SSIM needs images of at least {len(window)} pixels a side, got {a.shape[:2]}")

    def blur(x):  # separable 'valid' filtering: (H, W, C) -> (H-10, W-10, C)
        rows = np.lib.stride_tricks.sliding_window_view(x, len(window), axis=0) @ window
        return np.lib.stride_tricks.sliding_window_view(rows, len(window), axis=1) @ window

    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    covariance = blur(a * b) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * covariance + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float((numerator / denominator).mean())


def read_image(path: Path) -> np.ndarray:
    """A saved PNG as (H, W, 3) float64 in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def output_fidelity(folder: Path, reference_folder: Path, prompts: list[str]) -> dict:
    """Final tokens and images of one run against the fp32 variant's, prompt by prompt; the worst prompt overall."""
    from meissonic_edge.export.parity import psnr

    per_prompt = []
    for index, prompt in enumerate(prompts):
        tokens = np.load(folder / f"tokens-{index}.npy")
        expected_tokens = np.load(reference_folder / f"tokens-{index}.npy")
        image = read_image(folder / f"image-{index}.png")
        expected_image = read_image(reference_folder / f"image-{index}.png")
        per_prompt.append(
            {
                "prompt": prompt,
                "token_agreement": float((tokens == expected_tokens).mean()),
                "psnr_db": psnr(image, expected_image),
                "ssim": ssim(image, expected_image),
            }
        )
    worst = {key: min(p[key] for p in per_prompt) for key in ("token_agreement", "psnr_db", "ssim")}
    return {**worst, "per_prompt": per_prompt}
