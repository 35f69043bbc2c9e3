"""Bundle manifests checked at load, in plain Python: the model section, each graph entry, the files."""

import json

import pytest

from meissonic_edge.runtime.bundle import BundleError, read_manifest, verify_files, write_manifest

MODEL = {
    "mask_token_id": 71,
    "masking_schedule": "cosine",
    "codebook_size": 64,
    "vocab_size": 72,
    "vq_stride": 16,
    "token_stride": 32,
    "feature_compression": True,
    "text_max_length": 77,
    "text_hidden_size": 32,
    "pooled_projection_dim": 32,
}


def io(*specs):
    return [{"name": name, "dtype": "tensor(float)", "shape": shape} for name, shape in specs]


GRAPHS = {
    "text_encoder": {
        "file": "text_encoder.onnx",
        "inputs": [{"name": "input_ids", "dtype": "tensor(int64)", "shape": ["batch", 77]}],
        "outputs": io(("text_embeds", ["batch", 32]), ("hidden_states", ["batch", 77, 32])),
    },
    "transformer": {
        "file": "transformer.onnx",
        "inputs": io(("encoder_hidden_states", ["batch", 77, 32]), ("text_embeds", ["batch", 32])),
        "outputs": io(("logits", ["batch", "hw", 64])),
    },
    "transformer_guided": {
        "file": "transformer_guided.onnx",
        "variant_of": "transformer",
        "outputs": io(("logits", ["half_batch", "hw", 64])),
    },
    "vq_decoder": {"file": "vq_decoder.onnx", "outputs": io(("image", ["batch", 3, "16*h", "16*w"]))},
}


@pytest.fixture
def bundle(tmp_path):
    """A bundle with placeholder graph files: enough for everything bundle.py reads."""
    root = tmp_path / "bundle"
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.json").write_text("{}")
    for graph in GRAPHS.values():
        (root / graph["file"]).write_bytes(b"graph")
    manifest = {"model": dict(MODEL), "defaults": {}, "tokenizer": {"dir": "tokenizer"}, "graphs": GRAPHS}
    write_manifest(root, json.loads(json.dumps(manifest)))
    return root


def edit(bundle, change):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_consistent_bundle_reads(bundle):
    verify_files(bundle, read_manifest(bundle))


CASES = [
    ("model key missing", lambda m: m["model"].pop("mask_token_id"), "model.mask_token_id must be int, got None"),
    ("model key of the wrong type", lambda m: m["model"].update(token_stride="32"), "model.token_stride must be int"),
    (
        "unknown masking schedule",
        lambda m: m["model"].update(masking_schedule="exp"),
        "model.masking_schedule 'exp' is not one of cosine, linear",
    ),
    (
        "mask token inside the codebook",
        lambda m: m["model"].update(mask_token_id=10),
        "model.mask_token_id 10 is outside [codebook_size, vocab_size) = [64, 72)",
    ),
    (
        "mask token beyond the vocabulary",
        lambda m: m["model"].update(mask_token_id=72),
        "model.mask_token_id 72 is outside [codebook_size, vocab_size) = [64, 72)",
    ),
    (
        "token stride vs feature compression",
        lambda m: m["model"].update(token_stride=16),
        "model.token_stride 16 != 32 (vq_stride 16, feature_compression True)",
    ),
    ("VQ stride", lambda m: m["model"].update(vq_stride=8), "model.vq_stride 8 != 16"),
    ("graph without a file", lambda m: m["graphs"]["vq_decoder"].pop("file"), "graph vq_decoder names no file"),
    (
        "graph output without a shape",
        lambda m: m["graphs"]["transformer"]["outputs"][0].pop("shape"),
        "graph transformer has an output without name, dtype and shape",
    ),
    (
        "logits width vs the codebook",
        lambda m: m["graphs"]["transformer_guided"]["outputs"][0].update(shape=["b", "hw", 63]),
        "graph transformer_guided logits has last dimension 63 but model.codebook_size is 64",
    ),
    (
        "text width vs the transformer's",
        lambda m: m["graphs"]["text_encoder"]["outputs"][1].update(shape=["b", 77, 48]),
        "graph text_encoder hidden_states has last dimension 48 but model.text_hidden_size is 32",
    ),
]


@pytest.mark.parametrize("case, change, fragment", CASES, ids=[c[0] for c in CASES])
def test_manifest_inconsistencies_are_refused_at_read(bundle, case, change, fragment):
    edit(bundle, change)
    with pytest.raises(BundleError) as info:
        read_manifest(bundle)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_graph_file_without_checksum(bundle):
    edit(bundle, lambda m: m["files"].pop("vq_decoder.onnx"))
    with pytest.raises(BundleError, match="graph vq_decoder file 'vq_decoder.onnx' has no checksum"):
        verify_files(bundle, read_manifest(bundle))


def test_a_missing_file(bundle):
    (bundle / "transformer.onnx").unlink()
    with pytest.raises(BundleError, match="bundle file missing: transformer.onnx"):
        verify_files(bundle, read_manifest(bundle))


def test_a_changed_file(bundle):
    (bundle / "transformer.onnx").write_bytes(b"GRAPH")
    with pytest.raises(BundleError, match="checksum mismatch for transformer.onnx"):
        verify_files(bundle, read_manifest(bundle))


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "sub/../../x"])
def test_a_path_out_of_the_bundle(bundle, bad):
    edit(bundle, lambda m: m["files"].update({bad: {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(BundleError, match="points outside the bundle"):
        verify_files(bundle, read_manifest(bundle))
