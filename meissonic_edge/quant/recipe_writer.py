"""Sizes, budget and the written outputs: from measured int4 sensitivities to a mixed-precision recipe.

`write_recipe` sorts the layer groups by KL and moves the most damaging ones to 8 bits (MatMulNBits bits=8)
while the estimated size of the transformer's weights stays within a budget, and writes a JSON recipe for
`meissonic_edge.quant.quantize` plus a report (JSON and a markdown table) beside it. `read_report` reads the
measurements back from a report, so that another budget needs no new measurement. The measurement itself is
`meissonic_edge.quant.sensitivity`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from meissonic_edge.errors import OptionsError
from meissonic_edge.fileio import check_file_path, write_text_atomic
from meissonic_edge.model.transformer import MeissonicTransformer
from meissonic_edge.quant.sensitivity import ALL_GROUPS, BLOCK_SIZES, GroupSensitivity, layer_groups
from meissonic_edge.runtime.config import TransformerConfig

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4  # fp32: the reference size, and whatever stays float (biases, norm weights)
SCALE_BYTES = 4  # one float32 scale per block: MatMulNBits keeps the graph's float type for its scales
MB = 1_000_000  # budgets and sizes are in MB of 10^6 bytes


# ----------------------------------------------------------------------------------------------- sizes and budget


def int4_bytes(params: int, block_size: int) -> int:
    """MatMulNBits bits=4: two weights a byte, one float32 scale per block (symmetric: no zero points)."""
    return math.ceil(params / 2) + math.ceil(params / block_size) * SCALE_BYTES


def int8_bytes(params: int, block_size: int) -> int:
    """MatMulNBits bits=8: a byte a weight, one float32 scale per block."""
    return params + math.ceil(params / block_size) * SCALE_BYTES


@dataclass(frozen=True)
class Sizes:
    """Estimated bytes of the transformer's weights on disk."""

    fp32: int
    all_int4: int
    all_int8: int

    @classmethod
    def of(cls, groups, block_size: int) -> Sizes:
        """`groups`: anything with `params` and `float_params` (LayerGroup, GroupSensitivity)."""
        floats = sum(g.float_params for g in groups) * FLOAT_BYTES
        return cls(
            fp32=sum(g.params + g.float_params for g in groups) * FLOAT_BYTES,
            all_int4=floats + sum(int4_bytes(g.params, block_size) for g in groups),
            all_int8=floats + sum(int8_bytes(g.params, block_size) for g in groups),
        )

    def budget(self, budget_mb: float | None = None, budget_ratio: float | None = 0.3) -> int:
        """The budget in bytes: `budget_mb` if given, else `budget_ratio` of the fp32 size; refuse one below int4."""
        if budget_mb is not None:
            if not math.isfinite(budget_mb) or budget_mb <= 0:
                raise OptionsError(f"budget must be a positive number of MB, got {budget_mb}")
            budget = int(budget_mb * MB)
        else:
            if budget_ratio is None or not math.isfinite(budget_ratio) or budget_ratio <= 0:
                raise OptionsError(f"budget ratio must be a positive fraction of the fp32 size, got {budget_ratio}")
            budget = int(budget_ratio * self.fp32)
        if budget < self.all_int4:
            least_mb = math.ceil(self.all_int4 / MB * 100) / 100
            least_ratio = math.ceil(self.all_int4 / self.fp32 * 1000) / 1000
            raise OptionsError(
                f"a budget of {budget / MB:.2f} MB is below this transformer's all-int4 size, {self.all_int4 / MB:.2f}"
                f" MB ({self.all_int4 / self.fp32:.3f} of fp32): give at least --budget-mb {least_mb} "
                f"or --budget-ratio {least_ratio}"
            )
        return budget


def model_sizes(model_dir: str | Path, block_size: int = 32) -> Sizes:
    """Sizes from the transformer's config alone (a model on the meta device): to check a budget before measuring."""
    from meissonic_edge.model.layout import transformer_folder

    config = TransformerConfig.from_json_file(transformer_folder(Path(model_dir)) / "config.json")
    with torch.device("meta"):
        model = MeissonicTransformer(config)
    return Sizes.of(layer_groups(model), block_size)


def check_budget(
    model_dir: str | Path, budget_mb: float | None = None, budget_ratio: float | None = 0.3, block_size: int = 32
) -> int:
    """The budget in bytes, or a one-line error if it cannot hold the all-int4 transformer."""
    if block_size not in BLOCK_SIZES:
        raise OptionsError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}")
    return model_sizes(model_dir, block_size).budget(budget_mb, budget_ratio)


# ----------------------------------------------------------------------------------------------- the recipe


def check_recipe_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    if out_path.suffix != ".json":
        raise OptionsError(f"the recipe must be a .json file (that is how --precision tells it apart), got {out_path}")
    return check_file_path(out_path)


def report_paths(out_path: str | Path) -> tuple[Path, Path]:
    """The report beside a recipe: `NAME.sensitivity.json` and `NAME.sensitivity.md`."""
    out_path = Path(out_path)
    stem = out_path.with_suffix("")
    return stem.with_name(stem.name + ".sensitivity.json"), stem.with_name(stem.name + ".sensitivity.md")


