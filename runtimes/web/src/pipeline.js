// pipeline.js — prompt -> image from a bundle with onnxruntime-web: the text encoder, the masked sampling
// loop over the transformer graph (the guided graph when there is guidance and the bundle has it), and
// the VQ decoder. The JavaScript counterpart of meissonic_edge/runtime/onnx_pipeline.py's OnnxPipeline.
//
//   import * as ort from "onnxruntime-web";
//   const pipe = await WebPipeline.load(httpSource("/bundles/demo/"), { ort });
//   const { image, tokens } = await pipe.generate("a red circle", { steps: 16, seed: 0 });
//
// `ort` is passed in rather than imported, so a page chooses its onnxruntime-web build (wasm only, or
// with WebGPU) and its settings (ort.env.wasm.numThreads) before the first session is made.

import { Bundle, BundleError } from "./bundle.js";
import { toRgba } from "./imaging.js";
import { sample } from "./sampler.js";
import { ClipTokenizer } from "./tokenizer.js";

export const VQ_STRIDE = 16; // pixels per VQ token along each side
const GUIDED_GRAPH = "transformer_guided";

/** The generation defaults recorded in a bundle's manifest, as sampler options. */
export function defaultOptions(manifest) {
  const d = manifest.defaults;
  const micro = d.micro_conditions ?? {};
  return {
    steps: d.steps,
    guidanceScale: d.guidance_scale,
    negativePrompt: d.negative_prompt ?? "",
    seed: 0,
    height: d.height,
    width: d.width,
    temperature: d.temperature,
    tokenTemperature: d.token_temperature ?? 1.0,
    aestheticScore: micro.aesthetic_score ?? 6.0,
    crop: micro.crop ?? [0, 0],
    strength: 1.0,
  };
}

/** Refuse bad options with a message naming the option (as GenerationOptions.validate). */
export function validateOptions(o, tokenStride) {
  if (!Number.isInteger(o.steps) || o.steps < 1) throw new Error(`steps must be an integer >= 1, got ${o.steps}`);
  if (!Number.isFinite(o.guidanceScale) || o.guidanceScale < 0) throw new Error(`guidance scale must be >= 0, got ${o.guidanceScale}`);
  for (const name of ["height", "width"]) {
    const v = o[name];
    if (!Number.isInteger(v) || v < tokenStride || v % tokenStride) throw new Error(`${name} must be a positive multiple of ${tokenStride}, got ${v}`);
  }
  const seed = typeof o.seed === "bigint" ? o.seed : Number.isInteger(o.seed) ? BigInt(o.seed) : -1n;
  if (seed < 0n) throw new Error(`seed must be an integer >= 0, got ${o.seed}`);
  if (!Number.isFinite(o.tokenTemperature) || o.tokenTemperature <= 0) throw new Error(`token temperature must be > 0, got ${o.tokenTemperature}`);
}

export class WebPipeline {
  constructor(ort, bundle, tokenizer, sessionOptions) {
    this.ort = ort;
    this.bundle = bundle;
    this.manifest = bundle.manifest;
    this.model = bundle.manifest.model;
    this.tokenizer = tokenizer;
    this.sessionOptions = sessionOptions;
    this.sessions = new Map();
  }

  /**
   * Open a bundle (manifest checked; each file checked against its sha256 as it is read) and its tokenizer.
   * options: ort (the onnxruntime-web module, required), executionProviders (["wasm"]), verify (true),
   * onProgress(message) for the loading stages.
   */
  static async load(source, { ort, executionProviders = ["wasm"], verify = true, onProgress = () => {} } = {}) {
    if (!ort) throw new Error("WebPipeline.load needs the onnxruntime-web module as options.ort");
    onProgress("reading manifest.json");
    const bundle = await Bundle.open(source, { verify });
    const dir = bundle.manifest.tokenizer.dir;
    onProgress(`reading ${dir}/`);
    const tokenizer = await ClipTokenizer.load((relative) => bundle.readText(relative), dir);
    return new WebPipeline(ort, bundle, tokenizer, { executionProviders, graphOptimizationLevel: "all" });
  }

