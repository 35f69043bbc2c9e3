"""Rendering a bench report: report.md, report.json, grid.png and the plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meissonic_edge.bench.results import PHASES, REFERENCE_SPEC, TORCH_NAME, write_json
from meissonic_edge.fileio import write_atomic
from meissonic_edge.runtime.sampler import GenerationOptions

PHASE_LABELS = {"load": "load", "text_encoding": "text encoding", "sampling": "sampling", "vq_decode": "VQ decode"}
GRID_MIN_CELL = 128  # smaller images are enlarged in the grid, by a whole factor (nearest neighbour), to be seen
PLOT_SIZE = (8.0, 4.5)  # inches at PLOT_DPI: 800 x 450 pixels
PLOT_DPI = 100


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or (isinstance(value, float) and not np.isfinite(value)):
        return str(value)  # report.json stores infinities as "inf"
    return format(value, spec)


def markdown(report: dict) -> str:
    import shlex

    machine, settings = report["machine"], report["settings"]
    guidance = settings.get("guidance_scale")
    if guidance is None:  # a report from before the scale was recorded: the model's default then was guided
        guided = "guided (model batch 2)"
    elif guidance > 1:
        guided = f"guidance {guidance:g} (model batch 2)"
    else:
        guided = "no guidance (model batch 1)"
    if settings.get("token_temperature", 1.0) != 1.0:  # recorded since it became an option; 1 before
        guided += f", token temperature {settings['token_temperature']:g}"
    gumbel = settings.get("temperature")  # recorded since the demo model chose its own; (2, 0) before
    if gumbel is not None and list(gumbel) != list(GenerationOptions().temperature):
        guided += f", Gumbel temperature {gumbel[0]:g} to {gumbel[1]:g}"
    fp32 = next(v for v in report["variants"] if v["spec"] == REFERENCE_SPEC)
    graph_names = list(dict.fromkeys(name for v in report["variants"] for name in v["graphs"]))
    lines = [
        f"# Benchmark: {Path(report['model_dir']).name}",
        "",
        f"Command: `{shlex.join(report['command']['argv'])}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cpus_usable']} of {machine['cpu_count']} cores usable, "
        f"{fmt(machine['memory_mib'], ',')} MiB memory, {machine['platform']}; Python {machine['python']}, "
        f"onnxruntime {machine['onnxruntime']}, torch {machine['torch']}, numpy {machine['numpy']}.",
        "",
        f"Settings: sizes {settings['sizes']} px, {settings['steps']} steps, {guided}, "
        f"seed {settings['seed']}, {settings['repeats']} repeat(s) of {len(settings['prompts'])} prompt(s), "
        f"threads {settings['threads'] or 'default'}, low memory {'on' if settings['low_memory'] else 'off'} "
        "(ONNX variants only).",
        "",
        "## Size on disk (MiB)",
        "",
        f"| variant | spec | {' | '.join(graph_names)} | bundle total | vs fp32 |",
        "|---|---|" + "---|" * len(graph_names) + "---|---|",
    ]
    for v in report["variants"]:
        cells = [
            f"{fmt(v['graphs'][g]['bytes'] / 2**20, '.1f')} ({v['graphs'][g]['precision']})"
            if g in v["graphs"]
            else "-"
            for g in graph_names
        ]
        total = v["total_bytes"]
        lines.append(
            f"| {v['name']} | `{v['spec']}` | {' | '.join(cells)} | {total / 2**20:.1f} "
            f"| {total / fp32['total_bytes']:.2f} |"
        )
    if report["reference"]:
        weights = report["reference"]["weights_bytes"]
        parts = ", ".join(f"{name} {n / 2**20:.1f}" for name, n in weights.items())
        lines += [
            "",
            f"PyTorch reference weights (safetensors, MiB): {parts}; total {sum(weights.values()) / 2**20:.1f}.",
        ]
    lines += [
        "",
        "## Speed and memory",
        "",
        "Seconds per step include the numpy sampler's share. Peak RSS per phase is sampled every 5 ms; "
        "max RSS is the child process's own peak (VmHWM, imports included). Ratios are against the PyTorch "
        "reference at the same size (below 1: faster, smaller).",
        "",
        "| variant | size | load s | text s | s/step median (min-max) | VQ decode s "
        "| peak RSS MiB: load / text / sampling / decode | max RSS MiB | s/step vs torch | max RSS vs torch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        step, peaks, ratios = r["step_s"], r["peak_rss_mib"], r["ratios_vs_torch"] or {}
        lines.append(
            f"| {r['variant']} | {r['size']} | {fmt(r['load_s'])} | {fmt(r['text_encoding_s'])} "
            f"| {fmt(step['median'])} ({fmt(step['min'])}-{fmt(step['max'])}) | {fmt(r['vq_decode_s'])} "
            f"| {' / '.join(fmt(peaks[p], '.0f') for p in PHASES)} | {fmt(r['max_rss_mib'], '.0f')} "
            f"| {fmt(ratios.get('step_s_median'), '.2f')} | {fmt(ratios.get('max_rss'), '.2f')} |"
        )
    with_adherence = any(r["adherence"] is not None for r in report["runs"])
    with_outline = any(r.get("outline_iou") is not None for r in report["runs"])
    lines += [
        "",
        f"## Fidelity against the {REFERENCE_SPEC} ONNX variant",
        "",
        "Logits: each transformer graph on the fp32 run's own inputs at steps "
        f"{sorted({0, settings['steps'] // 2, settings['steps'] - 1})} (first prompt); the worst step is shown. "
        "KL is KL(p_fp32 || p_variant) per position, in nats. Tokens and images: whole generations with the same "
        "seed; the worst prompt is shown."
        + (
            " Adherence: the share of prompts whose image the evaluator accepts (one image per prompt)."
            if with_adherence
            else ""
        )
        + (
            " Outline IoU: the mean IoU of each image's shape with the prompted shape's ideal outline of the same"
            " area (ground truth: about 0.99)."
            if with_outline
            else ""
        ),
        "",
        "| variant | size | logit cosine | logit KL | top-1 agreement | token agreement | PSNR dB | SSIM |"
        + (" adherence |" if with_adherence else "")
        + (" outline IoU |" if with_outline else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" * (with_adherence + with_outline)),
    ]
    for r in report["runs"]:
        f, logits = r["fidelity"], r["fidelity"]["logits"] or {}
        lines.append(
            f"| {r['variant']} | {r['size']} | {fmt(logits.get('cosine_min'), '.6f')} "
            f"| {fmt(logits.get('kl_mean_max'), '.2e')} | {fmt(logits.get('top1_agreement_min'), '.4f')} "
            f"| {fmt(f['token_agreement'], '.4f')} | {fmt(f['psnr_db'], '.2f')} | {fmt(f['ssim'], '.4f')} |"
            + (f" {fmt(r['adherence'], '.2f')} |" if with_adherence else "")
            + (f" {fmt(r.get('outline_iou'), '.3f')} |" if with_outline else "")
        )
    lines += [
        "",
        "## Images",
        "",
        "![outputs side by side](grid.png)",
        "",
        "![seconds per step](step_time.png) ![peak RSS per phase](peak_rss.png) ![size on disk](size_on_disk.png)",
    ]
    return "\n".join(lines) + "\n"


def grid_image(report: dict, out_dir: Path):
    """The first images of every run side by side: a labelled column per variant, a row per size and prompt."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    runs = {(r["variant"], r["size"]): r for r in report["runs"]}
    columns = list(dict.fromkeys(r["variant"] for r in report["runs"]))
    sizes, prompts = report["settings"]["sizes"], report["settings"]["prompts"]
    rows = [
        (size, i, f"{size} px" + (f", prompt {i + 1}" if len(prompts) > 1 else ""))
        for size in sizes
        for i in range(len(prompts))
    ]
    pad = 8
    cell = {size: size * -(-GRID_MIN_CELL // size) for size in sizes}  # the smallest multiple >= GRID_MIN_CELL
    column_width = max([*cell.values(), *(text_size(name)[0] for name in columns)]) + pad
    label_width = max(text_size(label)[0] for *_, label in rows) + 2 * pad
    header = max(text_size(name)[1] for name in columns) + 2 * pad
    width = label_width + len(columns) * column_width + pad
    height = header + sum(cell[size] + pad for size, *_ in rows) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((label_width + c * column_width, pad), name, fill="black", font=font)
    top = header
    for size, index, label in rows:
        draw.text((pad, top + cell[size] // 2), label, fill="black", font=font)
        for c, name in enumerate(columns):
            with Image.open(out_dir / runs[(name, size)]["outputs"]["images"][index]) as image:
                image = image.convert("RGB").resize((cell[size], cell[size]), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + c * column_width, top))
        top += cell[size] + pad
    return grid


def save_figure(fig, path: Path) -> None:
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=PLOT_DPI))


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]], errors: dict | None = None) -> None:
    """One cluster of bars per group, one bar per series."""
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        values = [np.nan if v is None else v for v in values]
        yerr = errors.get(label) if errors else None
        ax.bar(x - 0.4 + (i + 0.5) * width, values, width, yerr=yerr, capsize=3, label=label)
    ax.set_xticks(x, groups, rotation=15, ha="right")
    ax.legend(fontsize="small")


