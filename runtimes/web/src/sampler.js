// sampler.js — the masked sampling loop (MaskGIT-style parallel decoding), a port of
// meissonic_edge/runtime/sampler.py (text-to-image and editing) that picks the same tokens for the same logits and seed.
//
// Semantics (see sampler.py's docstring): start fully masked; step i of N gives the model timestep
// N-1-i; with guidance, logits = uncond + s (cond - uncond); each masked position draws a token from
// softmax(logits / token_temperature) by inverse CDF; except at the last step the mask_len least
// confident drawn tokens are masked again (confidence = log p + temperature_i * Gumbel noise).
//
// Randomness: a PCG64 seeded as `np.random.default_rng(seed)` (pcg64.js). Each step draws, in this order,
// batch*seq_len uniforms for the token draws and, except at the last step, batch*seq_len for the Gumbel
// noise — the same numbers, in the same order, as the Python sampler.
//
// Editing (sampler.py's EditStart): the sampler starts from an image's tokens instead and runs only the
// last int(N * strength) steps. img2img: one more draw of batch*seq_len uniforms before the first step
// masks each image token whose u < mask_ratio(first - 1) (1 when first = 0); inpainting/outpainting: the
// repaint positions are masked, nothing is drawn, and each step's mask_len is scaled by the repainted share.
//
// Float math mirrors numpy's dtypes: the softmax, its cumulative sum (sequential, float32) and log p are
// float32 (Math.fround after every operation); u * total, the Gumbel noise and the confidences are float64.

import { PCG64 } from "./pcg64.js";

const f32 = Math.fround;
const LOG_TINY = Math.log(1e-20); // np.log(1e-20): a float64 scalar, so the clamp below is float64

/** numpy.linspace(start, stop, num) for num >= 1 (endpoint included). */
export function linspace(start, stop, num) {
  const out = new Float64Array(num);
  if (num === 1) {
    out[0] = start;
    return out;
  }
  const div = num - 1;
  const delta = stop - start;
  const step = delta / div;
  for (let i = 0; i < num; i++) out[i] = step === 0 ? (i / div) * delta + start : i * step + start;
  out[num - 1] = stop;
  return out;
}

/** Share of the sequence still masked after step `step` (0-based) of `steps`. */
export function maskRatio(step, steps, schedule = "cosine") {
  const ratio = (step + 1) / steps;
  if (schedule === "cosine") return Math.cos((ratio * Math.PI) / 2);
  if (schedule === "linear") return 1.0 - ratio;
  throw new Error(`unknown masking schedule '${schedule}': use 'cosine' or 'linear'`);
}

/** [uncond; cond] logits (2B*L*K) -> uncond + scale * (cond - uncond) (B*L*K), float32 as numpy does. */
export function applyGuidance(logits, scale) {
  const half = logits.length / 2;
  const s = f32(scale);
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const u = logits[i];
    out[i] = f32(f32(f32(logits[half + i] - u) * s) + u);
  }
  return out;
}

/**
 * Draw one token per position from softmax(logits / tokenTemperature) by inverse CDF, and log p of it.
 * logits: Float32Array holding `positions` rows of `vocab` starting at `offset`; u: `positions` uniforms.
 */
export function drawTokens(logits, offset, positions, vocab, u, uOffset, tokenTemperature = 1.0) {
  const tokens = new Int32Array(positions);
  const logProbs = new Float32Array(positions);
  const z = new Float32Array(vocab);
  const cdf = new Float32Array(vocab);
  const temperature = f32(tokenTemperature);
  for (let p = 0; p < positions; p++) {
    const row = offset + p * vocab;
    let top = -Infinity;
    for (let k = 0; k < vocab; k++) {
      z[k] = tokenTemperature !== 1.0 ? f32(logits[row + k] / temperature) : logits[row + k];
      if (z[k] > top) top = z[k];
    }
    let sum = 0;
    for (let k = 0; k < vocab; k++) {
      sum = f32(sum + f32(Math.exp(f32(z[k] - top))));
      cdf[k] = sum;
    }
    const threshold = u[uOffset + p] * sum; // float64, as numpy promotes u (float64) * total (float32)
    let picked = 0;
    while (picked < vocab && cdf[picked] < threshold) picked++;
    picked = Math.min(picked, vocab - 1);
    tokens[p] = picked;
    logProbs[p] = f32(f32(z[picked] - top) - f32(Math.log(sum)));
  }
  return { tokens, logProbs };
}

/**
 * One scheduler step: draw the unknown tokens, then re-mask the least confident ones.
 * logits: Float32Array (batch*seqLen*vocab), tokens: Int32Array (batch*seqLen). Returns new tokens.
 */
