// bundle.js — reading a meissonic-edge bundle folder: manifest.json, then each file it names, checked
// against the manifest's byte count and sha256 (Web Crypto) before anything uses it.
//
// A bundle is read through a "source": `{ read(relativePath) -> Promise<Uint8Array | null> }` (null: no
// such file). `httpSource(url)` reads a served folder with fetch; tests use a file-system source. Every
// path is checked to stay inside the bundle, and only files with a manifest entry are read, so a
// tampered, truncated or escaping bundle is refused with a one-line error naming the file.

export const FORMAT = "meissonic-edge-bundle";
export const FORMAT_VERSION = 1;
export const MANIFEST = "manifest.json";
export const REQUIRED_GRAPHS = ["text_encoder", "transformer", "vq_decoder"];

export class BundleError extends Error {
  constructor(message) {
    super(message);
    this.name = "BundleError";
  }
}

/** A source reading files below `baseUrl` with fetch (404 -> null). */
export function httpSource(baseUrl) {
  const base = baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`;
  return {
    describe: base,
    async read(relative) {
      const response = await fetch(new URL(relative, new URL(base, globalThis.location?.href)));
      if (response.status === 404) return null;
      if (!response.ok) throw new BundleError(`cannot read ${relative}: HTTP ${response.status}`);
      return new Uint8Array(await response.arrayBuffer());
    },
  };
}

/** `relative` if it names a path inside the bundle; otherwise a BundleError naming it. */
export function insidePath(relative) {
  if (typeof relative !== "string" || relative.length === 0) {
    throw new BundleError(`manifest names an invalid path ${JSON.stringify(relative)}`);
  }
  const parts = relative.split("/");
  if (relative.startsWith("/") || relative.includes("\\") || parts[0].includes(":") || parts.includes("..")) {
    throw new BundleError(`manifest path '${relative}' points outside the bundle`);
  }
  return relative;
}

/** Lowercase hex sha256 of bytes, with Web Crypto (browsers; Node >= 19 has it as globalThis.crypto). */
export async function sha256Hex(bytes) {
  const digest = await globalThis.crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

function checkManifest(manifest) {
  if (manifest === null || typeof manifest !== "object" || manifest.format !== FORMAT) {
    throw new BundleError(`${MANIFEST} is not a meissonic-edge manifest (format should be '${FORMAT}')`);
  }
  if (manifest.format_version !== FORMAT_VERSION) {
    throw new BundleError(
      `${MANIFEST}: bundle format version ${JSON.stringify(manifest.format_version)} is not supported ` +
        `(this runtime reads version ${FORMAT_VERSION}); re-export the bundle or upgrade`,
    );
  }
  if ((manifest.backend ?? "onnx") !== "onnx") {
    throw new BundleError(`this is a ${manifest.backend} bundle; the web runtime runs ONNX bundles (export one with --format onnx)`);
  }
  for (const key of ["model", "defaults", "graphs", "files"]) {
    if (manifest[key] === null || typeof manifest[key] !== "object") throw new BundleError(`${MANIFEST}: missing section '${key}'`);
  }
  for (const name of REQUIRED_GRAPHS) {
    if (!(name in manifest.graphs)) throw new BundleError(`${MANIFEST}: no ${name} graph`);
  }
  for (const [relative, entry] of Object.entries(manifest.files)) {
    insidePath(relative);
    if (!entry || typeof entry.sha256 !== "string") throw new BundleError(`manifest entry for ${relative} has no sha256`);
  }
  const tokenizerDir = manifest.tokenizer?.dir;
  if (typeof tokenizerDir !== "string") throw new BundleError(`manifest names no tokenizer folder (got ${JSON.stringify(tokenizerDir)})`);
  insidePath(tokenizerDir);
  for (const [name, graph] of Object.entries(manifest.graphs)) {
    for (const relative of [graph.file, ...(graph.external_data ?? [])]) {
      insidePath(relative);
      if (!(relative in manifest.files)) throw new BundleError(`graph ${name} file '${relative}' has no checksum in the manifest`);
    }
  }
}

/** An opened bundle: its manifest, and verified reads of the files it names. */
export class Bundle {
  constructor(source, manifest, { verify = true } = {}) {
    this.source = source;
    this.manifest = manifest;
    this.verify = verify;
  }

  /** Read and check manifest.json (format, sections, every path inside the bundle). */
  static async open(source, options = {}) {
    const bytes = await source.read(MANIFEST);
    if (bytes === null) throw new BundleError(`${source.describe ?? "this folder"} is not a bundle: no ${MANIFEST}`);
    let manifest;
    try {
      manifest = JSON.parse(new TextDecoder().decode(bytes));
    } catch (e) {
      throw new BundleError(`${MANIFEST} is not valid JSON: ${e.message}`);
    }
    checkManifest(manifest);
    return new Bundle(source, manifest, options);
  }

  /** The bytes of a file the manifest names, after checking its size and sha256. */
  async readFile(relative) {
    insidePath(relative);
    const entry = this.manifest.files[relative];
    if (!entry) throw new BundleError(`bundle file '${relative}' is not in the manifest`);
    const bytes = await this.source.read(relative);
    if (bytes === null) throw new BundleError(`bundle file missing: ${relative}`);
    if (entry.bytes !== undefined && bytes.byteLength !== entry.bytes) {
      throw new BundleError(`bundle file ${relative} has ${bytes.byteLength} bytes, manifest says ${entry.bytes}`);
    }
    if (this.verify && (await sha256Hex(bytes)) !== entry.sha256) {
      throw new BundleError(`checksum mismatch for ${relative}: the file changed after export`);
    }
    return bytes;
  }

  /** A verified text file of the bundle, or null when the manifest does not name it. */
  async readText(relative) {
    if (!(relative in this.manifest.files)) return null;
    return new TextDecoder().decode(await this.readFile(relative));
  }

  /** A graph's manifest entry, or a BundleError saying the bundle lacks it. */
  graph(name) {
    const graph = this.manifest.graphs[name];
    if (!graph) throw new BundleError(`this bundle has no ${name} graph`);
    return graph;
  }
}
