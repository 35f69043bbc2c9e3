"""The bundle: a self-contained folder of exported graphs, tokenizer files and `manifest.json`.

    BUNDLE/
      manifest.json          written last: a folder without one is not a bundle
      text_encoder.onnx      input_ids -> text_embeds, hidden_states
      transformer.onnx       one sampling step -> logits   (+ transformer.onnx.data when over 2 GB)
      vq_decoder.onnx        tokens -> image
      vq_encoder.onnx        image -> tokens
      tokenizer/             vocab.json, merges.txt, tokenizer.json, configs

The manifest says what the runtime needs to drive the graphs (mask token, codebook size, token stride,
sampling defaults), each graph's file, precision, inputs and outputs, and the sha256 of every file.
This module is plain Python (no torch, no onnxruntime): exporters write manifests, the runtime reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from meissonic_edge.errors import MeissonicError
from meissonic_edge.runtime.config import MASKING_SCHEDULES, VQ_STRIDE

FORMAT = "meissonic-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("text_encoder", "transformer", "vq_decoder", "vq_encoder")
REQUIRED_GRAPHS = ("text_encoder", "transformer", "vq_decoder")  # vq_encoder is for apps (img2img, inpainting)
MODEL_KEYS = {"mask_token_id": int, "codebook_size": int, "token_stride": int, "masking_schedule": str}
# (graph, input or output, the manifest `model` key its last dimension must equal); variants follow their graph
STATIC_DIMS = (
    ("text_encoder", "text_embeds", "pooled_projection_dim"),
    ("text_encoder", "hidden_states", "text_hidden_size"),
    ("transformer", "encoder_hidden_states", "text_hidden_size"),
    ("transformer", "text_embeds", "pooled_projection_dim"),
    ("transformer", "logits", "codebook_size"),
)


class BundleError(MeissonicError):
    """A bundle is missing, incomplete, tampered with or of a format we do not read."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, relative: str) -> dict:
    path = root / relative
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def inside(root: Path, relative: str) -> Path:
    """`root/relative`, refusing absolute paths, `..` and symlinks that lead out of `root`."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"manifest names an invalid path {relative!r}")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or relative.startswith(("/", "\\")) or ":" in pure.parts[0] or ".." in pure.parts:
        raise BundleError(f"manifest path {relative!r} points outside the bundle")
    path = root / pure
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise BundleError(f"manifest path {relative!r} resolves outside the bundle (symlink?)")
    return path


def read_manifest(bundle_dir: str | Path) -> dict:
    """Read and check `manifest.json`'s format; paths and checksums are checked by `verify_files`."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle not found: {root}")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST} (an export that did not finish?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a meissonic-edge manifest (format should be {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version!r} is not supported by this meissonic-edge "
            f"(it reads version {FORMAT_VERSION}); re-export the bundle or upgrade meissonic-edge"
        )
    for key in ("model", "defaults", "graphs", "files"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{path}: missing section {key!r}")
    for name in REQUIRED_GRAPHS:
        if name not in manifest["graphs"]:
            raise BundleError(f"{path}: no {name} graph")
    check_model_section(manifest["model"], path)
    for name, graph in manifest["graphs"].items():
        check_graph_entry(name, graph, manifest["model"], path)
    return manifest


def check_model_section(model: dict, path: Path) -> None:
    """The values a runtime drives the graphs with: present, of the right type, and consistent."""
    for key, kind in MODEL_KEYS.items():
        value = model.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{path}: model.{key} must be {kind.__name__}, got {value!r} (re-export the bundle)")
    if model["masking_schedule"] not in MASKING_SCHEDULES:
        raise BundleError(
            f"{path}: model.masking_schedule {model['masking_schedule']!r} is not one of {', '.join(MASKING_SCHEDULES)}"
        )
    vocab_size = model.get("vocab_size")
    upper = vocab_size if isinstance(vocab_size, int) else None
    if model["mask_token_id"] < model["codebook_size"] or (upper is not None and model["mask_token_id"] >= upper):
        raise BundleError(
            f"{path}: model.mask_token_id {model['mask_token_id']} is outside [codebook_size, vocab_size) = "
            f"[{model['codebook_size']}, {upper if upper is not None else '...'})"
        )
    if model.get("vq_stride", VQ_STRIDE) != VQ_STRIDE:
        raise BundleError(f"{path}: model.vq_stride {model['vq_stride']} != {VQ_STRIDE}, the only VQ stride we run")
    compression = model.get("feature_compression")
    strides = (VQ_STRIDE * (2 if compression else 1),) if isinstance(compression, bool) else (VQ_STRIDE, 2 * VQ_STRIDE)
    if model["token_stride"] not in strides:
        raise BundleError(
            f"{path}: model.token_stride {model['token_stride']} != {' or '.join(map(str, strides))} "
            f"(vq_stride {VQ_STRIDE}, feature_compression {compression})"
        )


def check_graph_entry(name: str, graph: dict, model: dict, path: Path) -> None:
    """A graph entry names its file, and its inputs and outputs (when listed) agree with the model section."""
    if not isinstance(graph, dict) or not isinstance(graph.get("file"), str):
        raise BundleError(f"{path}: graph {name} names no file")
    specs = {}
    for kind in ("inputs", "outputs"):
        for spec in graph.get(kind, []):
            if not (
                isinstance(spec, dict)
                and isinstance(spec.get("name"), str)
                and isinstance(spec.get("dtype"), str)
                and isinstance(spec.get("shape"), list)
            ):
                raise BundleError(f"{path}: graph {name} has an {kind[:-1]} without name, dtype and shape: {spec!r}")
            specs[spec["name"]] = spec["shape"]
    role = graph.get("variant_of", name)
    for graph_name, io_name, key in STATIC_DIMS:
        shape = specs.get(io_name)
        if graph_name != role or not shape or not isinstance(shape[-1], int) or not isinstance(model.get(key), int):
            continue
        if shape[-1] != model[key]:
            raise BundleError(
                f"{path}: graph {name} {io_name} has last dimension {shape[-1]} but model.{key} is {model[key]} "
                "(the manifest was edited or mixes two exports; re-export the bundle)"
            )


def graph_files(graph: dict) -> list[str]:
    """Every bundle file of one manifest graph entry: its graph, its external data, and (the tiled VQ decoder
    and encoder) the graph of each of its layers."""
    layers = [path for op in graph.get("ops", []) for key, path in op.items() if key != "kind"]
    return [graph.get("file"), *graph.get("external_data", []), *layers]


def verify_files(bundle_dir: str | Path, manifest: dict, checksums: bool = True) -> None:
    """Every file the manifest names lies inside the bundle, exists, and (optionally) matches its sha256."""
    root = Path(bundle_dir)
    for relative, entry in manifest["files"].items():
        path = inside(root, relative)
        if not path.is_file():
            raise BundleError(f"bundle file missing: {relative}")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise BundleError(f"manifest entry for {relative} has no sha256")
        if path.stat().st_size != entry.get("bytes", path.stat().st_size):
            raise BundleError(f"bundle file {relative} has {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        if checksums and sha256_file(path) != entry["sha256"]:
            raise BundleError(f"checksum mismatch for {relative}: the file changed after export")
    tokenizer_dir = manifest.get("tokenizer", {}).get("dir")
    if not isinstance(tokenizer_dir, str) or not inside(root, tokenizer_dir).is_dir():
        raise BundleError(f"manifest names no tokenizer folder inside the bundle (got {tokenizer_dir!r})")
    for name, graph in manifest["graphs"].items():
        for relative in graph_files(graph):
            inside(root, relative)
            if relative not in manifest["files"]:
                raise BundleError(f"graph {name} file {relative!r} has no checksum in the manifest")


def write_manifest(bundle_dir: Path, manifest: dict) -> None:
    """Add the checksums of every file in the bundle and write the manifest (the last file written)."""
    root = Path(bundle_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    manifest["files"] = {relative: file_entry(root, relative) for relative in files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
