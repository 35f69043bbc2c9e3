"""ONNX export of a model directory into a bundle: one graph per component, each checked against PyTorch.

Every `export_<component>()` follows the same recipe:
  1. wrap the component in a tiny `nn.Module` whose forward is exactly the graph contract (MEISSONIC.md);
  2. export it with `torch.onnx.export(dynamo=True)` and dynamic batch (and grid) dimensions;
  3. name every node after the module it came from (`/transformer_blocks.3.attn.to_q/MatMul`), attach metadata;
  4. convert to fp16 if asked (inputs and outputs stay float32: the contract does not change);
  5. run the graph in onnxruntime on real inputs, at a shape other than the one exported, and compare with
     PyTorch against a named threshold; a failed check raises `ParityError` and the bundle is not written.

The CLIP text encoder is exported with torch.onnx too, not optimum: see the README ("Why not optimum").
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from meissonic_edge import __version__
from meissonic_edge.export.cases import CHECK_GUIDANCE, check_cases
from meissonic_edge.export.graphs import export_graph, io_spec, open_session, reference_outputs
from meissonic_edge.export.guided import GUIDED_GRAPH, guided_reference, write_guided
from meissonic_edge.export.manifest import (
    check_tokenizer,
    copy_tokenizer,
    defaults_section,
    model_section,
    source_section,
)
from meissonic_edge.export.parity import (
    MIN_PSNR_DB,
    MIN_TOKEN_AGREEMENT,
    Check,
    cosine_check,
    max_abs_check,
    psnr,
    require,
)
from meissonic_edge.export.tiled import VQDecoderStem, VQEncoderTail, write_encoder_layer_graphs, write_layer_graphs
from meissonic_edge.fileio import atomic_directory
from meissonic_edge.model.checkpoint import load_clip_tokenizer, load_scheduler_config
from meissonic_edge.model.consistency import check_model_dir
from meissonic_edge.model.layout import transformer_folder
from meissonic_edge.quant.quantize import ComponentPrecision, parse_recipe, quantize_graph
from meissonic_edge.runtime.bundle import write_manifest
from meissonic_edge.runtime.config import VQ_STRIDE, TransformerConfig
from meissonic_edge.runtime.sampler import GenerationOptions
from meissonic_edge.runtime.tiled_decoder import TILED_GRAPH, TiledDecoder
from meissonic_edge.runtime.tiled_encoder import TILED_ENCODER_GRAPH, TiledEncoder

logger = logging.getLogger(__name__)


def compare(component: str, session, inputs: dict, refs: list[np.ndarray], precision: str) -> dict:
    """Run the graph on `inputs` and check it against `refs`; raise ParityError on failure."""
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    if component == "text_encoder":
        checks = []
        for name, g, r in zip(["text_embeds", "hidden_states"], got, refs, strict=True):
            checks += [max_abs_check(name, g, r, precision), cosine_check(name, g, r, precision)]
    elif component == "transformer":
        checks = [
            max_abs_check("logits", got[0], refs[0], precision),
            cosine_check("logits", got[0], refs[0], precision),
        ]
    elif component == "vq_decoder":
        checks = [Check("image_psnr_db", psnr(got[0], refs[0]), MIN_PSNR_DB[precision], True)]
    else:
        agreement = float((got[0] == refs[0]).mean()) if got[0].shape == refs[0].shape else 0.0
        checks = [Check("token_agreement", agreement, MIN_TOKEN_AGREEMENT[precision], True)]
    return require(component, checks)


def compare_guided(session, inputs: dict, refs: list[np.ndarray], precision: str) -> dict:
    """The guided transformer graph against guidance applied to the reference's [uncond; cond] logits."""
    feed = {k: v.numpy() for k, v in inputs.items()}
    got = session.run(["logits"], {**feed, "guidance_scale": np.array([CHECK_GUIDANCE], np.float32)})[0]
    ref = guided_reference(refs[0], CHECK_GUIDANCE)
    checks = [max_abs_check("logits", got, ref, precision), cosine_check("logits", got, ref, precision)]
    return require(GUIDED_GRAPH, checks)


# ----------------------------------------------------------------------------------------------- components


