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

import ast
import contextlib
import gc
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from meissonic_edge import __version__
from meissonic_edge.errors import OptionsError
from meissonic_edge.export.guided import GUIDED_GRAPH, guided_reference, write_guided
from meissonic_edge.export.parity import (
    MIN_PSNR_DB,
    MIN_TOKEN_AGREEMENT,
    Check,
    cosine_check,
    max_abs_check,
    psnr,
    require,
)
from meissonic_edge.export.tiled import (
    VQDecoderStem,
    VQEncoderTail,
    nearest_codebook_entry,
    write_encoder_layer_graphs,
    write_layer_graphs,
)
from meissonic_edge.fileio import atomic_directory
from meissonic_edge.model.checkpoint import (
    load_clip_tokenizer,
    load_scheduler_config,
    load_text_encoder,
    load_transformer,
    load_vqvae,
    text_encoder_folders,
    transformer_folder,
)
from meissonic_edge.model.consistency import check_model_dir
from meissonic_edge.model.reference import vq_tokens
from meissonic_edge.quant.quantize import ComponentPrecision, parse_recipe, quantize_graph
from meissonic_edge.runtime.bundle import write_manifest
from meissonic_edge.runtime.config import VQ_STRIDE, TransformerConfig
from meissonic_edge.runtime.sampler import GenerationOptions, model_defaults
from meissonic_edge.runtime.tiled_decoder import TILED_GRAPH, TiledDecoder
from meissonic_edge.runtime.tiled_encoder import TILED_ENCODER_GRAPH, TiledEncoder
from meissonic_edge.runtime.tokenizer import MAX_LENGTH, ClipTokenizer

logger = logging.getLogger(__name__)

OPSET = 21  # int4 weights (GatherBlockQuantized) need opset 21 types
EXTERNAL_DATA_BYTES = 100_000_000  # larger weights sit beside the graph: onnxruntime reads them without
# parsing a second copy inside the protobuf, and the guided transformer graph shares them
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHECK_GUIDANCE = 9.0  # the guided transformer graph is checked at upstream's default scale
CHECK_PROMPTS = ["a red circle at the top left on a white background", "A Photo of a Cat, café-style!", ""]

# ----------------------------------------------------------------------------------------------- graph contracts


class TextEncoderGraph(nn.Module):
    """input_ids (B, 77) -> text_embeds (B, Dp), hidden_states (B, 77, Dt) of the penultimate layer."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]


class VQDecoderGraph(nn.Module):
    """tokens (B, h, w) -> image (B, 3, 16h, 16w) in [0, 1]: codebook lookup, decoder, clip."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, tokens):
        batch, height, width = tokens.shape
        shape = (batch, height, width, self.vqvae.config.latent_channels)
        return self.vqvae.decode(tokens, force_not_quantize=True, shape=shape).sample.clamp(0, 1)


