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

FORMAT = "meissonic-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("text_encoder", "transformer", "vq_decoder", "vq_encoder")
REQUIRED_GRAPHS = ("text_encoder", "transformer", "vq_decoder")  # vq_encoder is for apps (img2img, inpainting)


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
    return manifest


def graph_files(graph: dict) -> list[str]:
    """Every bundle file of one manifest graph entry: its graph, its external data, and (the tiled VQ decoder)
    the graph of each of its layers."""
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