def export_component(
    component: str, load, inputs: dict, out_dir: Path, settings: ComponentPrecision, make_spec, variants=None
) -> dict:
    """The recipe shared by every graph: reference first (fp32), export, quantize if asked, check against PyTorch.

    `load()` gives the fp32 module; it is released before quantization, which needs only the exported graph.
    `variants(path, refs)` may add graphs derived from the finished one; it returns their manifest entries,
    which go under the entry's "variants".
    """
    graph = load()
    refs = reference_outputs(component, graph, inputs)
    calibration = None
    if settings.precision == "int4" and settings.algorithm == "gptq":
        calibration = calibration_feeds(component, graph, inputs, settings.calibration_steps)
    sample, dynamic, output_names = make_spec(graph)
    path = out_dir / f"{component}.onnx"
    export_graph(graph, sample, path, list(inputs), output_names, dynamic, component, settings.torch_precision)
    del graph
    gc.collect()
    quantization = None
    if settings.precision in ("int8", "int4"):
        logger.info("quantizing %s to %s", component, settings.precision)
        quantization = quantize_graph(path, settings, component, calibration)
    files = [path.name] + ([path.name + ".data"] if (out_dir / (path.name + ".data")).exists() else [])
    session = open_session(path)
    parity = compare(component, session, inputs, refs, settings.precision)
    entry = {"files": files, **io_spec(session), "parity": parity, "settings": settings.settings()}
    if quantization is not None:
        entry["quantization"] = quantization
    del session
    if variants is not None:
        entry["variants"] = variants(path, refs)
    return entry


def calibration_feeds(component: str, graph: nn.Module, inputs: dict, steps: int) -> list[dict]:
    """GPTQ calibration inputs: for the transformer, the inputs of `steps` real sampling steps."""
    if component != "transformer":
        return [{k: v.numpy() for k, v in inputs.items()}]
    from meissonic_edge.model.reference import TorchDenoiser
    from meissonic_edge.runtime.sampler import sample

    feeds = []
    batch = inputs["text_embeds"].shape[0] // 2  # the check inputs are [negative; prompt]
    denoiser = TorchDenoiser(graph, inputs["encoder_hidden_states"], inputs["text_embeds"], inputs["micro_conds"])
    base = denoiser.logits

    def recording(tokens, timestep):
        feeds.append(
            {
                "tokens": tokens,
                "encoder_hidden_states": inputs["encoder_hidden_states"].numpy(),
                "text_embeds": inputs["text_embeds"].numpy(),
                "micro_conds": inputs["micro_conds"].numpy(),
                "timestep": np.full((tokens.shape[0],), timestep, dtype=np.float32),
            }
        )
        return base(tokens, timestep)

    denoiser.logits = recording
    _, height, width = inputs["tokens"].shape
    options = GenerationOptions(steps=steps, guidance_scale=9.0, height=height * VQ_STRIDE, width=width * VQ_STRIDE)
    sample(denoiser, batch, (height, width), graph.mask_token_id, options)
    return feeds


def export_text_encoder(load, inputs: dict, out_dir: Path, settings: ComponentPrecision) -> dict:
    batch = torch.export.Dim("batch", min=1, max=64)

    def spec(graph):
        return (inputs["input_ids"][:2],), {"input_ids": {0: batch}}, ["text_embeds", "hidden_states"]

    return export_component("text_encoder", load, inputs, out_dir, settings, spec)