def read_report(path: str | Path) -> list[GroupSensitivity]:
    """The measurements in a `NAME.sensitivity.json` report: to write a recipe for another budget without
    measuring again (`write_recipe(read_report(path), ...)`)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        fields = {"name", "patterns", "params", "float_params", "kl", "agreement", "block_size"}
        groups = [
            GroupSensitivity(**{**{k: g[k] for k in fields}, "patterns": tuple(g["patterns"])})
            for g in report["groups"]
        ]
    except FileNotFoundError:
        raise OptionsError(f"sensitivity report not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise OptionsError(f"{path} is not a sensitivity report: {e!r}") from None
    order = {name: i for i, name in enumerate(report.get("order", []))}
    groups.sort(key=lambda g: order.get(g.name, len(order)))
    combined = report.get("all_groups_int4")
    if combined:
        params, floats = sum(g.params for g in groups), sum(g.float_params for g in groups)
        block_size = groups[0].block_size if groups else 32
        groups.append(
            GroupSensitivity(
                ALL_GROUPS, ("*",), params, floats, combined["kl"], combined["agreement"], block_size, scope="all"
            )
        )
    return groups


def choose_int8(groups: list[GroupSensitivity], sizes: Sizes, budget: int) -> tuple[list[str], int]:
    """Most damaging first, move a group to 8 bits if the total still fits; return (names, estimated bytes)."""
    total, chosen = sizes.all_int4, []
    for g in sorted(groups, key=lambda g: g.kl, reverse=True):
        extra = int8_bytes(g.params, g.block_size) - int4_bytes(g.params, g.block_size)
        if total + extra <= budget:
            chosen.append(g.name)
            total += extra
    return chosen, total


def write_recipe(
    results: list[GroupSensitivity],
    out_path: str | Path,
    budget_mb: float | None = None,
    budget_ratio: float | None = 0.3,
    name: str | None = None,
    text_encoder: str = "int8",
    measurement: dict | None = None,
) -> dict:
    """Write the mixed-precision recipe for `results` (and its report beside it); return the recipe.

    The transformer is int4 (RTN, the measured block size) with the most KL-damaged groups at 8 bits,
    as many as the budget holds: `budget_mb` MB of transformer weights, or else `budget_ratio` of fp32.
    """
    out_path = check_recipe_path(out_path)
    groups = [r for r in results if r.scope == "group"]
    combined = next((r for r in results if r.scope == "all"), None)
    if not groups:
        raise OptionsError("no group measurements to build a recipe from")
    block_size = groups[0].block_size
    if any(g.block_size != block_size for g in groups):
        raise OptionsError("the measurements mix block sizes: measure again with one block size")
    sizes = Sizes.of(groups, block_size)
    budget = sizes.budget(budget_mb, budget_ratio)
    chosen, estimate = choose_int8(groups, sizes, budget)

    by_name = {g.name: g for g in groups}
    recipe = {
        "name": name or out_path.stem,
        "description": (
            f"int4 RTN (block {block_size}) with the {len(chosen)} of {len(groups)} layer groups that int4 damages "
            f"most (measured logit KL) at 8 bits; transformer weights ~{megabytes(estimate / MB)} "
            f"({estimate / sizes.fp32:.3f} of fp32), budget {megabytes(budget / MB)}"
        ),
        "components": {
            "transformer": {
                "precision": "int4",
                "algorithm": "rtn",
                "block_size": block_size,
                "symmetric": True,
                "int8_layers": [p for n in chosen for p in by_name[n].patterns],
            },
            "text_encoder": text_encoder,
        },
    }
    report = {
        "recipe": out_path.name,
        "budget_mb": budget / MB,
        "estimated_mb": estimate / MB,
        "fp32_mb": sizes.fp32 / MB,
        "all_int4_mb": sizes.all_int4 / MB,
        "all_int8_mb": sizes.all_int8 / MB,
        "measurement": measurement or {},
        "all_groups_int4": None if combined is None else {"kl": combined.kl, "agreement": combined.agreement},
        "order": [g.name for g in groups],  # forward order; `groups` below is sorted by KL
        "groups": [
            {**g.to_dict(), "precision": "int8" if g.name in chosen else "int4"}
            for g in sorted(groups, key=lambda g: g.kl, reverse=True)
        ],
    }
    report_json, report_md = report_paths(out_path)
    write_text_atomic(out_path, json.dumps(recipe, indent=2) + "\n")
    write_text_atomic(report_json, json.dumps(report, indent=2) + "\n")
    write_text_atomic(report_md, markdown_report(report))
    logger.info("wrote %s, %s and %s", out_path, report_json.name, report_md.name)
    return recipe


def megabytes(mb: float) -> str:
    return f"{mb:,.1f} MB" if mb >= 10 else f"{mb:.3f} MB"


def markdown_report(report: dict) -> str:
    sizes = {k: megabytes(report[k]) for k in ("fp32_mb", "all_int4_mb", "all_int8_mb", "budget_mb", "estimated_mb")}
    lines = [
        f"# int4 sensitivity: {report['recipe']}",
        "",
        f"Transformer weights: fp32 {sizes['fp32_mb']}, all int4 {sizes['all_int4_mb']}, "
        f"all int8 {sizes['all_int8_mb']}; budget {sizes['budget_mb']}, this recipe ~{sizes['estimated_mb']}.",
        "",
    ]
    if report["measurement"]:
        lines += ["Measured with " + ", ".join(f"{k}={v}" for k, v in report["measurement"].items()) + ".", ""]
    if report["all_groups_int4"]:
        combined = report["all_groups_int4"]
        lines += [f"All groups at int4 at once: KL {combined['kl']:.4g}, agreement {combined['agreement']:.4f}.", ""]
    lines += [
        "KL: mean KL(fp32 || int4) of the guided token distributions at the positions still masked; "
        "agreement: share of those positions whose most likely token is unchanged. Most damaging first.",
        "",
        "| group | params | KL | agreement | precision |",
        "|---|---:|---:|---:|---|",
    ]
    for g in report["groups"]:
        lines.append(f"| {g['name']} | {g['params']:,} | {g['kl']:.4g} | {g['agreement']:.4f} | {g['precision']} |")
    return "\n".join(lines) + "\n"
