// sampler.test.mjs — the JavaScript sampler picks the Python sampler's tokens at every step, given the
// same logits and seed: on seeded random logits (guidance, batch 2, token temperature, linear schedule,
// one step; img2img at strength 0.6 and 1, inpainting at strength 1 and 0.5) and on the logits the Python
// runtime saw while generating with the tiny and demo bundles.

import assert from "node:assert/strict";
import { test } from "node:test";
import { applyGuidance, firstStep, linspace, maskRatio, maskedStep, sample } from "../../src/sampler.js";
import { PCG64 } from "../../src/pcg64.js";
import { hasFixture, readFloat32, readJson } from "./fixtures.mjs";

function firstDifference(a, b) {
  for (let i = 0; i < Math.max(a.length, b.length); i++) if (a[i] !== b[i]) return i;
  return -1;
}

test("mask_len of every step matches Python for many step counts and lengths", () => {
  const { mask_len: cases } = readJson("schedule.json");
  for (const { schedule, steps, seq_len: seqLen, mask_len: expected } of cases) {
    const got = expected.map((_, i) => Math.floor(seqLen * maskRatio(i, steps, schedule)));
    assert.deepEqual(got, expected, `${schedule}, ${steps} steps, ${seqLen} positions`);
  }
});

test("linspace matches numpy", () => {
  for (const { start, stop, num, values } of readJson("schedule.json").linspace) {
    assert.deepEqual(Array.from(linspace(start, stop, num)), values, `linspace(${start}, ${stop}, ${num})`);
  }
});

test("sampler on seeded random logits (text-to-image, img2img, inpainting): same tokens as Python at every step", async () => {
  for (const spec of readJson("sampler-synthetic.json")) {
    const calls = spec.logits_offsets.map((offset) => readFloat32("sampler-synthetic.bin", offset, spec.logits_length));
    let call = 0;
    const denoiser = { logits: async () => calls[call++] };
    const steps = [];
    await sample({
      denoiser,
      batch: spec.batch,
      grid: spec.grid,
      vocab: spec.vocab,
      maskTokenId: spec.mask_token_id,
      options: { seed: BigInt(spec.seed), steps: spec.steps, guidanceScale: spec.guidance_scale, temperature: spec.temperature, tokenTemperature: spec.token_temperature, strength: spec.strength ?? 1.0 },
      schedule: spec.schedule,
      start: spec.start,
      onStep: (step, tokens) => steps.push(Array.from(tokens)),
    });
    assert.equal(steps.length, spec.tokens.length);
    steps.forEach((tokens, i) => {
      const at = firstDifference(tokens, spec.tokens[i]);
      assert.equal(at, -1, `case seed ${spec.seed} (${spec.edit ?? "text-to-image"}, ${spec.steps} steps): step ${i} of those run differs at position ${at}`);
    });
  }
});

for (const name of ["tiny", "demo", "demo-guided"]) {
  test(`sampler on the Python runtime's ${name} logits: same tokens at every step`, { skip: !hasFixture(`generation-${name}.json`) && `no ${name} fixture` }, () => {
    const fixture = readJson(`generation-${name}.json`);
    const [batch, seqLen, vocab] = fixture.logits_shape;
    const size = batch * seqLen * vocab;
    const options = fixture.options;
    const temperatures = linspace(options.temperature[0], options.temperature[1], options.steps);
    const rng = new PCG64(BigInt(options.seed));
    const mask = fixture.mask_token_id;
    let tokens = new Int32Array(batch * seqLen).fill(mask);
    for (let step = 0; step < options.steps; step++) {
      const logits = readFloat32(`generation-${name}.bin`, step * size * 4, size);
      tokens = maskedStep({ logits, tokens, batch, vocab, step, steps: options.steps, temperature: temperatures[step], maskTokenId: mask, rng, tokenTemperature: options.tokenTemperature });
      const at = firstDifference(Array.from(tokens), fixture.tokens[step]);
      assert.equal(at, -1, `step ${step} differs at position ${at}`);
    }
  });
}

test("guidance combines [uncond; cond] in float32 as numpy does", () => {
  const logits = new Float32Array([1, 2, 3, 1.5, 2.5, 4]);
  assert.deepEqual(Array.from(applyGuidance(logits, 9)), [5.5, 6.5, 12]);
});

test("strength: the first step run, and the options it refuses", () => {
  assert.equal(firstStep(64, 1.0), 0);
  assert.equal(firstStep(10, 0.6), 4);
  assert.equal(firstStep(12, 0.3), 9);
  assert.throws(() => firstStep(10, 0), /strength must be in \(0, 1\]/);
  assert.throws(() => firstStep(3, 0.2), /runs no step/);
});
