// pcg64.js — numpy's default random generator, bit for bit: `np.random.default_rng(seed).random(n)`.
//
// numpy seeds a PCG64 (128-bit LCG, XSL-RR output) through a SeedSequence, and `Generator.random()`
// turns each 64-bit output into a double as (x >> 11) * 2^-53. This module reimplements all three in
// plain JavaScript (BigInt for the 128-bit state), so the browser sampler draws exactly the numbers the
// Python sampler draws for the same seed. Checked against numpy on many seeds and lengths
// (test/unit/pcg64.test.mjs, fixtures written by scripts/make_fixtures.py).

const MASK32 = 0xffffffff;
const MASK64 = (1n << 64n) - 1n;
const MASK128 = (1n << 128n) - 1n;
// PCG's default 128-bit multiplier (numpy's pcg64.h: PCG_DEFAULT_MULTIPLIER_128).
const MULTIPLIER = (0x2360ed051fc65da4n << 64n) | 0x4385df649fccf645n;

// SeedSequence constants (numpy/random/bit_generator.pyx).
const POOL_SIZE = 4;
const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;
const XSHIFT = 16;

const mul32 = (a, b) => Math.imul(a, b) >>> 0;

/** A non-negative integer seed as 32-bit words, least significant first ([0] for 0), as numpy does. */
function seedWords(seed) {
  let value = BigInt(seed);
  if (value < 0n) throw new RangeError(`seed must be an integer >= 0, got ${seed}`);
  const words = [];
  do {
    words.push(Number(value & 0xffffffffn));
    value >>= 32n;
  } while (value > 0n);
  return words;
}

/** SeedSequence(seed).generate_state(nWords) as uint32 words. */
export function seedSequenceState(seed, nWords) {
  const entropy = seedWords(seed);
  let hashConst = INIT_A;
  const hashmix = (value) => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> XSHIFT)) >>> 0;
  };
  const mix = (x, y) => {
    const result = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (result ^ (result >>> XSHIFT)) >>> 0;
  };
  const pool = new Array(POOL_SIZE);
  for (let i = 0; i < POOL_SIZE; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0);
  for (let src = 0; src < POOL_SIZE; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) {
      if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
    }
  }
  for (let src = POOL_SIZE; src < entropy.length; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  }
  let constB = INIT_B;
  const state = new Array(nWords);
  for (let i = 0; i < nWords; i++) {
    let value = (pool[i % POOL_SIZE] ^ constB) >>> 0;
    constB = mul32(constB, MULT_B);
    value = mul32(value, constB);
    state[i] = (value ^ (value >>> XSHIFT)) >>> 0;
  }
  return state;
}

/** The generator behind `np.random.default_rng(seed)`. */
export class PCG64 {
  constructor(seed) {
    // generate_state(4, uint64): eight uint32 words, paired little-endian into four uint64 words.
    const w = seedSequenceState(seed, 8);
    const u64 = [0, 2, 4, 6].map((i) => (BigInt(w[i + 1]) << 32n) | BigInt(w[i]));
    const initState = (u64[0] << 64n) | u64[1]; // pcg64_set_seed: the first word is the high half
    const initSeq = (u64[2] << 64n) | u64[3];
    // pcg_setseq_128_srandom_r
    this.increment = ((initSeq << 1n) | 1n) & MASK128;
    this.state = 0n;
    this.step();
    this.state = (this.state + initState) & MASK128;
    this.step();
  }

  step() {
    this.state = (this.state * MULTIPLIER + this.increment) & MASK128;
  }

  /** Next 64-bit output (BigInt): advance, then XSL-RR of the new state. */
  nextUint64() {
    this.step();
    const hi = this.state >> 64n;
    const xored = (hi ^ this.state) & MASK64;
    const rot = hi >> 58n;
    return ((xored >> rot) | (xored << ((64n - rot) & 63n))) & MASK64;
  }

  /** Next double in [0, 1), as `Generator.random()`. */
  random() {
    return Number(this.nextUint64() >> 11n) * 2 ** -53;
  }

  /** `Generator.random(n)` as a Float64Array. */
  randomArray(n) {
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) out[i] = this.random();
    return out;
  }
}
