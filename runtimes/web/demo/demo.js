// demo.js — the demo page: pick a bundle served by scripts/serve.mjs, type a prompt, generate in the tab
// with onnxruntime-web (wasm threads or WebGPU), watch a progress bar per step with each step's time.
// Editing: img2img redraws the image on the canvas (or an uploaded one) at a strength; inpaint redraws the
// token cells painted on it. Uploaded images are scaled to the model's size by the canvas (not Lanczos, as
// the Python runtime resizes), so their tokens can differ from Python's for the same file.
// Page parameters (reload to change): ?bundle=NAME&threads=N&backend=wasm|webgpu. The last generation is
// kept in window.demo for the browser tests.

import { WebPipeline, httpSource } from "../src/index.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { pipeline: null, result: null, busy: false, repaint: null, grid: [0, 0] };
window.demo = state;

function setStatus(text, kind = "busy") {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

async function loadOrt(backend, threads) {
  const ort = await import(backend === "webgpu" ? "onnxruntime-web/webgpu" : "onnxruntime-web");
  ort.env.wasm.wasmPaths = new URL("/node_modules/onnxruntime-web/dist/", location.href).href;
  // Threads need cross-origin isolation (the server's COOP/COEP headers) for SharedArrayBuffer.
  ort.env.wasm.numThreads = crossOriginIsolated ? threads : 1;
  return ort;
}

async function main() {
  const bundles = await (await fetch("/bundles/index.json")).json();
  if (bundles.length === 0) throw new Error("the server serves no bundle: start it as node scripts/serve.mjs BUNDLE_DIR");
  const bundleName = params.get("bundle") ?? bundles[0];
  const threads = Number(params.get("threads") ?? 1);
  const backend = params.get("backend") ?? "wasm";
  for (const name of bundles) $("bundle").add(new Option(name, name, false, name === bundleName));
  $("threads").value = String(threads);
  $("backend").value = backend;
  for (const id of ["bundle", "threads", "backend"]) {
    $(id).addEventListener("change", () => {
      params.set(id, $(id).value);
      location.search = params.toString(); // onnxruntime's settings are fixed once it has started
    });
  }
  if (backend === "webgpu" && !navigator.gpu) throw new Error("this browser has no WebGPU: choose the wasm backend");

  const ort = await loadOrt(backend, threads);
  const started = performance.now();
  const pipeline = await WebPipeline.load(httpSource(`/bundles/${bundleName}/`), {
    ort,
    executionProviders: [backend],
    onProgress: (message) => setStatus(message),
  });
  const defaults = pipeline.manifest.defaults;
  await pipeline.prepare({}, (message) => setStatus(`${message} (sha256 checked)`));
  state.pipeline = pipeline;
  $("steps").value = params.get("steps") ?? String(defaults.steps);
  $("canvas").width = defaults.width;
  $("canvas").height = defaults.height;
  const loadSeconds = ((performance.now() - started) / 1000).toFixed(1);
  setStatus(`ready: ${bundleName} (${defaults.width}x${defaults.height}, model default ${defaults.steps} steps), ` +
    `loaded and verified in ${loadSeconds} s; ${ort.env.wasm.numThreads} thread(s), ${backend}`, "ready");
  $("generate").disabled = false;
  setupEditing(defaults);
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.busy) generate().catch(showError);
  });
}

