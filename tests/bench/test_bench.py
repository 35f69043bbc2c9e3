"""`meissonic-edge bench`: one call measures every variant and PyTorch, and writes a report with sane values."""

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from meissonic_edge.bench.fidelity import logit_agreement, ssim
from meissonic_edge.bench.report import GRID_MIN_CELL
from meissonic_edge.bench.results import PHASES
from meissonic_edge.bench.runner import bench, variant_slug
from meissonic_edge.cli.args import Parser
from meissonic_edge.cli.bench import add_bench_parser
from meissonic_edge.errors import ModelDirError, OptionsError

STEPS = 3
PROMPT = "a red circle"


def is_red(image, prompt):
    """A stand-in for the demo model's prompt-adherence check."""
    red, green, blue = np.asarray(image, dtype=float).mean(axis=(0, 1))
    return prompt == PROMPT and red > max(green, blue)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, tiny_bundle, tiny_fp16_bundle, tmp_path_factory):
    """bench on the tiny model, fp32 and fp16 at 64 px with the PyTorch reference.

    The fp32 bundle is already in OUT_DIR/bundles (bench must reuse it); the fp16 "export" copies the session's
    fp16 bundle, since a real export takes ~20 s here and has its own tests. It records what bench asked for.
    """
    out = tmp_path_factory.mktemp("bench")
    shutil.copytree(tiny_bundle, out / "bundles" / "fp32")
    exports = []

    def export_onnx(model_dir, bundle_dir, precision="fp32", progress=True, **options):
        exports.append({"precision": precision, "progress": progress, "bundle_dir": bundle_dir, **options})
        return shutil.copytree(tiny_fp16_bundle, bundle_dir)

    logs = Records()
    logger = logging.getLogger("meissonic_edge.bench.runner")
    logger.addHandler(logs)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("meissonic_edge.export.to_onnx.export_onnx", export_onnx)
            report = bench(
                tiny_model_dir,
                ["fp32", "fp16"],
                out,
                sizes=(64,),
                steps=STEPS,
                prompts=[PROMPT],
                progress=False,
                adherence_fn=is_red,
            )
    finally:
        logger.removeHandler(logs)
        logger.setLevel(level)
    return out, report, exports, logs.messages


def runs_by_name(report):
    return {run["variant"]: run for run in report["runs"]}


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_bundles_are_reused_or_exported_with_the_spec_unchanged(bench_run):
    out, report, exports, messages = bench_run
    assert [(e["precision"], e["progress"], e["bundle_dir"]) for e in exports] == [
        ("fp16", False, out / "bundles" / "fp16")
    ]
    variants = {v["name"]: v for v in report["variants"]}
    assert variants["fp32"]["exported"] is False and variants["fp16"]["exported"] is True
    assert any("reusing" in m and "fp32" in m for m in messages)


def test_report_files(bench_run):
    out, report, _, _ = bench_run
    saved = strict_json((out / "report.json").read_text())
    assert [r["variant"] for r in saved["runs"]] == ["fp32", "fp16", "torch-fp32"]
    assert saved["command"]["arguments"]["variants"] == ["fp32", "fp16"]
    assert saved["machine"]["cpu_count"] >= 1 and saved["machine"]["onnxruntime"]
    assert saved["settings"]["steps"] == STEPS and saved["settings"]["prompts"] == [PROMPT]
    assert runs_by_name(saved)["fp32"]["fidelity"]["psnr_db"] == "inf"  # strict JSON spells infinity out
    markdown = (out / "report.md").read_text()
    for heading in ("## Size on disk", "## Speed and memory", "## Fidelity against the fp32 ONNX variant"):
        assert heading in markdown
    assert "| fp16 | 64 |" in markdown and "| torch-fp32 | 64 |" in markdown and "adherence" in markdown
    assert saved["settings"]["guidance_scale"] == 9.0 and "guidance 9 (model batch 2)" in markdown  # tiny's default


def test_report_renders_again_from_its_json(bench_run):
    from meissonic_edge.bench.report import markdown

    out, _, _, _ = bench_run
    saved = json.loads((out / "report.json").read_text())
    assert markdown(saved) == (out / "report.md").read_text()  # "inf" read back from JSON included
    saved["settings"]["guidance_scale"] = 1.0
    assert "no guidance (model batch 1)" in markdown(saved)
    assert saved["settings"]["temperature"] == [2.0, 0.0] and "Gumbel" not in markdown(saved)  # upstream's
    saved["settings"]["temperature"] = [0.0, 0.0]
    assert "Gumbel temperature 0 to 0" in markdown(saved)