export function maskedStep({ logits, tokens, batch, vocab, step, steps, temperature, maskTokenId, rng, schedule = "cosine", tokenTemperature = 1.0, startingMaskRatio = 1.0 }) {
  const seqLen = tokens.length / batch;
  if (logits.length !== batch * seqLen * vocab) {
    throw new Error(`logits hold ${logits.length} values, expected ${batch}x${seqLen}x${vocab}`);
  }
  const u = rng.randomArray(batch * seqLen);
  const result = new Int32Array(tokens.length);
  const logProbs = new Float32Array(tokens.length);
  for (let b = 0; b < batch; b++) {
    const drawn = drawTokens(logits, b * seqLen * vocab, seqLen, vocab, u, b * seqLen, tokenTemperature);
    logProbs.set(drawn.logProbs, b * seqLen);
    for (let i = 0; i < seqLen; i++) {
      const at = b * seqLen + i;
      result[at] = tokens[at] === maskTokenId ? drawn.tokens[i] : tokens[at];
    }
  }
  if (step === steps - 1) return result;

  const maskLen = Math.floor(seqLen * startingMaskRatio * maskRatio(step, steps, schedule));
  const g = rng.randomArray(batch * seqLen);
  for (let b = 0; b < batch; b++) {
    const confidence = new Float64Array(seqLen);
    let unknownCount = 0;
    for (let i = 0; i < seqLen; i++) {
      const at = b * seqLen + i;
      if (tokens[at] !== maskTokenId) {
        confidence[i] = Infinity; // decided tokens are never masked again
        continue;
      }
      unknownCount++;
      const gumbel = -Math.log(Math.max(-Math.log(Math.max(g[at], 1e-20)), 1e-20));
      confidence[i] = Math.max(logProbs[at], LOG_TINY) + temperature * gumbel;
    }
    const count = unknownCount ? Math.max(1, Math.min(maskLen, unknownCount - 1)) : 0; // nothing masked: nothing to re-mask
    const order = Array.from({ length: seqLen }, (_, i) => i);
    order.sort((a, c) => confidence[a] - confidence[c] || a - c); // stable, as numpy's kind="stable"
    for (let j = 0; j < count; j++) result[b * seqLen + order[j]] = maskTokenId;
  }
  return result;
}

/** Index of the first step run: steps - int(steps * strength) (0 for text-to-image). */
export function firstStep(steps, strength = 1.0) {
  if (!(strength > 0 && strength <= 1)) throw new Error(`strength must be in (0, 1], got ${strength}`);
  const run = Math.trunc(steps * strength);
  if (run < 1) throw new Error(`strength ${strength} of ${steps} steps runs no step (int(steps x strength) = 0): raise the strength or the steps`);
  return steps - run;
}

/**
 * The tokens (Int32Array, batch*seqLen) before the first step run, and the starting mask ratio.
 * start: null (text-to-image) or { tokens: seqLen image tokens, repaint: seqLen booleans (1 = repaint) or null }.
 */
export function startTokens(start, batch, seqLen, maskTokenId, steps, first, schedule, rng) {
  if (!start) {
    if (first) throw new Error("strength applies to editing (an input image); text-to-image runs every step");
    return { tokens: new Int32Array(batch * seqLen).fill(maskTokenId), startingMaskRatio: 1.0 };
  }
  if (start.tokens.length !== seqLen) {
    throw new Error(`the edit's tokens cover ${start.tokens.length} positions, the grid has ${seqLen}`);
  }
  const tokens = new Int32Array(batch * seqLen);
  for (let b = 0; b < batch; b++) tokens.set(start.tokens, b * seqLen);
  if (start.repaint) {
    let repainted = 0;
    for (let i = 0; i < seqLen; i++) {
      if (!start.repaint[i]) continue;
      repainted++;
      for (let b = 0; b < batch; b++) tokens[b * seqLen + i] = maskTokenId;
    }
    return { tokens, startingMaskRatio: repainted / seqLen };
  }
  const ratio = first === 0 ? 1.0 : maskRatio(first - 1, steps, schedule);
  const u = rng.randomArray(batch * seqLen);
  for (let i = 0; i < tokens.length; i++) if (u[i] < ratio) tokens[i] = maskTokenId;
  return { tokens, startingMaskRatio: 1.0 };
}

/**
 * Run the steps (all of them, or the last int(N * strength) of an edit); return the final tokens (Int32Array, batch*h*w, row-major).
 * denoiser.logits(tokens Int32Array, modelBatch, timestep) -> Float32Array (modelBatch*h*w*vocab), or already
 * guided (batch*h*w*vocab) when denoiser.appliesGuidance. `onStep(step, tokens)` sees every step (awaited).
 */
export async function sample({ denoiser, batch, grid, vocab, maskTokenId, options, schedule = "cosine", onStep, start = null }) {
  const [height, width] = grid;
  const seqLen = height * width;
  const rng = new PCG64(options.seed);
  const first = firstStep(options.steps, options.strength ?? 1.0);
  const begin = startTokens(start, batch, seqLen, maskTokenId, options.steps, first, schedule, rng);
  let tokens = begin.tokens;
  const temperatures = linspace(options.temperature[0], options.temperature[1], options.steps);
  const guided = options.guidanceScale > 1.0;
  for (let step = first; step < options.steps; step++) {
    let modelTokens = tokens;
    if (guided) {
      modelTokens = new Int32Array(2 * tokens.length);
      modelTokens.set(tokens, 0);
      modelTokens.set(tokens, tokens.length);
    }
    let logits = await denoiser.logits(modelTokens, guided ? 2 * batch : batch, options.steps - 1 - step);
    if (guided && !denoiser.appliesGuidance) logits = applyGuidance(logits, options.guidanceScale);
    tokens = maskedStep({
      logits,
      tokens,
      batch,
      vocab,
      step,
      steps: options.steps,
      temperature: temperatures[step],
      maskTokenId,
      rng,
      schedule,
      tokenTemperature: options.tokenTemperature,
      startingMaskRatio: begin.startingMaskRatio,
    });
    if (onStep) await onStep(step, tokens);
  }
  return tokens;
}