/** The edit controls: the mode, an uploaded image, and painting token cells on the mask canvas. */
function setupEditing(defaults) {
  const [h, w] = [defaults.height / 16, defaults.width / 16];
  state.grid = [h, w];
  state.repaint = new Uint8Array(h * w);
  $("mask").width = defaults.width;
  $("mask").height = defaults.height;
  const showMode = () => document.body.classList.toggle("inpaint", $("mode").value === "inpaint");
  $("mode").addEventListener("change", showMode);
  showMode();
  $("clear-mask").addEventListener("click", () => {
    state.repaint.fill(0);
    drawMask();
  });
  $("upload").addEventListener("change", async () => {
    const file = $("upload").files[0];
    if (!file) return;
    const bitmap = await createImageBitmap(file);
    $("canvas").getContext("2d").drawImage(bitmap, 0, 0, $("canvas").width, $("canvas").height);
    if ($("mode").value === "generate") $("mode").value = "img2img";
    showMode();
  });
  let painting = false;
  const paint = (event) => {
    const rect = $("mask").getBoundingClientRect();
    const col = Math.floor(((event.clientX - rect.left) / rect.width) * w);
    const row = Math.floor(((event.clientY - rect.top) / rect.height) * h);
    for (let r = row - 1; r <= row + 1; r++) {
      for (let c = col - 1; c <= col + 1; c++) if (r >= 0 && r < h && c >= 0 && c < w) state.repaint[r * w + c] = 1;
    }
    drawMask();
  };
  $("mask").addEventListener("pointerdown", (event) => { painting = true; paint(event); });
  $("mask").addEventListener("pointermove", (event) => painting && paint(event));
  window.addEventListener("pointerup", () => (painting = false));
}

function drawMask() {
  const [h, w] = state.grid;
  const context = $("mask").getContext("2d");
  const [cw, ch] = [$("mask").width / w, $("mask").height / h];
  context.clearRect(0, 0, $("mask").width, $("mask").height);
  context.fillStyle = "rgba(45, 91, 215, 0.35)";
  state.repaint.forEach((on, i) => on && context.fillRect((i % w) * cw, Math.floor(i / w) * ch, cw, ch));
}

/** The edit of this generation from the page's controls, or null for text to image. */
function currentEdit() {
  const mode = $("mode").value;
  if (mode === "generate") return null;
  const canvas = $("canvas");
  const { data, width, height } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  if (mode === "inpaint" && !state.repaint.some((on) => on)) throw new Error("inpaint: drag on the image to paint the cells to redraw");
  return { image: { data, width, height }, repaint: mode === "inpaint" ? state.repaint : null };
}

async function generate() {
  state.busy = true;
  $("generate").disabled = true;
  const steps = Number($("steps").value);
  const seed = Number($("seed").value);
  const prompt = $("prompt").value;
  const edit = currentEdit();
  const strength = edit ? Number($("strength").value) : 1.0;
  $("steps-list").replaceChildren();
  $("progress").max = Math.trunc(steps * strength); // an edit runs the last int(steps x strength) steps
  $("progress").value = 0;
  setStatus(`generating "${prompt}"`);
  const started = performance.now();
  const result = await state.pipeline.generate(prompt, { steps, seed, strength }, {
    edit,
    onStep: async ({ step, steps: total, ms }) => {
      $("progress").value = $("steps-list").children.length + 1;
      $("step-label").textContent = `step ${step + 1}/${total}`;
      const item = document.createElement("li");
      item.textContent = `${ms.toFixed(0)} ms`;
      $("steps-list").append(item);
      await new Promise((resolve) => setTimeout(resolve, 0)); // let the page paint the progress
    },
  });
  const { width, height, data } = result.image;
  $("canvas").width = width;
  $("canvas").height = height;
  $("canvas").getContext("2d").putImageData(new ImageData(data, width, height), 0, 0);
  const mean = result.stepMs.reduce((a, b) => a + b, 0) / result.stepMs.length;
  $("summary").textContent = `${result.stepMs.length} steps, mean ${mean.toFixed(0)} ms/step; ` +
    `${((performance.now() - started) / 1000).toFixed(1)} s in all (text encoder, steps, VQ decode)`;
  state.result = result;
  state.busy = false;
  $("generate").disabled = false;
  const what = edit ? `${$("mode").value} at strength ${strength}` : "text to image";
  setStatus(`done: "${prompt}", seed ${seed}, ${steps} steps, ${what}`, "done");
}

function showError(e) {
  console.error(e);
  state.busy = false;
  if (state.pipeline) $("generate").disabled = false;
  setStatus(`error: ${e.message ?? e}`, "error");
}

main().catch(showError);