def test_sizes_on_disk_come_from_the_bundles(bench_run):
    out, report, _, _ = bench_run
    for variant in report["variants"]:
        for name, graph in variant["graphs"].items():
            on_disk = sum((out / variant["bundle"] / f).stat().st_size for f in graph["files"])
            assert graph["bytes"] == on_disk > 0, name
            assert graph["precision"] == ("fp16" if name.endswith("_tiled") else variant["spec"])  # tiled: fp16 always
    fp32, fp16 = report["variants"]
    assert fp16["total_bytes"] < fp32["total_bytes"]
    assert set(report["reference"]["weights_bytes"]) == {"text_encoder", "transformer", "vqvae"}


def test_speed_and_memory_are_positive(bench_run):
    _, report, _, _ = bench_run
    for run in report["runs"]:
        step = run["step_s"]
        assert len(step["all"]) == STEPS and 0 < step["min"] <= step["median"] <= step["max"]
        assert min(run["import_s"], run["load_s"], run["text_encoding_s"], run["vq_decode_s"]) > 0
        assert run["generation_s"] > sum(step["all"])
        assert all(run["peak_rss_mib"][phase] > 0 for phase in PHASES)
        assert run["max_rss_mib"] >= max(run["peak_rss_mib"].values())
    runs = runs_by_name(report)
    assert runs["torch-fp32"]["ratios_vs_torch"] == {"step_s_median": 1.0, "max_rss": 1.0}
    assert runs["torch-fp32"]["max_rss_mib"] > runs["fp32"]["max_rss_mib"]  # torch itself is hundreds of MiB
    assert runs["fp16"]["ratios_vs_torch"]["max_rss"] < 1


def test_fidelity_against_fp32(bench_run):
    _, report, _, _ = bench_run
    runs = runs_by_name(report)
    same = runs["fp32"]["fidelity"]
    assert [s["step"] for s in same["logits"]["steps"]] == [0, 1, 2]
    assert same["logits"]["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert same["logits"]["kl_mean_max"] < 1e-12 and same["logits"]["top1_agreement_min"] == 1.0
    assert same["token_agreement"] == 1.0 and same["psnr_db"] == float("inf") and same["ssim"] == pytest.approx(1.0)

    fp16 = runs["fp16"]["fidelity"]
    assert fp16["logits"]["cosine_min"] > 0.999 and 0 <= fp16["logits"]["kl_mean_max"] < 1e-3
    assert fp16["token_agreement"] > 0.5 and fp16["psnr_db"] > 20 and fp16["ssim"] > 0.8

    torch = runs["torch-fp32"]["fidelity"]  # the same sampler and fp32 logits: the same tokens
    assert torch["logits"] is None and torch["token_agreement"] == 1.0 and torch["psnr_db"] > 40
    assert all(run["adherence"] in (0.0, 1.0) for run in report["runs"])
    assert all(run["outline_iou"] is None for run in report["runs"])  # is_red returns booleans, not verdicts


def test_grid_and_plots_are_pngs(bench_run):
    out, report, _, _ = bench_run
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.mode == "RGB"
        assert grid.width >= 3 * GRID_MIN_CELL and grid.height >= GRID_MIN_CELL
    for name in ("step_time.png", "peak_rss.png", "size_on_disk.png"):
        with Image.open(out / name) as plot:
            assert plot.format == "PNG" and plot.size == (800, 450), name
    for run in report["runs"]:
        with Image.open(out / run["outputs"]["images"][0]) as image:
            assert image.size == (64, 64)
        assert np.load(out / run["outputs"]["tokens"][0]).shape == (1, 4, 4)  # 64 px / 16


def test_without_the_reference(bench_run, tiny_model_dir, tmp_path):
    out, _, _, _ = bench_run
    shutil.copytree(out / "bundles" / "fp32", tmp_path / "bundles" / "fp32")
    report = bench(tiny_model_dir, ["fp32"], tmp_path, sizes=[64], steps=1, include_reference=False, progress=False)
    (run,) = report["runs"]
    assert report["reference"] is None and run["ratios_vs_torch"] is None and run["adherence"] is None
    assert run["fidelity"]["token_agreement"] == 1.0
    assert "| fp32 | 64 |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(model_dir="missing"), ModelDirError, "model directory not found"),
        (dict(variants=[]), OptionsError, "no variants"),
        (dict(variants=["fp16", "fp16"]), OptionsError, "listed twice"),
        (dict(variants=["//"]), OptionsError, "cannot name a variant"),
        (dict(sizes=[48]), OptionsError, r"size 48 is not a positive multiple of the model's token stride \(32 px\)"),
        (dict(sizes=[]), OptionsError, "no image sizes"),
        (dict(steps=0), OptionsError, "steps must be an integer >= 1"),
        (dict(prompts=[]), OptionsError, "prompts must be"),
    ],
)
def test_bad_input_fails_before_any_work(tiny_model_dir, tmp_path, change, error, pattern):
    arguments = dict(model_dir=tiny_model_dir, variants=["fp16"], out_dir=tmp_path / "out", sizes=[64], steps=2)
    arguments.update(change)
    if arguments["model_dir"] == "missing":
        arguments["model_dir"] = tmp_path / "missing"
    with pytest.raises(error, match=pattern) as info:
        bench(**arguments, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_ssim():
    rng = np.random.default_rng(0)
    a = rng.random((40, 50, 3))
    noisy = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a)) and 0 < ssim(a, noisy) < 0.99
    assert ssim(a, np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1)) < ssim(a, noisy)