class VQEncoderGraph(nn.Module):
    """image (B, 3, H, W) in [0, 1] -> tokens (B, H/16, W/16): encoder, then the nearest codebook entry."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, image):
        return nearest_codebook_entry(self.vqvae, self.vqvae.encode(image).latents)  # (B, h, w)


class Float16Graph(nn.Module):
    """Run `graph` in fp16 behind the float32 contract: float inputs are cast in, float outputs cast out.

    The model's own float32 islands (RMSNorm statistics, the rotary table) stay float32 inside.
    Converts `graph`'s weights in place: compute the fp32 reference outputs before wrapping.
    """

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.inner = graph.half()

    def forward(self, *args):
        out = self.inner(*(a.half() if a.is_floating_point() else a for a in args))
        outputs = out if isinstance(out, tuple) else (out,)
        outputs = tuple(o.float() if o.is_floating_point() else o for o in outputs)
        return outputs if isinstance(out, tuple) else outputs[0]


# ----------------------------------------------------------------------------------------------- the recipe


FOLD_LIMIT = 1 << 28  # elements: larger than any weight of the model


def fold_weight_expressions(model) -> None:
    """Fold what is computed from weights alone (reshaping a 1x1 conv's kernel, say) into initializers.

    torch.onnx folds only small tensors; a weight left behind a Reshape or Gather is one that MatMul
    quantizers cannot see, and one the runtime recomputes at every step.
    """
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    onnxscript.optimizer.remove_unused_nodes(model)


def hierarchical_names(model) -> None:
    """Name each node after the module that produced it, e.g. `/transformer_blocks.3.attn.to_q/MatMul`."""
    used: dict[str, int] = {}
    for node in model.graph.all_nodes():
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        module = ""
        if scopes:
            path = [s for s in ast.literal_eval(scopes)[:-1] if s and not s.startswith("_")]  # modules only
            module = path[-1] if path else ""
        base = f"/{module}/{node.op_type}" if module else f"/{node.op_type}"
        count = used.get(base, 0)
        used[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx reports on its own internals (missing torchvision ops, deprecations); none of it is ours."""
    names = ["torch.onnx", "torch.export", "onnxscript", "onnx_ir"]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_graph(
    wrapper: nn.Module,
    sample: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict,
    component: str,
    precision: str,
) -> list[str]:
    """Export `wrapper` to `path`; return the bundle-relative files written (the graph and its external data).

    With precision "fp16" the wrapper's weights are converted in place.
    """
    import onnx

    wrapper.eval()
    shapes = tuple(dynamic_shapes.get(name) for name in input_names)
    if precision == "fp16":
        wrapper = Float16Graph(wrapper).eval()
        shapes = (shapes,)  # Float16Graph.forward(*args): torch.export sees one tuple argument
    weight_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            sample,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=shapes,
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    fold_weight_expressions(program.model)
    hierarchical_names(program.model)
    program.model.metadata_props.update(
        {
            "meissonic_edge.component": component,
            "meissonic_edge.precision": precision,
            "meissonic_edge.version": __version__,
        }
    )
    program.save(str(path), external_data=external)
    del program
    gc.collect()
    onnx.checker.check_model(str(path))  # the path form also checks graphs with external data
    files = [path.name]
    if (path.parent / (path.name + ".data")).exists():
        files.append(path.name + ".data")
    return files


def io_spec(session) -> dict:
    def describe(args):
        return [{"name": a.name, "dtype": a.type, "shape": list(a.shape)} for a in args]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def open_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------- parity


def reference_outputs(component: str, graph: nn.Module, inputs: dict) -> list[np.ndarray]:
    """What PyTorch computes for the graph contract of `component` (fp32)."""
    with torch.no_grad():
        if component == "vq_encoder":  # diffusers' own quantizer, not our export wrapper's arithmetic
            return [vq_tokens(graph.vqvae, inputs["image"])]
        out = graph(**inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


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


def transformer_check_inputs(config: TransformerConfig, conditioning, grid: tuple[int, int], mask_token_id: int):
    """Real inputs for one guided step: half the tokens decided, [negative; prompt] text conditioning."""
    text_embeds, hidden = conditioning
    batch = text_embeds.shape[0]
    height, width = grid
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.codebook_size, (batch, height, width), generator=generator)
    tokens[torch.rand(tokens.shape, generator=generator) < 0.5] = mask_token_id
    micro = GenerationOptions(height=height * VQ_STRIDE, width=width * VQ_STRIDE).micro_conds()
    return {
        "tokens": tokens,
        "encoder_hidden_states": hidden,
        "text_embeds": text_embeds,
        "micro_conds": torch.from_numpy(np.tile(micro, (batch, 1))),
        "timestep": torch.full((batch,), 7.0),
    }


def check_cases(model_dir: Path, text_encoder_dir: Path | None, tokenizer_dir: Path, check_size: tuple[int, int]):
    """Yield (component, load, real check inputs) in export order; `load()` gives the fp32 graph module.

    The inputs are real: prompts through the bundle's tokenizer, the text encoder's output as the
    transformer's conditioning, decoded images as the VQ encoder's input. Nothing here keeps a module
    alive between components, so one component's weights are in memory at a time.
    """
    scheduler = load_scheduler_config(model_dir)
    config = TransformerConfig.from_json_file(transformer_folder(model_dir) / "config.json")
    grid = (check_size[0] // VQ_STRIDE, check_size[1] // VQ_STRIDE)
    input_ids = torch.from_numpy(ClipTokenizer.from_dir(tokenizer_dir).encode(CHECK_PROMPTS))

    def load_text_encoder_graph():
        return TextEncoderGraph(load_text_encoder(model_dir, text_encoder_dir))

    def load_transformer_graph():
        transformer = load_transformer(model_dir)
        transformer.mask_token_id = scheduler.mask_token_id  # for GPTQ calibration, which samples real steps
        return transformer

    def load_vq(kind):
        return lambda: kind(load_vqvae(model_dir))

    with torch.no_grad():  # [negative ""; prompt] conditioning for the transformer's check
        conditioning = load_text_encoder_graph()(input_ids[[2, 0]])
    gc.collect()
    yield "text_encoder", load_text_encoder_graph, {"input_ids": input_ids}
    inputs = transformer_check_inputs(config, conditioning, grid, scheduler.mask_token_id)
    yield "transformer", load_transformer_graph, inputs

    tokens = torch.randint(0, config.codebook_size, (2, *grid), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # decoded images are realistic inputs for the encoder's check
        images = load_vq(VQDecoderGraph)()(tokens)
    gc.collect()
    yield "vq_decoder", load_vq(VQDecoderGraph), {"tokens": tokens}
    yield "vq_encoder", load_vq(VQEncoderGraph), {"image": images}


# ----------------------------------------------------------------------------------------------- the bundle


def copy_tokenizer(model_dir: Path, text_encoder_dir: Path | None, out_dir: Path) -> None:
    _, source = text_encoder_folders(model_dir, text_encoder_dir)
    target = out_dir / "tokenizer"
    target.mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def check_tokenizer(reference_tokenizer, bundle_tokenizer_dir: Path) -> dict:
    """The runtime tokenizer must give exactly CLIPTokenizer's ids."""
    ours = ClipTokenizer.from_dir(bundle_tokenizer_dir).encode(CHECK_PROMPTS)
    theirs = reference_tokenizer(
        CHECK_PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np"
    ).input_ids
    agreement = float((ours == theirs).mean())
    return require("tokenizer", [Check("id_agreement", agreement, 1.0, True)])


def parse_size(text: str) -> tuple[int, int]:
    """ "256" or "256x384" (height x width) -> (256, 384)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise OptionsError(f"size must be N or HxW in pixels, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise OptionsError(f"size must be N or HxW in pixels, got {text!r}")
    return parts[0], parts[1]


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


def source_section(model_dir: Path, text_encoder_dir: Path | None) -> dict:
    return {"model_dir": model_dir.name, "text_encoder_dir": text_encoder_dir.name if text_encoder_dir else None}


def model_section(scheduler, config: TransformerConfig) -> dict:
    """What a runtime needs to drive the graphs, for the manifest."""
    return {
        "mask_token_id": scheduler.mask_token_id,
        "masking_schedule": scheduler.masking_schedule,
        "codebook_size": config.codebook_size,
        "vocab_size": config.vocab_size,
        "vq_stride": VQ_STRIDE,
        "token_stride": config.token_stride,
        "feature_compression": config.downsample,
        "text_max_length": MAX_LENGTH,
        "text_hidden_size": config.joint_attention_dim,
        "pooled_projection_dim": config.pooled_projection_dim,
    }


def defaults_section(model_dir: Path | None = None) -> dict:
    d = model_defaults(model_dir)
    return {
        "steps": d.steps,
        "guidance_scale": d.guidance_scale,
        "negative_prompt": d.negative_prompt,
        "temperature": list(d.temperature),
        "token_temperature": d.token_temperature,
        "height": d.height,
        "width": d.width,
        "micro_conditions": {"aesthetic_score": d.aesthetic_score, "crop": list(d.crop)},
    }


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