  /** The session of one graph, made on first use; its inputs and outputs must be the manifest's. */
  async session(name, onProgress = () => {}) {
    if (!this.sessions.has(name)) {
      const graph = this.bundle.graph(name);
      onProgress(`loading ${graph.file}`);
      const model = await this.bundle.readFile(graph.file);
      const externalData = [];
      for (const relative of graph.external_data ?? []) {
        externalData.push({ path: relative.split("/").pop(), data: await this.bundle.readFile(relative) });
      }
      let session;
      try {
        session = await this.ort.InferenceSession.create(model, { ...this.sessionOptions, externalData });
      } catch (e) {
        throw new BundleError(`cannot load ${graph.file}: ${String(e.message ?? e).split("\n")[0]}`);
      }
      checkSessionNames(session, graph, name);
      this.sessions.set(name, session);
    }
    return this.sessions.get(name);
  }

  transformerGraph(guided) {
    return guided && GUIDED_GRAPH in this.manifest.graphs ? GUIDED_GRAPH : "transformer";
  }

  /** Load every graph one generation with these options needs (so the first step is not slowed by it). */
  async prepare(overrides = {}, onProgress) {
    const options = { ...defaultOptions(this.manifest), ...overrides };
    for (const name of ["text_encoder", this.transformerGraph(options.guidanceScale > 1), "vq_decoder"]) {
      await this.session(name, onProgress);
    }
  }

  /** Prompts -> { textEmbeds, hidden } ort tensors. */
  async encodeText(texts) {
    const ids = this.tokenizer.encode(texts);
    const session = await this.session("text_encoder");
    const out = await session.run({ input_ids: new this.ort.Tensor("int64", ids, [texts.length, 77]) });
    return { textEmbeds: out.text_embeds, hidden: out.hidden_states };
  }

  /**
   * An image's VQ tokens (Int32Array, h*w) from the bundle's vq_encoder, for editing. image: { data: RGBA
   * bytes, width, height }, each side a multiple of the token stride (this runtime does not resize images).
   */
  async encodeImage(image) {
    if (!("vq_encoder" in this.manifest.graphs)) {
      throw new BundleError("this bundle has no vq_encoder graph, which editing needs: re-export it");
    }
    const stride = this.model.token_stride ?? VQ_STRIDE;
    const { width, height, data } = image;
    if (width % stride || height % stride) {
      throw new Error(`an edit's image must be a multiple of ${stride} pixels on each side, got ${width}x${height} (crop or resize it first)`);
    }
    const plane = width * height;
    const pixels = new Float32Array(3 * plane);
    for (let i = 0; i < plane; i++) {
      for (let c = 0; c < 3; c++) pixels[c * plane + i] = Math.fround(data[i * 4 + c] / 255); // numpy: uint8 -> float32 / 255
    }
    const session = await this.session("vq_encoder");
    const out = await session.run({ image: new this.ort.Tensor("float32", pixels, [1, 3, height, width]) });
    return Int32Array.from(out.tokens.data, (t) => Number(t));
  }

  /** VQ tokens (Int32Array, h*w) -> RGBA pixels of one image. */
  async decode(tokens, h, w) {
    const session = await this.session("vq_decoder");
    const ids = BigInt64Array.from(tokens, (t) => BigInt(t));
    const out = await session.run({ tokens: new this.ort.Tensor("int64", ids, [1, h, w]) });
    const [, , height, width] = out.image.dims;
    return toRgba(out.image.data, height, width);
  }

