"""`meissonic-edge bench`: every exported variant of a model side by side, against fp32 and PyTorch.

    from meissonic_edge.bench.runner import bench
    report = bench("models/meissonic", ["fp16", "int8"], "bench/", sizes=(512, 1024), steps=4)

For each variant (a precision spec passed unchanged to `export_onnx(precision=...)`) and each size, one
generation with the model's sampling defaults (with guidance, model batch 2: [negative; prompt]) runs in
a child process of its own, so that its peak resident memory is its own. The PyTorch reference (fp32) is
measured the same way. Then every variant is compared with the fp32 ONNX variant, which is always exported
because it is the yardstick: its transformer logits on fixed inputs, its final tokens and its images.

    OUT_DIR/
      report.md, report.json   the tables; the JSON holds everything, with the command and the machine
      grid.png                 the images side by side: a column per variant (and PyTorch), a row per size
      step_time.png, peak_rss.png, size_on_disk.png
      bundles/<variant>/       the exported bundles; one that has a manifest.json is reused, not re-exported
      runs/<variant>/<size>px/ image-<i>.png and tokens-<i>.npy for prompt i; generation-job.json and
                               generation.json (the child's job and result), logits-job.json, logits.json;
                               for fp32 also transformer_inputs.npz (the logit comparison's inputs)
      reference/<size>px/      the same for the PyTorch reference (no logits)

This module is the parent: it checks the arguments, exports the bundles, runs the children (`bench.child`),
compares their outputs (`bench.fidelity`) and assembles the report that `bench.report` renders.
Each child is `python -m meissonic_edge.bench.child --child <work>-job.json`: run one by hand to repeat it.

What is measured, and how:
- load: constructing the pipeline (for a bundle: the manifest, the sha256 of every file, the sessions;
  with low_memory only the first two, the sessions load inside their phases); imports are timed apart.
- seconds per step: from the end of text encoding to each step's callback, so a step includes the numpy
  sampler's share; the median, min and max over all steps of all generations (`repeats` per prompt).
- peak RSS per phase: a thread reads VmRSS from /proc/self/status every 5 ms (Linux only), and each phase
  change reads it at once. The process's maximum is VmHWM, its own peak since it started. getrusage's
  ru_maxrss is kept beside it but is no measure here: Linux carries it across execve, so a child's value
  starts at the parent's peak (after an export, gigabytes).
- logit fidelity: the fp32 run keeps the transformer's exact inputs at steps 0, steps//2 and steps-1 of
  its first prompt (tokens, text conditioning, micro-conditions, timestep); each variant's transformer
  graph and the fp32 one run on them in another child: cosine of the logits, mean KL(p_fp32 || p_variant)
  of the softmax over the codebook (float64), and the share of positions whose top token agrees.
- token agreement, PSNR and SSIM: final tokens and saved images against the fp32 variant's, same prompts
  and seed; with several prompts the worst one is reported.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meissonic_edge import __version__
from meissonic_edge.bench.fidelity import output_fidelity, summarize_logits
from meissonic_edge.bench.report import write_report
from meissonic_edge.bench.results import REFERENCE_SPEC, TORCH_NAME, write_json
from meissonic_edge.errors import MeissonicError, OptionsError
from meissonic_edge.runtime.sampler import model_defaults

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a photo of a red fox in the snow",)
MAX_SLUG = 80


class BenchError(MeissonicError):
    """A measurement failed in its child process."""


def variant_slug(spec: str) -> str:
    """Folder name of a spec: `transformer=int4,text_encoder=fp16` -> `transformer-int4-text_encoder-fp16`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-._")
    if len(slug) > MAX_SLUG:
        slug = f"{slug[:MAX_SLUG]}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
    if not slug:
        raise OptionsError(f"cannot name a variant after {spec!r}: give a precision such as fp16 or a recipe file")
    return slug


# ----------------------------------------------------------------------------------------------- the parent


@dataclass
class Variant:
    spec: str  # what export_onnx(precision=...) is given
    name: str  # its folder-safe slug
    listed: bool  # False for the fp32 yardstick when the user did not ask for it
    bundle: Path
    exported: bool = False  # False when an existing bundle was reused
    export_s: float | None = None


@dataclass
class Run:
    """One measurement: a variant (or the PyTorch reference) at one size."""

    name: str
    backend: str  # "onnx" or "torch"
    size: int
    folder: Path
    measure: dict
    fidelity: dict | None = None