def plot_step_time(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    runs = {(r["variant"], r["size"]): r["step_s"] for r in report["runs"]}
    names = list(dict.fromkeys(r["variant"] for r in report["runs"]))
    series, errors = {}, {}
    for size in report["settings"]["sizes"]:
        steps = [runs[(name, size)] for name in names]
        series[f"{size} px"] = [s["median"] for s in steps]
        errors[f"{size} px"] = [[s["median"] - s["min"] for s in steps], [s["max"] - s["median"] for s in steps]]
    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    ax = fig.add_subplot()
    grouped_bars(ax, names, series, errors)
    ax.set_ylabel("seconds per step")
    ax.set_title("Seconds per step (median; bars: min to max)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_peak_rss(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    sizes = report["settings"]["sizes"]
    names = list(dict.fromkeys(r["variant"] for r in report["runs"]))
    runs = {(r["variant"], r["size"]): r for r in report["runs"]}
    fig = Figure(figsize=(PLOT_SIZE[0], PLOT_SIZE[1] * len(sizes)), dpi=PLOT_DPI)
    for i, size in enumerate(sizes):
        ax = fig.add_subplot(len(sizes), 1, i + 1)
        series = {PHASE_LABELS[p]: [runs[(n, size)]["peak_rss_mib"][p] for n in names] for p in PHASES}
        series["process max"] = [runs[(n, size)]["max_rss_mib"] for n in names]
        grouped_bars(ax, names, series)
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title(f"Peak resident memory per phase, {size} px")
    fig.tight_layout()
    save_figure(fig, path)


def plot_size_on_disk(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    bars = {v["name"]: {g: e["bytes"] / 2**20 for g, e in v["graphs"].items()} for v in report["variants"]}
    if report["reference"]:
        weights = report["reference"]["weights_bytes"]
        bars[f"{TORCH_NAME} (safetensors)"] = {name: n / 2**20 for name, n in weights.items()}
    parts = list(dict.fromkeys(part for bar in bars.values() for part in bar))
    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    ax = fig.add_subplot()
    bottom = np.zeros(len(bars))
    for part in parts:
        values = np.array([bar.get(part, 0.0) for bar in bars.values()])
        ax.bar(list(bars), values, bottom=bottom, label=part)
        bottom += values
    ax.tick_params(axis="x", labelrotation=15)
    ax.set_ylabel("MiB")
    ax.set_title("Size on disk per graph")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def write_report(report: dict, out_dir: Path) -> None:
    grid = grid_image(report, out_dir)
    write_atomic(out_dir / "grid.png", lambda f: grid.save(f, format="PNG"))
    plot_step_time(report, out_dir / "step_time.png")
    plot_peak_rss(report, out_dir / "peak_rss.png")
    plot_size_on_disk(report, out_dir / "size_on_disk.png")
    write_atomic(out_dir / "report.md", lambda f: f.write(markdown(report).encode()))
    write_json(out_dir / "report.json", report)
