// fixtures.mjs — loads the parity fixtures written by scripts/make_fixtures.py (the Python side).
// Their folder is $MEISSONIC_WEB_FIXTURES, else runtimes/web/fixtures/.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const FIXTURES = process.env.MEISSONIC_WEB_FIXTURES || path.join(here, "..", "..", "fixtures");

export function hasFixture(name) {
  return fs.existsSync(path.join(FIXTURES, name));
}

export function readJson(name) {
  const file = path.join(FIXTURES, name);
  if (!fs.existsSync(file)) {
    throw new Error(`fixture missing: ${file} (run scripts/make_fixtures.py first, see README.md)`);
  }
  return JSON.parse(fs.readFileSync(file, "utf8"));
}

/** A float32 array of `length` values at byte `offset` of a fixture's .bin file. */
export function readFloat32(name, offset, length) {
  const buffer = fs.readFileSync(path.join(FIXTURES, name));
  return new Float32Array(buffer.buffer.slice(buffer.byteOffset + offset, buffer.byteOffset + offset + 4 * length));
}