def export_transformer(load, inputs: dict, out_dir: Path, settings: ComponentPrecision) -> dict:
    batch = torch.export.Dim("batch", min=1, max=64)

    def spec(transformer):
        unit = 2 if transformer.config.downsample else 1  # the grid must stay divisible by the feature compression
        grid_h = torch.export.Dim("grid_h", min=1, max=512 // unit)
        grid_w = torch.export.Dim("grid_w", min=1, max=512 // unit)
        sample = {k: v[:2] for k, v in inputs.items()}
        sample["tokens"] = sample["tokens"][:, : 4 * unit, : 3 * unit].contiguous()  # distinct: none specialised
        dynamic = {name: {0: batch} for name in inputs}
        dynamic["tokens"] = {0: batch, 1: unit * grid_h, 2: unit * grid_w}
        return tuple(sample.values()), dynamic, ["logits"]

    def guided(path: Path, refs: list[np.ndarray]) -> dict:
        files = write_guided(path)
        session = open_session(path.with_name(files[0]))
        parity = compare_guided(session, inputs, refs, settings.precision)
        entry = {"files": files, **io_spec(session), "parity": parity, "parity_guidance_scale": CHECK_GUIDANCE}
        return {GUIDED_GRAPH: entry}

    return export_component("transformer", load, inputs, out_dir, settings, spec, variants=guided)


def export_vq_decoder(load, inputs: dict, out_dir: Path, settings: ComponentPrecision, tiled: bool = True) -> dict:
    batch = torch.export.Dim("batch", min=1, max=64)
    height, width = torch.export.Dim("h", min=1, max=512), torch.export.Dim("w", min=1, max=512)

    def spec(graph):
        sample = (inputs["tokens"][:2, :3, :2].contiguous(),)
        return sample, {"tokens": {0: batch, 1: height, 2: width}}, ["image"]

    def tiled_variant(path: Path, refs: list[np.ndarray]) -> dict:
        sample, dynamic, _ = spec(None)  # the stem takes the same tokens, dynamic the same way
        return {TILED_GRAPH: export_tiled_decoder(load, inputs, out_dir, refs[0], sample, dynamic)}

    return export_component(
        "vq_decoder", load, inputs, out_dir, settings, spec, variants=tiled_variant if tiled else None
    )


def export_tiled_decoder(
    load, inputs: dict, out_dir: Path, reference: np.ndarray, sample: tuple, dynamic: dict
) -> dict:
    """The tiled VQ decoder (tiled_decoder.py): layer graphs, the stem graph, and its check against PyTorch.

    The check decodes the check tokens in strips of at most a quarter of the image's rows and compares with
    the PyTorch decode (`reference`): PSNR >= MIN_PSNR_DB["fp16"] (its weights and activations are float16).
    """
    vqvae = load().vqvae
    entry = write_layer_graphs(vqvae, out_dir)
    path = out_dir / TILED_GRAPH / "stem.onnx"
    files = export_graph(VQDecoderStem(vqvae), sample, path, ["tokens"], ["features"], dynamic, TILED_GRAPH, "fp32")
    top_channels = vqvae.config.block_out_channels[0]  # the widest tensors are at full resolution
    del vqvae
    gc.collect()
    entry = tiled_entry(entry, TILED_GRAPH, files, path, top_channels, reference.shape)
    parity = compare_tiled(out_dir, {**entry, "file": entry["files"][0]}, inputs["tokens"].numpy(), reference)
    return {**entry, "parity": parity, "precision": "fp16"}


def tiled_entry(entry: dict, graph: str, files: list[str], path: Path, top_channels: int, image_shape) -> dict:
    """A tiled graph's manifest entry: its files, the inputs and outputs of the part that runs whole (`path`),
    and the strip size of its check: a quarter of the image's rows at the widest (full-resolution) layer."""
    entry["files"] = [f"{graph}/{name}" for name in files]
    session = open_session(path)
    entry.update(io_spec(session))
    del session
    entry["strip_check_elements"] = top_channels * image_shape[-2] * image_shape[-1] // 4
    return entry


def compare_tiled(bundle_dir: Path, entry: dict, tokens: np.ndarray, reference: np.ndarray) -> dict:
    """The tiled decoder, in strips of at most a quarter of the image's rows, against the PyTorch decode."""
    decoder = TiledDecoder(bundle_dir, entry, open_session, strip_elements=entry["strip_check_elements"])
    checks = [Check("image_psnr_db", psnr(decoder(tokens), reference), MIN_PSNR_DB["fp16"], True)]
    return require(TILED_GRAPH, checks)


def export_vq_encoder(load, inputs: dict, out_dir: Path, settings: ComponentPrecision, tiled: bool = True) -> dict:
    batch = torch.export.Dim("batch", min=1, max=64)
    height, width = torch.export.Dim("grid_h", min=1, max=512), torch.export.Dim("grid_w", min=1, max=512)

    def spec(graph):
        sample = (inputs["image"][:2, :, : 3 * VQ_STRIDE, : 2 * VQ_STRIDE].contiguous(),)
        return sample, {"image": {0: batch, 2: VQ_STRIDE * height, 3: VQ_STRIDE * width}}, ["tokens"]

    def tiled_variant(path: Path, refs: list[np.ndarray]) -> dict:
        return {TILED_ENCODER_GRAPH: export_tiled_encoder(load, inputs, out_dir, refs[0])}

    return export_component(
        "vq_encoder", load, inputs, out_dir, settings, spec, variants=tiled_variant if tiled else None
    )


def export_tiled_encoder(load, inputs: dict, out_dir: Path, reference: np.ndarray) -> dict:
    """The tiled VQ encoder (tiled_encoder.py): layer graphs, the tail graph, and its check against PyTorch.

    The check encodes the check images in strips of at most a quarter of the image's rows and compares with
    diffusers' tokens (`reference`): agreement >= MIN_TOKEN_AGREEMENT["fp16"] (weights and activations are
    float16).
    """
    vqvae = load().vqvae
    entry = write_encoder_layer_graphs(vqvae, out_dir)
    image = inputs["image"]
    channels = vqvae.encoder.down_blocks[-1].resnets[0].in_channels  # the tail's input
    grid = torch.export.Dim("h", min=1, max=512), torch.export.Dim("w", min=1, max=512)
    batch = torch.export.Dim("batch", min=1, max=64)
    sample = (torch.randn(2, channels, 3, 2, generator=torch.Generator().manual_seed(0)),)
    dynamic = {"features": {0: batch, 2: grid[0], 3: grid[1]}}
    path = out_dir / TILED_ENCODER_GRAPH / "tail.onnx"
    tail = VQEncoderTail(vqvae)
    files = export_graph(tail, sample, path, ["features"], ["tokens"], dynamic, TILED_ENCODER_GRAPH, "fp32")
    top_channels = vqvae.config.block_out_channels[0]  # the widest tensors are at full resolution
    del vqvae, tail
    gc.collect()
    entry = tiled_entry(entry, TILED_ENCODER_GRAPH, files, path, top_channels, image.shape)
    parity = compare_tiled_encoder(out_dir, {**entry, "file": entry["files"][0]}, image.numpy(), reference)
    return {**entry, "parity": parity, "precision": "fp16"}


def compare_tiled_encoder(bundle_dir: Path, entry: dict, images: np.ndarray, reference: np.ndarray) -> dict:
    """The tiled encoder, in strips of at most a quarter of the image's rows, against diffusers' tokens."""
    encoder = TiledEncoder(bundle_dir, entry, open_session, strip_elements=entry["strip_check_elements"])
    got = encoder(images)
    agreement = float((got == reference).mean()) if got.shape == reference.shape else 0.0
    return require(TILED_ENCODER_GRAPH, [Check("token_agreement", agreement, MIN_TOKEN_AGREEMENT["fp16"], True)])


EXPORTERS = {
    "text_encoder": export_text_encoder,
    "transformer": export_transformer,
    "vq_decoder": export_vq_decoder,
    "vq_encoder": export_vq_encoder,
}


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    text_encoder_dir: str | Path | None = None,
    check_size: tuple[int, int] = (256, 256),
    overwrite: bool = False,
    progress: bool = True,
    int4_settings: dict | None = None,
    tiled_decoder: bool = True,
) -> Path:
    """Export every component of `model_dir` into the bundle `out_dir`; return its path.

    `tiled_decoder=False` leaves out the tiled VQ decoder and encoder that `--low-memory` uses (their graphs
    hold the VQ weights again: 210 MB for the full-size decoder; 203 MB for the encoder, of which 168 MB is its
    float32 tail at token resolution); low-memory runs then decode and encode untiled.

    `precision` is a recipe (see `quantize.py`): "fp32", "fp16", "int8", "int4",
    "transformer=int4,text_encoder=int8,vq_decoder=fp16", or a JSON recipe file.

    Each graph is checked against PyTorch at `check_size` (pixels) before the manifest is written; on any
    failure nothing is left at `out_dir`.
    """
    recipe = parse_recipe(precision, int4_settings)
    model_dir = Path(model_dir)
    text_encoder_dir = Path(text_encoder_dir) if text_encoder_dir else None
    check_model_dir(model_dir, text_encoder_dir)  # every file agrees with the others, before any work
    scheduler = load_scheduler_config(model_dir)
    config = TransformerConfig.from_json_file(transformer_folder(model_dir) / "config.json")
    GenerationOptions(height=check_size[0], width=check_size[1]).validate(config.token_stride)
    reference_tokenizer = load_clip_tokenizer(model_dir, text_encoder_dir)
    graphs: dict[str, dict] = {}

    with atomic_directory(out_dir, overwrite) as tmp:
        copy_tokenizer(model_dir, text_encoder_dir, tmp)
        tokenizer_parity = check_tokenizer(reference_tokenizer, tmp / "tokenizer")
        cases = check_cases(model_dir, text_encoder_dir, tmp / "tokenizer", check_size)
        bar = tqdm(total=len(EXPORTERS), disable=not progress, unit="graph")
        for component, load, inputs in cases:
            settings = recipe[component]
            bar.set_description(f"exporting {component} ({settings.precision})")
            logger.info("exporting %s (%s)", component, settings.precision)
            options = {"tiled": tiled_decoder} if component in ("vq_decoder", "vq_encoder") else {}
            graphs[component] = EXPORTERS[component](load, inputs, tmp, settings, **options)
            for variant, entry in graphs[component].pop("variants", {}).items():
                graphs[variant] = {**entry, "variant_of": component}
            bar.update()
        bar.close()

        for component, graph in graphs.items():
            graph.setdefault("precision", recipe[graph.get("variant_of", component)].precision)
            graph["file"], *external = graph.pop("files")
            graph["external_data"] = external
        manifest = {
            "created_by": f"meissonic-edge {__version__}",
            "backend": "onnx",
            "recipe": recipe.as_dict(),
            "source": source_section(model_dir, text_encoder_dir),
            "model": model_section(scheduler, config),
            "defaults": defaults_section(model_dir),
            "tokenizer": {"dir": "tokenizer", "parity": tokenizer_parity},
            "graphs": graphs,
            "check_size": list(check_size),
        }
        write_manifest(tmp, manifest)
    return Path(out_dir)


def verify_parity(
    bundle_dir: str | Path, model_dir: str | Path, text_encoder_dir: str | Path | None = None, progress: bool = True
) -> dict:
    """Re-run every graph of a bundle against the PyTorch reference of `model_dir`; raise ParityError on failure.

    Uses the same inputs and thresholds as the export did (at the manifest's check size and precisions).
    """
    from meissonic_edge.runtime.bundle import read_manifest, verify_files

    bundle_dir, model_dir = Path(bundle_dir), Path(model_dir)
    text_encoder_dir = Path(text_encoder_dir) if text_encoder_dir else None
    check_model_dir(model_dir, text_encoder_dir)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    tokenizer_dir = bundle_dir / manifest["tokenizer"]["dir"]
    results = {"tokenizer": check_tokenizer(load_clip_tokenizer(model_dir, text_encoder_dir), tokenizer_dir)}
    check_size = tuple(manifest.get("check_size", (256, 256)))
    cases = check_cases(model_dir, text_encoder_dir, tokenizer_dir, check_size)
    for component, load, inputs in tqdm(cases, total=len(EXPORTERS), disable=not progress, desc="verifying"):
        entry = manifest["graphs"].get(component)
        if entry is not None:
            refs = reference_outputs(component, load(), inputs)
            gc.collect()
            session = open_session(bundle_dir / entry["file"])
            results[component] = compare(component, session, inputs, refs, entry["precision"])
            guided = manifest["graphs"].get(GUIDED_GRAPH) if component == "transformer" else None
            if guided is not None:
                session = open_session(bundle_dir / guided["file"])
                results[GUIDED_GRAPH] = compare_guided(session, inputs, refs, guided["precision"])
            tiled = manifest["graphs"].get(TILED_GRAPH) if component == "vq_decoder" else None
            if tiled is not None:
                results[TILED_GRAPH] = compare_tiled(bundle_dir, tiled, inputs["tokens"].numpy(), refs[0])
            tiled = manifest["graphs"].get(TILED_ENCODER_GRAPH) if component == "vq_encoder" else None
            if tiled is not None:
                images = inputs["image"].numpy()
                results[TILED_ENCODER_GRAPH] = compare_tiled_encoder(bundle_dir, tiled, images, refs[0])
    return results
