"""CoreML export of a model directory into a bundle: one `.mlpackage` per graph and image size.

Every `convert_<component>()` follows the same recipe (`convert_component`):
  1. load the fp32 module and compute the PyTorch reference on the real check inputs (`cases.check_cases`);
  2. for each package shape: capture the graph contract (`graphs`' wrappers, our transformer) with
     `torch.export` at that fixed shape, convert it with coremltools to an fp16 ML program, compress its
     weights with `coremltools.optimize.coreml`, attach descriptions and metadata, save it, and check the
     saved package's inputs and outputs against the contract;
  3. read the weights back from the saved package, decompress them, load them into the fp32 PyTorch module
     and compare it with the reference against named thresholds; a failure raises `ParityError` and the
     bundle is not written. CoreML cannot run predictions on Linux, so this measures what the weight
     compression (and fp16 storage) does; fp16 arithmetic is measured on a Mac (tests/export/test_export_coreml.py).

Decisions (runtimes/swift/README.md says what an app sees):
- Fixed shapes, one package per image size (`transformer_512.mlpackage`): coremltools 9 cannot convert the
  transformer with flexible (enumerated) shapes — torch.export's integer `//` on sizes becomes fp32 and
  `expand` then fails, `split` with symbolic sizes fails, and tracing fails on size arithmetic — and fixed
  shapes are what Core ML schedules best (Apple's Stable Diffusion ships one model per shape). An app
  ships only the sizes it needs. The text encoder does not depend on the size: one package.
- Integers are int32 (ML programs have no int64 inputs); everything else is the ONNX contract's.
- fp16: the transformer is captured in fp16 from PyTorch (`Float16Graph`, as the ONNX fp16 export), so its
  own float32 islands (RMSNorm statistics, rotary application, sinusoidal embeddings of timestep and
  micro-conditions, whose angles reach 63,000 rad where fp16's spacing is 32) stay float32. coremltools
  cannot convert CLIP's LayerNorm or diffusers' GroupNorm from an fp16 graph, so the text encoder and the
  VQ graphs are captured in fp32 and coremltools' fp16 pass makes every op fp16.
- Compression (`coreml_compress.compress`): the weights of every `linear`, `matmul`, `conv` and `gather`
  op — the output head, every linear layer, and the embedding tables — and nothing else (not the rotary
  table, biases or norms). Embedding tables are compressed along their rows, as ONNX's int8 rows and
  `GatherBlockQuantized`: int8 one scale per row, int4 one scale per 32 values of a row, palettes per 16
  rows. A weight the main scheme cannot take (a dimension not divisible by its block or group) gets the
  fallback (int8 per channel for int4, a per-tensor palette for palettes); what stays fp16 is listed.
- A plain precision compresses the text encoder and the transformer; the convolutional VQ graphs stay fp16
  (as the ONNX export leaves them float) unless named: "transformer=int4,text_encoder=int8,vq_decoder=int8".
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from meissonic_edge import __version__
from meissonic_edge.errors import OptionsError
from meissonic_edge.export.cases import check_cases, parse_size
from meissonic_edge.export.coreml_compress import BLOCKWISE_TARGETS, PRECISIONS, compress, compression_settings
from meissonic_edge.export.coreml_package import (
    check_contract,
    constexpr_counts,
    contract,
    measure_fidelity,
    ordinary_permissions,
    package_bytes,
    weight_sources,
)
from meissonic_edge.export.coreml_tools import import_coremltools, quiet_coremltools
from meissonic_edge.export.graphs import Float16Graph, quiet_exporter, reference_outputs
from meissonic_edge.export.manifest import (
    check_tokenizer,
    copy_tokenizer,
    defaults_section,
    model_section,
    source_section,
)
from meissonic_edge.fileio import atomic_directory
from meissonic_edge.model.checkpoint import load_clip_tokenizer, load_scheduler_config
from meissonic_edge.model.consistency import check_model_dir
from meissonic_edge.model.layout import transformer_folder
from meissonic_edge.runtime.bundle import write_manifest
from meissonic_edge.runtime.config import VQ_STRIDE, TransformerConfig
from meissonic_edge.runtime.sampler import GenerationOptions

logger = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "transformer", "vq_decoder", "vq_encoder")
CONVOLUTIONAL = ("vq_decoder", "vq_encoder")  # a plain precision leaves them fp16
TORCH_FP16 = ("transformer",)  # captured in fp16 from PyTorch: its float32 islands stay float32
TARGETS = ("iOS17", "iOS18", "macOS14", "macOS15")

DESCRIPTIONS = {
    "input_ids": "CLIP BPE token ids: start token, prompt, end token, then the pad token up to 77",
    "text_embeds": "projected pooled text embedding (the text encoder's text_embeds)",
    "hidden_states": "hidden states of the text encoder's penultimate layer",
    "encoder_hidden_states": "the text encoder's hidden_states, batch [negative prompt; prompt] with guidance",
    "micro_conds": "[width, height, crop x, crop y, aesthetic score], e.g. [512, 512, 0, 0, 6]",
    "timestep": "sampling steps remaining: N-1 at the first step, 0 at the last",
    "logits": "unnormalised log-probabilities over the VQ codebook for every token, row-major",
    "image": "RGB, channels first, values in [0, 1]",
}
TOKENS_DESCRIPTION = {
    "transformer": "VQ token grid (image size / 16), mask_token_id where not decided yet",
    "vq_decoder": "VQ token grid (image size / 16), every token decided",
    "vq_encoder": "the nearest VQ codebook entry of every 16x16 patch",
}
SUMMARIES = {
    "text_encoder": "Meissonic text encoder (CLIP): prompt tokens -> conditioning",
    "transformer": "Meissonic transformer: one masked-token sampling step",
    "vq_decoder": "Meissonic VQ decoder: token grid -> image",
    "vq_encoder": "Meissonic VQ encoder: image -> token grid",
}


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Plan:
    """Everything an export needs to know, checked before any work."""

    precisions: dict  # component -> precision
    target: str  # canonical minimum deployment target name
    sizes: tuple  # ((height, width), ...) in pixels
    transformer_batch: int

    def shapes(self, component: str) -> list[tuple[str, tuple[int, int] | None]]:
        """(package label, image size) for each package of `component`; the text encoder has one."""
        if component == "text_encoder":
            return [("", None)]
        return [(size_label(size), size) for size in self.sizes]


def size_label(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def parse_target(name: str) -> str:
    for target in TARGETS:
        if str(name).lower() == target.lower():
            return target
    raise OptionsError(f"unknown minimum target {name!r}: use {', '.join(TARGETS)}")


def parse_precision(precision: str) -> dict[str, str]:
    """ "int4" (text encoder and transformer; VQ graphs fp16) or "transformer=int4,vq_decoder=int8,..."."""
    text = str(precision).strip()
    if "=" not in text:
        if text not in PRECISIONS:
            raise OptionsError(f"unknown CoreML precision {text!r}: use {', '.join(PRECISIONS)} (or GRAPH=P,...)")
        return {c: "fp16" if c in CONVOLUTIONAL else text for c in COMPONENTS}
    plan = dict.fromkeys(COMPONENTS, "fp16")
    for part in text.split(","):
        component, _, value = (s.strip() for s in part.partition("="))
        if component not in COMPONENTS:
            raise OptionsError(f"unknown graph {component!r} in precision {text!r}: use {', '.join(COMPONENTS)}")
        if value not in PRECISIONS:
            raise OptionsError(f"unknown CoreML precision {value!r} for {component}: use {', '.join(PRECISIONS)}")
        plan[component] = value
    return plan


def parse_sizes(sizes) -> tuple[tuple[int, int], ...]:
    """512, "512,1024", "512x768", or a list of sizes (N, "HxW" or (H, W)) -> ((512, 512), ...)."""
    if isinstance(sizes, str):
        sizes = [s for s in sizes.split(",") if s.strip()]
    elif isinstance(sizes, int):
        sizes = [sizes]
    parsed = []
    for size in sizes:
        if isinstance(size, str):
            size = parse_size(size.strip())
        elif isinstance(size, int):
            size = (size, size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise OptionsError(f"an image size is N or (height, width) in pixels, got {size!r}")
        parsed.append(tuple(size))
    if not parsed:
        raise OptionsError("give at least one image size to export")
    if len(set(parsed)) != len(parsed):
        raise OptionsError(f"image sizes repeat: {', '.join(size_label(s) for s in parsed)}")
    return tuple(parsed)


def make_plan(precision: str, minimum_target: str, sizes, transformer_batch: int, config: TransformerConfig) -> Plan:
    target = parse_target(minimum_target)
    precisions = parse_precision(precision)
    for component, value in precisions.items():
        if value == "int4" and target not in BLOCKWISE_TARGETS:
            raise OptionsError(
                f"int4 per-block weights ({component}) need iOS18 or macOS15 (constexpr_blockwise_shift_scale); "
                f"--minimum-target {target} can take int8, palettize4 or palettize6"
            )
    parsed = parse_sizes(sizes)
    for height, width in parsed:
        GenerationOptions(height=height, width=width).validate(config.token_stride)
    if transformer_batch not in (1, 2):
        raise OptionsError(
            f"transformer batch must be 2 (guidance in one call) or 1 (one call per half), got {transformer_batch!r}"
        )
    return Plan(precisions, target, parsed, transformer_batch)


# ----------------------------------------------------------------------------------------------- conversion


def drop_aliases(program) -> None:
    """Replace `aten.alias` nodes by their input: coremltools 9 has no translation for them (CLIP's position ids)."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()


def convert_package(module: nn.Module, sample: tuple, component: str, expected: dict, target: str):
    """torch.export at the sample's fixed shape, then coremltools; returns the (uncompressed) fp16 MLModel."""
    ct = import_coremltools()
    with torch.no_grad(), quiet_exporter():
        program = torch.export.export(module.eval(), sample).run_decompositions({})
    drop_aliases(program)
    numpy_types = {"int32": np.int32, "float32": np.float32}
    inputs = [ct.TensorType(name=n, shape=tuple(s), dtype=numpy_types[d]) for n, d, s in expected["inputs"]]
    outputs = [ct.TensorType(name=n, dtype=numpy_types[d]) for n, d, _ in expected["outputs"]]
    torch_fp16 = component in TORCH_FP16
    with quiet_coremltools():
        mlmodel = ct.convert(
            program,
            inputs=inputs,
            outputs=outputs,
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=ct.precision.FLOAT32 if torch_fp16 else ct.precision.FLOAT16,
            skip_model_load=True,  # Linux has no Core ML runtime
        )
    del program
    return mlmodel


def describe(mlmodel, component: str, label: str, metadata: dict) -> None:
    """Descriptions of every input and output, and what the package is, for Xcode and for apps."""
    mlmodel.author = f"meissonic-edge {__version__}"
    mlmodel.version = __version__
    mlmodel.short_description = SUMMARIES[component] + (f" at {label} pixels" if label else "")
    spec = mlmodel.get_spec()  # names only; descriptions are set through the model
    for feature in list(spec.description.input):
        text = TOKENS_DESCRIPTION[component] if feature.name == "tokens" else DESCRIPTIONS[feature.name]
        mlmodel.input_description[feature.name] = text
    for feature in list(spec.description.output):
        text = TOKENS_DESCRIPTION[component] if feature.name == "tokens" else DESCRIPTIONS[feature.name]
        mlmodel.output_description[feature.name] = text
    mlmodel.user_defined_metadata.update({f"meissonic_edge.{k}": str(v) for k, v in metadata.items()})


def example_inputs(component: str, inputs: dict, batch: int, size, config: TransformerConfig) -> tuple:
    """Sample inputs of the package's fixed shape (values only need the right shape and type)."""
    generator = torch.Generator().manual_seed(0)
    if component == "text_encoder":
        return (inputs["input_ids"][:batch],)
    grid = (size[0] // VQ_STRIDE, size[1] // VQ_STRIDE)
    if component == "transformer":
        tokens = torch.randint(0, config.codebook_size, (batch, *grid), generator=generator)
        rest = [inputs[name][:batch] for name in ("encoder_hidden_states", "text_embeds", "micro_conds", "timestep")]
        return (tokens, *rest)
    if component == "vq_decoder":
        return (torch.randint(0, config.codebook_size, (1, *grid), generator=generator),)
    return (torch.rand((1, 3, *size), generator=generator),)


# ----------------------------------------------------------------------------------------------- components


def convert_component(
    component: str, load, inputs: dict, out_dir: Path, plan: Plan, config: TransformerConfig, metadata: dict
) -> dict:
    """The recipe shared by every graph: reference, one package per shape, compression, contract, fidelity."""
    precision = plan.precisions[component]
    batch = plan.transformer_batch if component in ("text_encoder", "transformer") else 1
    graph = load()
    refs = reference_outputs(component, graph, inputs)
    module, prefix = (Float16Graph(graph), "inner.") if component in TORCH_FP16 else (graph, "")
    packages, sources, files = {}, None, []
    for label, size in plan.shapes(component):
        expected = contract(component, batch, size, config)
        sample = example_inputs(component, inputs, batch, size, config)
        mlmodel = convert_package(module, sample, component, expected, plan.target)
        if sources is None:  # the same weights in every package of the graph
            sources = weight_sources(mlmodel._mil_program, graph, prefix)
        mlmodel, compression = compress(mlmodel, precision, plan.target)
        package_metadata = {
            **metadata,
            "component": component,
            "precision": precision,
            "settings": json.dumps(compression_settings(precision, plan.target)),
            "batch": batch,
            **({"height": size[0], "width": size[1]} if size else {}),
        }
        describe(mlmodel, component, label, package_metadata)
        path = out_dir / (f"{component}_{label}.mlpackage" if label else f"{component}.mlpackage")
        with quiet_coremltools():
            mlmodel.save(str(path))
        del mlmodel
        gc.collect()
        ordinary_permissions(path)
        io_spec = check_contract(component, path, expected)
        packages[label or "any"] = {
            "package": path.name,
            **({"height": size[0], "width": size[1]} if size else {}),
            "batch": batch,
            **io_spec,
            "bytes": package_bytes(path),
            "compression": {**compression, "constexpr_ops_on_disk": constexpr_counts(path)},
        }
        files += sorted(p.relative_to(out_dir).as_posix() for p in path.rglob("*") if p.is_file())
    del module, graph  # plain modules: reference counting frees them (the converter's programs need gc, above)
    first = out_dir / next(iter(packages.values()))["package"]
    parity = measure_fidelity(component, load, first, sources, inputs, refs, precision)
    root_file = f"{first.name}/Manifest.json"
    entry = {
        "precision": precision,
        "settings": compression_settings(precision, plan.target),
        "file": root_file,
        "external_data": [f for f in files if f != root_file],
        "packages": packages,
        "parity": parity,
        "parity_method": "the package's decompressed weights in the fp32 PyTorch reference, on the check inputs",
    }
    if precision != "fp16":
        left = sorted({w["name"] for p in packages.values() for w in p["compression"]["float16_weights"]})
        entry["quantization"] = {"float_weight_ops": len(left), "float_weight_op_names": left}
    return entry


def convert_text_encoder(load, inputs, out_dir, plan, config, metadata) -> dict:
    return convert_component("text_encoder", load, inputs, out_dir, plan, config, metadata)


def convert_transformer(load, inputs, out_dir, plan, config, metadata) -> dict:
    return convert_component("transformer", load, inputs, out_dir, plan, config, metadata)


def convert_vq_decoder(load, inputs, out_dir, plan, config, metadata) -> dict:
    return convert_component("vq_decoder", load, inputs, out_dir, plan, config, metadata)


def convert_vq_encoder(load, inputs, out_dir, plan, config, metadata) -> dict:
    return convert_component("vq_encoder", load, inputs, out_dir, plan, config, metadata)


CONVERTERS = {
    "text_encoder": convert_text_encoder,
    "transformer": convert_transformer,
    "vq_decoder": convert_vq_decoder,
    "vq_encoder": convert_vq_encoder,
}


# ----------------------------------------------------------------------------------------------- the bundle


def export_coreml(
    model_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp16",
    minimum_target: str = "iOS18",
    sizes=(512, 1024),
    transformer_batch: int = 2,
    text_encoder_dir: str | Path | None = None,
    check_size: tuple[int, int] = (256, 256),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert every component of `model_dir` to CoreML packages in the bundle `out_dir`; return its path.

    `precision`: fp16, int8, int4 (iOS18 / macOS15), palettize4, palettize6 — for the text encoder and the
    transformer, the VQ graphs staying fp16 — or per graph: "transformer=int4,text_encoder=int8,vq_decoder=fp16".
    `minimum_target`: iOS17, iOS18, macOS14 or macOS15. `sizes`: image sizes in pixels (N, "HxW" or (H, W)),
    one package of the transformer and of each VQ graph per size. `transformer_batch`: 2 runs guidance in one
    call ([negative; prompt]), 1 takes one call per half; the text encoder gets the same batch.

    Options are checked before any work; every graph's decompressed weights are checked against PyTorch at
    `check_size`, and on any failure nothing is left at `out_dir`.
    """
    model_dir = Path(model_dir)
    text_encoder_dir = Path(text_encoder_dir) if text_encoder_dir else None
    check_model_dir(model_dir, text_encoder_dir)  # every file agrees with the others, before any work
    scheduler = load_scheduler_config(model_dir)
    config = TransformerConfig.from_json_file(transformer_folder(model_dir) / "config.json")
    plan = make_plan(precision, minimum_target, sizes, transformer_batch, config)
    check_size = tuple(check_size)
    GenerationOptions(height=check_size[0], width=check_size[1]).validate(config.token_stride)
    reference_tokenizer = load_clip_tokenizer(model_dir, text_encoder_dir)
    import_coremltools()  # the export extra, before anything is written
    metadata = {
        "version": __version__,
        "source": model_dir.name,
        "text_encoder_source": text_encoder_dir.name if text_encoder_dir else model_dir.name,
        "minimum_target": plan.target,
        "mask_token_id": scheduler.mask_token_id,
        "codebook_size": config.codebook_size,
    }
    graphs: dict[str, dict] = {}

    with atomic_directory(out_dir, overwrite) as tmp:
        copy_tokenizer(model_dir, text_encoder_dir, tmp)
        tokenizer_parity = check_tokenizer(reference_tokenizer, tmp / "tokenizer")
        cases = check_cases(model_dir, text_encoder_dir, tmp / "tokenizer", check_size)
        bar = tqdm(total=len(CONVERTERS), disable=not progress, unit="graph")
        for component, load, inputs in cases:
            bar.set_description(f"converting {component} ({plan.precisions[component]})")
            logger.info("converting %s (%s)", component, plan.precisions[component])
            graphs[component] = CONVERTERS[component](load, inputs, tmp, plan, config, metadata)
            bar.update()
        bar.close()

        manifest = {
            "created_by": f"meissonic-edge {__version__}",
            "backend": "coreml",
            "minimum_target": plan.target,
            "sizes": [list(s) for s in plan.sizes],
            "transformer_batch": plan.transformer_batch,
            "recipe": {
                "name": str(precision),
                "components": {
                    c: {"precision": p, **compression_settings(p, plan.target)} for c, p in plan.precisions.items()
                },
            },
            "source": source_section(model_dir, text_encoder_dir),
            "model": model_section(scheduler, config),
            "defaults": defaults_section(Path(model_dir)),
            "tokenizer": {"dir": "tokenizer", "parity": tokenizer_parity},
            "graphs": graphs,
            "check_size": list(check_size),
        }
        write_manifest(tmp, manifest)
    return Path(out_dir)