  /**
   * Generate one image. overrides: steps, seed, height, width, guidanceScale, negativePrompt, temperature,
   * tokenTemperature, strength (editing: the share of steps run) (default: the bundle's). callbacks: onStep({ step,
   * steps, tokens, ms, modelMs }) after each step; edit: { image: RGBA {data, width, height}, repaint: one
   * 0/1 per token-grid cell (1 = repaint; inpainting and outpainting) or none (img2img) }.
   * Returns { image: {width, height, data RGBA}, tokens: Int32Array, stepMs: number[] (each step's time),
   * modelStepMs: number[] (of which inside the transformer graph), options }.
   */
  async generate(prompt, overrides = {}, { onStep, onProgress, edit = null } = {}) {
    const options = { ...defaultOptions(this.manifest), ...overrides };
    let start = null;
    let schedule = this.model.masking_schedule;
    if (edit) {
      // An edit's size is its image's; img2img masks its tokens at random, inpainting repaints `repaint`.
      if (!edit.image) throw new Error("an edit needs its image: { image: { data, width, height }, repaint? }");
      options.width = edit.image.width;
      options.height = edit.image.height;
      const tokens = await this.encodeImage(edit.image);
      start = { tokens, repaint: edit.repaint ?? null };
      if (start.repaint) {
        const cells = (options.height / VQ_STRIDE) * (options.width / VQ_STRIDE);
        if (start.repaint.length !== cells) throw new Error(`the repaint mask has ${start.repaint.length} cells, the token grid ${cells}`);
        schedule = "linear"; // upstream's inpaint pipeline switches to the linear schedule
      }
    }
    validateOptions(options, this.model.token_stride ?? VQ_STRIDE);
    const guided = options.guidanceScale > 1.0;
    await this.prepare(options, onProgress);
    const texts = guided ? [options.negativePrompt, prompt] : [prompt];
    const { textEmbeds, hidden } = await this.encodeText(texts);
    const micro = new Float32Array(texts.length * 5);
    for (let b = 0; b < texts.length; b++) {
      micro.set([options.width, options.height, options.crop[0], options.crop[1], options.aestheticScore], b * 5);
    }
    const graphName = this.transformerGraph(guided);
    const transformer = await this.session(graphName);
    const [h, w] = [options.height / VQ_STRIDE, options.width / VQ_STRIDE];
    const ort = this.ort;
    const feed = {
      encoder_hidden_states: hidden,
      text_embeds: textEmbeds,
      micro_conds: new ort.Tensor("float32", micro, [texts.length, 5]),
    };
    if (graphName === GUIDED_GRAPH) feed.guidance_scale = new ort.Tensor("float32", new Float32Array([options.guidanceScale]), [1]);
    let modelMs = 0; // time inside the transformer graph this step; the rest of a step is the sampler's
    const denoiser = {
      appliesGuidance: graphName === GUIDED_GRAPH,
      async logits(tokens, modelBatch, timestep) {
        const ids = BigInt64Array.from(tokens, (t) => BigInt(t));
        const runStarted = performance.now();
        const out = await transformer.run({
          ...feed,
          tokens: new ort.Tensor("int64", ids, [modelBatch, h, w]),
          timestep: new ort.Tensor("float32", new Float32Array(modelBatch).fill(timestep), [modelBatch]),
        });
        modelMs = performance.now() - runStarted;
        return out.logits.data;
      },
    };
    const stepMs = [];
    const modelStepMs = [];
    let last = performance.now();
    const tokens = await sample({
      denoiser,
      batch: 1,
      grid: [h, w],
      vocab: this.model.codebook_size,
      maskTokenId: this.model.mask_token_id,
      options: { ...options, seed: BigInt(options.seed) },
      schedule,
      start,
      onStep: async (step, stepTokens) => {
        const now = performance.now();
        stepMs.push(now - last);
        modelStepMs.push(modelMs);
        if (onStep) await onStep({ step, steps: options.steps, tokens: stepTokens, ms: stepMs[stepMs.length - 1], modelMs });
        last = performance.now(); // the callback's own time (painting the page) is not the step's
      },
    });
    const image = await this.decode(tokens, h, w);
    return { image, tokens, stepMs, modelStepMs, options };
  }

  /** Free every session's memory (wasm heap) now. */
  async release() {
    for (const session of this.sessions.values()) await session.release();
    this.sessions.clear();
  }
}

/** The session's input and output names must be the ones the manifest promises. */
function checkSessionNames(session, graph, name) {
  for (const [kind, actual] of [["input", session.inputNames], ["output", session.outputNames]]) {
    const expected = (graph[`${kind}s`] ?? []).map((spec) => spec.name);
    for (const missing of expected.filter((n) => !actual.includes(n))) {
      throw new BundleError(`${name} graph has no ${kind} '${missing}' that the manifest names`);
    }
    for (const extra of actual.filter((n) => !expected.includes(n))) {
      throw new BundleError(`${name} graph has an ${kind} '${extra}' that the manifest does not name`);
    }
  }
}
