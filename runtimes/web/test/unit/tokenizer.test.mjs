// tokenizer.test.mjs — the web tokenizer gives exactly the Python runtime's ids (ClipTokenizer) on a few
// hundred prompts written by the Python side, for the tiny model's and the demo model's tokenizers.

import assert from "node:assert/strict";
import path from "node:path";
import { test } from "node:test";
import { Bundle } from "../../src/bundle.js";
import { ClipTokenizer, MAX_LENGTH } from "../../src/tokenizer.js";
import { hasFixture, readJson } from "./fixtures.mjs";
import { fsSource } from "./fs-source.mjs";

const BUNDLES = process.env.MEISSONIC_WEB_BUNDLES;

for (const [name, bundleName] of [["tiny", "tiny"], ["demo", "demo-fp32"]]) {
  const skip = (!BUNDLES && "set MEISSONIC_WEB_BUNDLES") || (!hasFixture(`tokenizer-${name}.json`) && `no tokenizer-${name}.json fixture`);
  test(`${name} tokenizer: same ids as the Python runtime on every prompt`, { skip }, async () => {
    const bundle = await Bundle.open(fsSource(path.join(BUNDLES, bundleName)));
    const tokenizer = await ClipTokenizer.load((relative) => bundle.readText(relative), bundle.manifest.tokenizer.dir);
    const { prompts, ids } = readJson(`tokenizer-${name}.json`);
    assert.ok(prompts.length >= 300, `only ${prompts.length} prompts`);
    let truncated = 0;
    prompts.forEach((prompt, i) => {
      const got = tokenizer.encodeOne(prompt);
      assert.deepEqual(got.ids, ids[i], `prompt ${i} ${JSON.stringify(prompt)}`);
      if (got.dropped > 0) truncated++;
    });
    assert.ok(truncated >= 2, "the fixture should hold prompts longer than 75 tokens");
    const batch = tokenizer.encode([prompts[0], prompts[1]]);
    assert.equal(batch.length, 2 * MAX_LENGTH);
    assert.equal(batch[MAX_LENGTH], BigInt(ids[1][0]));
  });
}