def test_logit_agreement():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 300, 16)).astype(np.float32)  # more positions than one chunk
    same = logit_agreement(logits, logits + 5.0)  # softmax does not see a constant shift
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    other = logit_agreement(logits, rng.standard_normal(logits.shape).astype(np.float32))
    assert other["kl_mean"] > 0.1 and abs(other["cosine"]) < 0.2 and other["top1_agreement"] < 0.5


def test_variant_slug():
    assert variant_slug("fp16") == "fp16"
    assert variant_slug("transformer=int4,text_encoder=int8") == "transformer-int4-text_encoder-int8"
    assert variant_slug("recipes/mixed.json") == "recipes-mixed.json"
    assert variant_slug("../up") == "up"
    assert len(variant_slug("x" * 300)) < 100


def test_cli_parses_into_bench(tiny_model_dir, tmp_path, capsys):
    parser = Parser(prog="meissonic-edge")
    add_bench_parser(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(
        ["bench", str(tiny_model_dir), str(tmp_path), "--variants", "fp16", "int8", "--sizes", "64", "128"]
        + ["--steps", "2", "--prompts", "a", "b", "--seed", "3", "--threads", "1", "--low-memory", "--no-reference"]
    )
    assert (args.variants, args.sizes, args.steps, args.prompts, args.seed) == (
        ["fp16", "int8"],
        [64, 128],
        2,
        ["a", "b"],
        3,
    )
    assert args.threads == 1 and args.low_memory and args.no_reference and not args.quiet
    args.sizes = [40]
    with pytest.raises(OptionsError, match="token stride"):
        args.func(args)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["bench", str(tiny_model_dir), str(tmp_path), "--sizes", "big"])
    assert exit_info.value.code == 2 and "expected an integer" in capsys.readouterr().err


def test_adherence_scores_take_verdicts_with_outlines(tmp_path):
    """An evaluator that returns verdicts (as the demo's `--adherence shapes` does) also gives the mean outline IoU."""
    from meissonic_edge.bench.runner import adherence_scores
    from meissonic_edge.demo.adherence import judge
    from meissonic_edge.demo.shapes import draw, evaluation_scenes

    scenes = evaluation_scenes()[:2]
    for index, scene in enumerate(scenes):
        Image.fromarray(draw(scene)).save(tmp_path / f"image-{index}.png")
    prompts = [scenes[0].caption, scenes[1].caption.replace(scenes[1].colour, "orange")]
    share, outline = adherence_scores(tmp_path, prompts, judge)
    assert share == 0.5 and outline > 0.98  # the wrong colour fails the verdict, not the outline
    assert adherence_scores(tmp_path, prompts, lambda image, prompt: True) == (1.0, None)