def check_arguments(model_dir, variants, sizes, steps, repeats, prompts, seed, threads, adherence_fn) -> list[str]:
    """Every problem with the arguments, raised before any work; returns the prompts."""
    from meissonic_edge.model.consistency import check_model_dir
    from meissonic_edge.model.layout import transformer_folder
    from meissonic_edge.quant.quantize import parse_recipe
    from meissonic_edge.runtime.config import TransformerConfig

    check_model_dir(model_dir)
    stride = TransformerConfig.from_json_file(transformer_folder(Path(model_dir)) / "config.json").token_stride
    if isinstance(variants, str) or not variants:
        raise OptionsError("no variants to benchmark: give a list of precisions or recipes, e.g. ['fp32', 'fp16']")
    for spec in variants:
        if not isinstance(spec, str):
            raise OptionsError(f"a variant must be a precision string or recipe path, got {spec!r}")
        if list(variants).count(spec) > 1:
            raise OptionsError(f"variant {spec!r} is listed twice")
    names = {}
    for spec in dict.fromkeys([REFERENCE_SPEC, *variants]):
        name = variant_slug(spec)
        if name in names:
            raise OptionsError(f"variants {names[name]!r} and {spec!r} would share the folder name {name!r}")
        names[name] = spec
    for spec in variants:
        parse_recipe(spec)  # an unknown precision or a bad recipe file, before any bundle is exported
    if not sizes:
        raise OptionsError("no image sizes to benchmark: give at least one, e.g. 512")
    for size in sizes:
        if not isinstance(size, int) or size < stride or size % stride:
            raise OptionsError(f"size {size!r} is not a positive multiple of the model's token stride ({stride} px)")
    for label, value, least in (("steps", steps, 1), ("repeats", repeats, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or value < least:
            raise OptionsError(f"{label} must be an integer >= {least}, got {value!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise OptionsError(f"threads must be an integer >= 1, got {threads!r}")
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise OptionsError("prompts must be a non-empty list of strings")
    if adherence_fn is not None and not callable(adherence_fn):
        raise OptionsError("adherence_fn must be a callable(image, prompt) -> bool or verdict")
    return prompts


def prepare_bundle(model_dir: Path, variant: Variant) -> None:
    """Export the variant's bundle, or reuse a complete one (one with a manifest.json) already there."""
    if (variant.bundle / "manifest.json").is_file():
        from meissonic_edge.runtime.bundle import read_manifest

        logger.info("reusing the bundle %s for %s (delete it to export again)", variant.bundle, variant.spec)
        source = read_manifest(variant.bundle).get("source", {}).get("model_dir")
        if source != model_dir.name:
            logger.warning("the reused bundle %s was exported from %r, not %r", variant.bundle, source, model_dir.name)
        return
    from meissonic_edge.export.to_onnx import export_onnx

    logger.info("exporting %s to %s", variant.spec, variant.bundle)
    start = time.perf_counter()
    overwrite = variant.bundle.exists()  # a folder without a manifest is no bundle: an export that did not finish
    export_onnx(model_dir, variant.bundle, precision=variant.spec, progress=False, overwrite=overwrite)
    variant.exported, variant.export_s = True, time.perf_counter() - start


def run_child(job: dict, folder: Path, what: str) -> dict:
    """Run `job` in a fresh Python process; return the JSON it writes. A failure names its log file."""
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / f"{job['work']}.json"
    result.unlink(missing_ok=True)
    job_path = write_json(folder / f"{job['work']}-job.json", {**job, "result": str(result)})
    command = [sys.executable, "-m", "meissonic_edge.bench.child", "--child", str(job_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        log = folder / f"{job['work']}.log"
        log.write_text(done.stderr)
        if done.returncode < 0:
            reason = f"killed by signal {-done.returncode} (out of memory?)"
        else:
            lines = done.stderr.strip().splitlines()
            reason = f"exit status {done.returncode}: {lines[-1] if lines else 'no message'}"
        raise BenchError(f"{what} failed, {reason} (see {log})")
    return json.loads(result.read_text())


def generation_job(backend: str, path: Path, folder: Path, size: int, settings: dict, record: bool) -> dict:
    steps = settings["steps"]
    return {
        "work": "generation",
        "backend": backend,
        "path": str(path),
        "folder": str(folder),
        "size": size,
        "record_steps": sorted({0, steps // 2, steps - 1}) if record else None,
        **settings,
    }


def measure_variant(variant: Variant, fp32: Variant, size: int, settings: dict, out_dir: Path) -> Run:
    """One variant at one size: its generation, then its fidelity against the fp32 run (which comes first)."""
    folder = out_dir / "runs" / variant.name / f"{size}px"
    fp32_folder = out_dir / "runs" / fp32.name / f"{size}px"
    what = f"{variant.name} at {size} px"
    job = generation_job("onnx", variant.bundle, folder, size, settings, record=variant is fp32)
    run = Run(variant.name, "onnx", size, folder, run_child(job, folder, what))
    logits_job = {
        "work": "logits",
        "reference_bundle": str(fp32.bundle),
        "bundle": str(variant.bundle),
        "inputs": str(fp32_folder / "transformer_inputs.npz"),
        "threads": settings["threads"],
    }
    logits = run_child(logits_job, folder, f"logit fidelity of {what}")
    run.fidelity = {"logits": summarize_logits(logits), **output_fidelity(folder, fp32_folder, settings["prompts"])}
    return run


def measure_reference(model_dir: Path, fp32: Variant, size: int, settings: dict, out_dir: Path) -> Run:
    """The PyTorch reference at one size, and how its outputs compare with the fp32 variant's."""
    folder = out_dir / "reference" / f"{size}px"
    job = generation_job("torch", model_dir, folder, size, settings, record=False)
    run = Run(TORCH_NAME, "torch", size, folder, run_child(job, folder, f"PyTorch reference at {size} px"))
    fp32_folder = out_dir / "runs" / fp32.name / f"{size}px"
    run.fidelity = {"logits": None, **output_fidelity(folder, fp32_folder, settings["prompts"])}
    return run


def bench(
    model_dir: str | Path,
    variants: list[str],
    out_dir: str | Path,
    sizes=(512,),
    steps: int = 4,
    repeats: int = 1,
    prompts: list[str] | None = None,
    seed: int = 0,
    threads: int | None = None,
    low_memory: bool = False,
    include_reference: bool = True,
    progress: bool = True,
    adherence_fn: Callable | None = None,
) -> dict:
    """Benchmark each variant against fp32 and PyTorch; write the report into `out_dir` and return it.

    `variants` are precision specs as `export_onnx(precision=...)` takes them ("fp16", "int8", recipes); fp32
    is always added. `adherence_fn(image, prompt)`, when given, scores each variant's prompt adherence: it
    returns a bool, or a verdict with `satisfied` and `outline_iou` (as `adherence.judge` does), whose mean
    outline IoU is reported too.
    """
    from tqdm.auto import tqdm

    arguments = {
        "model_dir": str(model_dir),
        "variants": variants,
        "out_dir": str(out_dir),
        "sizes": list(sizes),
        "steps": steps,
        "repeats": repeats,
        "prompts": prompts,
        "seed": seed,
        "threads": threads,
        "low_memory": low_memory,
        "include_reference": include_reference,
        "adherence_fn": getattr(adherence_fn, "__name__", repr(adherence_fn)) if adherence_fn else None,
    }
    prompts = check_arguments(model_dir, variants, sizes, steps, repeats, prompts, seed, threads, adherence_fn)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionsError(f"cannot write the report to {out_dir}: it is a file")
    settings = dict(steps=steps, repeats=repeats, prompts=prompts, seed=seed, threads=threads, low_memory=low_memory)

    names = {spec: variant_slug(spec) for spec in [REFERENCE_SPEC, *variants]}
    all_variants = [Variant(spec, name, spec in variants, out_dir / "bundles" / name) for spec, name in names.items()]
    for variant in tqdm(all_variants, desc="bundles", disable=not progress, unit="bundle"):
        prepare_bundle(model_dir, variant)
    fp32 = all_variants[0]

    runs: list[Run] = []
    bar = tqdm(total=len(sizes) * (len(all_variants) + include_reference), disable=not progress, unit="run")
    for size in sizes:
        for variant in all_variants:
            bar.set_description(f"{variant.name} at {size} px")
            runs.append(measure_variant(variant, fp32, size, settings, out_dir))
            bar.update()
        if include_reference:
            bar.set_description(f"PyTorch reference at {size} px")
            runs.append(measure_reference(model_dir, fp32, size, settings, out_dir))
            bar.update()
    bar.close()

    report = build_report(arguments, model_dir, out_dir, all_variants, runs, prompts, include_reference, adherence_fn)
    write_report(report, out_dir)
    return report


# ----------------------------------------------------------------------------------------------- the report


def bundle_sizes(bundle: Path) -> dict:
    """Bytes on disk of each graph (its file and its external data) and of the whole bundle, from the manifest."""
    from meissonic_edge.runtime.bundle import graph_files, read_manifest

    manifest = read_manifest(bundle)
    graphs = {}
    for name, graph in manifest["graphs"].items():
        files = graph_files(graph)
        graphs[name] = {
            "bytes": sum(manifest["files"][f]["bytes"] for f in files),
            "files": files,
            "precision": graph.get("precision"),
        }
    return {"graphs": graphs, "total_bytes": sum(entry["bytes"] for entry in manifest["files"].values())}


def reference_weights(model_dir: Path) -> dict:
    """Bytes of the safetensors weights in each component folder of the model directory."""
    folders = sorted(p for p in model_dir.iterdir() if p.is_dir())
    sizes = {f.name: sum(w.stat().st_size for w in f.glob("*.safetensors")) for f in folders}
    return {name: n for name, n in sizes.items() if n}


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, memory, and the versions that matter."""
    cpu, memory = platform.processor() or platform.machine(), None
    if Path("/proc/cpuinfo").is_file():
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    if Path("/proc/meminfo").is_file():
        total = [line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")]
        memory = round(int(total[0].split()[1]) / 1024) if total else None
    versions = {}
    for package in ("numpy", "onnxruntime", "torch", "onnx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_mib": memory,
        "python": platform.python_version(),
        "meissonic_edge": __version__,
        **versions,
    }


def adherence_scores(folder: Path, prompts: list[str], adherence_fn: Callable) -> tuple[float, float | None]:
    """A run's images (one per prompt) judged by `adherence_fn(image, prompt)`: the share it accepts, and the
    mean outline IoU when it returns verdicts with `satisfied` and `outline_iou` (None for plain booleans)."""
    from PIL import Image

    verdicts = []
    for index, prompt in enumerate(prompts):
        with Image.open(folder / f"image-{index}.png") as image:
            verdicts.append(adherence_fn(image.convert("RGB"), prompt))
    accepted = [bool(getattr(v, "satisfied", v)) for v in verdicts]
    outlines = [getattr(v, "outline_iou", None) for v in verdicts]
    outline = None if None in outlines else sum(outlines) / len(outlines)
    return sum(accepted) / len(accepted), outline


def build_report(arguments, model_dir, out_dir, variants, runs, prompts, include_reference, adherence_fn) -> dict:
    torch_runs = {run.size: run for run in runs if run.backend == "torch"}
    specs = {variant.name: variant.spec for variant in variants}
    rows = []
    for run in runs:
        torch_run = torch_runs.get(run.size)
        ratios = None
        if torch_run is not None:
            ratios = {
                "step_s_median": run.measure["step_s"]["median"] / torch_run.measure["step_s"]["median"],
                "max_rss": run.measure["max_rss_mib"] / torch_run.measure["max_rss_mib"],
            }
        folder = run.folder.relative_to(out_dir).as_posix()
        adherence, outline_iou = adherence_scores(run.folder, prompts, adherence_fn) if adherence_fn else (None, None)
        rows.append(
            {
                "variant": run.name,
                "spec": specs.get(run.name),
                "backend": run.backend,
                "size": run.size,
                **run.measure,
                "ratios_vs_torch": ratios,
                "fidelity": run.fidelity,
                "adherence": adherence,
                "outline_iou": outline_iou,
                "outputs": {
                    "images": [f"{folder}/image-{i}.png" for i in range(len(prompts))],
                    "tokens": [f"{folder}/tokens-{i}.npy" for i in range(len(prompts))],
                },
            }
        )
    defaults = model_defaults(model_dir)  # bench sets steps, sizes and seed; guidance and token temperature stay these
    return {
        "format": "meissonic-edge-bench",
        "format_version": 1,
        "created_by": f"meissonic-edge {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": {"argv": list(sys.argv), "arguments": arguments},
        "machine": machine_info(),
        "model_dir": str(model_dir),
        "settings": {
            "sizes": arguments["sizes"],
            "steps": arguments["steps"],
            "repeats": arguments["repeats"],
            "prompts": prompts,
            "seed": arguments["seed"],
            "threads": arguments["threads"],
            "low_memory": arguments["low_memory"],
            "guidance_scale": defaults.guidance_scale,
            "token_temperature": defaults.token_temperature,
            "temperature": list(defaults.temperature),
            "fidelity_reference": REFERENCE_SPEC,
        },
        "variants": [
            {
                "name": variant.name,
                "spec": variant.spec,
                "listed": variant.listed,
                "bundle": variant.bundle.relative_to(out_dir).as_posix(),
                "exported": variant.exported,
                "export_s": variant.export_s,
                **bundle_sizes(variant.bundle),
            }
            for variant in variants
        ],
        "reference": {"name": TORCH_NAME, "weights_bytes": reference_weights(model_dir)} if include_reference else None,
        "runs": rows,
        "files": {
            "report_md": "report.md",
            "grid": "grid.png",
            "plots": {"step_time": "step_time.png", "peak_rss": "peak_rss.png", "size_on_disk": "size_on_disk.png"},
        },
    }
