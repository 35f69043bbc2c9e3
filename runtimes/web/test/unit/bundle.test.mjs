// bundle.test.mjs — manifest checks and sha256 verification: a tampered, missing or escaping file is
// refused with a one-line message naming it.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";
import { Bundle, BundleError, insidePath, sha256Hex } from "../../src/bundle.js";
import { roundHalfEven, toRgba } from "../../src/imaging.js";

const encode = (text) => new TextEncoder().encode(text);

/** An in-memory bundle source: { path: bytes }. */
function memorySource(files) {
  return { describe: "memory", read: async (relative) => files[relative] ?? null };
}

function bundleFiles() {
  const graph = encode("not really onnx");
  const sha256 = createHash("sha256").update(graph).digest("hex");
  const manifest = {
    format: "meissonic-edge-bundle",
    format_version: 1,
    model: {},
    defaults: {},
    tokenizer: { dir: "tokenizer" },
    graphs: { text_encoder: { file: "a.onnx" }, transformer: { file: "a.onnx" }, vq_decoder: { file: "a.onnx" } },
    files: { "a.onnx": { sha256, bytes: graph.length } },
  };
  return { manifest, graph };
}

const open = (manifest, extra = {}) => Bundle.open(memorySource({ "manifest.json": encode(JSON.stringify(manifest)), ...extra }));

test("sha256Hex is the sha256 of the bytes (Web Crypto)", async () => {
  const bytes = encode("meissonic");
  assert.equal(await sha256Hex(bytes), createHash("sha256").update(bytes).digest("hex"));
});

test("a good file is read; a changed one is refused, naming it", async () => {
  const { manifest, graph } = bundleFiles();
  const bundle = await open(manifest, { "a.onnx": graph });
  assert.deepEqual(await bundle.readFile("a.onnx"), graph);
  const changed = graph.slice();
  changed[0] ^= 1;
  const tampered = await open(manifest, { "a.onnx": changed });
  await assert.rejects(tampered.readFile("a.onnx"), /checksum mismatch for a\.onnx/);
});

test("a missing file, a short file and a file the manifest does not name are refused", async () => {
  const { manifest, graph } = bundleFiles();
  await assert.rejects((await open(manifest)).readFile("a.onnx"), /bundle file missing: a\.onnx/);
  await assert.rejects((await open(manifest, { "a.onnx": graph.slice(1) })).readFile("a.onnx"), /a\.onnx has 14 bytes, manifest says 15/);
  await assert.rejects((await open(manifest, { "a.onnx": graph })).readFile("b.onnx"), /'b\.onnx' is not in the manifest/);
});

test("paths leaving the bundle are refused, naming them", async () => {
  for (const bad of ["../x.onnx", "/etc/passwd", "a/../../x", "C:/x", "a\\b"]) {
    assert.throws(() => insidePath(bad), (e) => e instanceof BundleError && e.message.includes(bad));
  }
  const { manifest } = bundleFiles();
  manifest.files["../escape.onnx"] = { sha256: "0" };
  await assert.rejects(open(manifest), /'\.\.\/escape\.onnx' points outside the bundle/);
});

test("manifests that are not ours, of another version, or incomplete are refused", async () => {
  const { manifest } = bundleFiles();
  await assert.rejects(Bundle.open(memorySource({})), /not a bundle: no manifest\.json/);
  await assert.rejects(Bundle.open(memorySource({ "manifest.json": encode("{") })), /manifest\.json is not valid JSON/);
  await assert.rejects(open({ ...manifest, format: "x" }), /not a meissonic-edge manifest/);
  await assert.rejects(open({ ...manifest, format_version: 2 }), /format version 2 is not supported/);
  await assert.rejects(open({ ...manifest, backend: "coreml" }), /coreml bundle/);
  const noDecoder = structuredClone(manifest);
  delete noDecoder.graphs.vq_decoder;
  await assert.rejects(open(noDecoder), /no vq_decoder graph/);
  const unlisted = structuredClone(manifest);
  unlisted.graphs.vq_decoder.file = "v.onnx";
  await assert.rejects(open(unlisted), /graph vq_decoder file 'v\.onnx' has no checksum/);
});

test("pixels are rounded half to even after clipping, as numpy does", () => {
  assert.deepEqual([0.5, 1.5, 2.5, -0.5, 2.4, 2.6].map(roundHalfEven), [0, 2, 2, -0, 2, 3]);
  const image = new Float32Array([-1, 0.5, 2, 1 / 255 / 2, 0, 1, 0.25, 0.75, 0.1, 0.2, 0.3, 0.4]); // 3 x 2 x 2
  const { data } = toRgba(image, 2, 2);
  assert.deepEqual(Array.from(data.slice(0, 8)), [0, 0, 26, 255, 128, 255, 51, 255]);
});
