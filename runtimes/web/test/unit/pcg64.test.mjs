// pcg64.test.mjs — the JavaScript PCG64 gives numpy's default_rng(seed).random(n), bit for bit.

import assert from "node:assert/strict";
import { test } from "node:test";
import { PCG64, seedSequenceState } from "../../src/pcg64.js";
import { readJson } from "./fixtures.mjs";

test("default_rng(seed).random(n) matches numpy for many seeds and lengths", () => {
  const cases = readJson("rng.json");
  assert.ok(cases.length > 100);
  for (const { seed, n, values } of cases) {
    const got = new PCG64(BigInt(seed)).randomArray(n);
    for (let i = 0; i < n; i++) {
      if (got[i] !== values[i]) assert.fail(`seed ${seed}, draw ${i}: ${got[i]} != numpy's ${values[i]}`);
    }
  }
});

test("SeedSequence words of seed 0 (numpy: SeedSequence(0).generate_state(4))", () => {
  // np.random.SeedSequence(0).generate_state(4) == [2968811710, 3677149159, 745650761, 2884920346]
  assert.deepEqual(seedSequenceState(0, 4), [2968811710, 3677149159, 745650761, 2884920346]);
});

test("a negative seed is refused", () => {
  assert.throws(() => new PCG64(-1), /seed must be an integer >= 0/);
});
