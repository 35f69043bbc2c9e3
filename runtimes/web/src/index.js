// index.js — the package's public API: open a bundle, generate, and the pieces underneath.

export { Bundle, BundleError, httpSource, insidePath, sha256Hex } from "./bundle.js";
export { toRgba } from "./imaging.js";
export { PCG64 } from "./pcg64.js";
export { WebPipeline, defaultOptions, validateOptions } from "./pipeline.js";
export { applyGuidance, drawTokens, firstStep, linspace, maskRatio, maskedStep, sample, startTokens } from "./sampler.js";
export { ClipTokenizer, MAX_LENGTH } from "./tokenizer.js";
