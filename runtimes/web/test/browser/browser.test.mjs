// browser.test.mjs — the web runtime in a real headless Chromium, against the Python runtime.
//
// Needs: the fixtures of scripts/make_fixtures.py ($MEISSONIC_WEB_FIXTURES) and a folder of bundles
// ($MEISSONIC_WEB_BUNDLES: tiny/ and demo-fp32/ (the fixtures' bundles), demo-int8/ for the demo page).
// Screenshots go to $MEISSONIC_WEB_OUT (default: a temporary folder). ci.sh sets all three.
//
// 1. tiny and demo fp32 bundles (the demo model with its own settings and with guidance): the page gives
//    the Python runtime's tokens at every step;
// 1b. editing with the demo fp32 bundle (img2img at strength 0.6, inpainting): same encoder tokens, same
//    tokens at every step run;
// 2. bundles with a wrong checksum, a missing file or a path leaving the folder are refused, naming it;
// 3. the demo page generates with the demo model's int8 bundle, then inpaints cells painted with the mouse
//    (the other cells keep their tokens), and is screenshotted after each.

import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { startServer } from "../../scripts/serve.mjs";
import { readJson } from "../unit/fixtures.mjs";
import { launchChromium } from "./chromium.mjs";

const BUNDLES = process.env.MEISSONIC_WEB_BUNDLES;
const OUT = process.env.MEISSONIC_WEB_OUT || fs.mkdtempSync(path.join(os.tmpdir(), "meissonic-web-out-"));
const TIMEOUT = 240_000;
let server;
let browser;
let origin;
let badDir;

/** Copies of the tiny bundle broken in three ways. */
function makeBadBundles() {
  badDir = fs.mkdtempSync(path.join(os.tmpdir(), "meissonic-web-bad-"));
  const tiny = fs.realpathSync(path.join(BUNDLES, "tiny"));
  const copy = (name) => {
    const dir = path.join(badDir, name);
    fs.cpSync(tiny, dir, { recursive: true, dereference: true });
    return dir;
  };
  const tampered = copy("tampered");
  const file = path.join(tampered, "vq_decoder.onnx");
  const bytes = fs.readFileSync(file);
  bytes[bytes.length - 1] ^= 1;
  fs.writeFileSync(file, bytes);
  const missing = copy("missing");
  fs.rmSync(path.join(missing, "transformer_guided.onnx")); // the graph a guided generation loads
  const escaping = copy("escaping");
  const manifestFile = path.join(escaping, "manifest.json");
  const manifest = JSON.parse(fs.readFileSync(manifestFile, "utf8"));
  manifest.graphs.text_encoder.file = "../tiny/text_encoder.onnx";
  manifest.files["../tiny/text_encoder.onnx"] = manifest.files["text_encoder.onnx"];
  fs.writeFileSync(manifestFile, JSON.stringify(manifest));
  return { tampered, missing, escaping };
}

before(async () => {
  if (!BUNDLES) throw new Error("set MEISSONIC_WEB_BUNDLES to a folder holding tiny/, demo-fp32/ and demo-int8/ (see ci.sh)");
  const bundles = {};
  for (const name of ["tiny", "demo-fp32", "demo-int8"]) {
    if (fs.existsSync(path.join(BUNDLES, name))) bundles[name] = path.join(BUNDLES, name);
  }
  Object.assign(bundles, makeBadBundles());
  server = await startServer({ bundles, port: 0 });
  origin = `http://127.0.0.1:${server.address().port}`;
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  server?.close();
  if (badDir) fs.rmSync(badDir, { recursive: true, force: true });
});

async function harness(threads = 1) {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  await page.goto(`${origin}/test/browser/harness.html?threads=${threads}`);
  await page.waitForFunction(() => typeof window.runGeneration === "function");
  return page;
}

for (const [name, bundle] of [["tiny", "tiny"], ["demo", "demo-fp32"], ["demo-guided", "demo-fp32"]]) {
  test(`${name} fp32 bundle: the page's tokens equal the Python runtime's at every step`, { timeout: TIMEOUT }, async () => {
    const fixture = readJson(`generation-${name}.json`);
    const page = await harness(1);
    const result = await page.evaluate((args) => window.runGeneration(args), {
      bundle: `/bundles/${bundle}/`,
      prompt: fixture.prompt,
      options: fixture.options,
    });
    await page.close();
    assert.ok(result.crossOriginIsolated, "the page is not cross-origin isolated (COOP/COEP headers)");
    assert.equal(result.steps.length, fixture.tokens.length);
    result.steps.forEach((tokens, step) => {
      const differing = tokens.filter((t, i) => t !== fixture.tokens[step][i]).length;
      assert.equal(differing, 0, `step ${step}: ${differing} of ${tokens.length} tokens differ from Python's`);
    });
    // The decoded image: onnxruntime-web's kernels are not native onnxruntime's, so allow rounding.
    const [height, width] = fixture.image_shape;
    assert.deepEqual([result.height, result.width], [height, width]);
    const python = fs.readFileSync(path.join(process.env.MEISSONIC_WEB_FIXTURES || "fixtures", `generation-${name}.bin`)).subarray(fixture.logits_bytes);
    let maxDiff = 0;
    for (let i = 0; i < python.length; i++) maxDiff = Math.max(maxDiff, Math.abs(python[i] - result.pixels[i]));
    const mean = result.stepMs.reduce((a, b) => a + b, 0) / result.stepMs.length;
    console.log(`# ${name}: ${result.steps.length} steps x ${result.steps[0].length} tokens identical; ` +
      `image max |pixel diff| ${maxDiff}; ${mean.toFixed(1)} ms/step (1 thread)`);
    assert.ok(maxDiff <= 2, `decoded image differs from Python's by up to ${maxDiff} levels`);
  });
}

for (const mode of ["img2img", "inpaint"]) {
  test(`demo fp32 bundle, editing (${mode}): the page's tokens equal the Python runtime's at every step run`, { timeout: TIMEOUT }, async () => {
    const fixture = readJson(`edit-${mode}.json`);
    const rgba = fs.readFileSync(path.join(process.env.MEISSONIC_WEB_FIXTURES || "fixtures", `edit-${mode}.bin`));
    const page = await harness(1);
    const result = await page.evaluate((args) => window.runEdit(args), {
      bundle: "/bundles/demo-fp32/",
      prompt: fixture.prompt,
      options: fixture.options,
      rgbaBase64: rgba.toString("base64"),
      width: fixture.width,
      height: fixture.height,
      repaint: fixture.repaint,
    });
    await page.close();
    const encoderDiffering = result.encoded.filter((t, i) => t !== fixture.encoded[i]).length;
    assert.equal(encoderDiffering, 0, `the VQ encoder's tokens differ from Python's at ${encoderDiffering} positions`);
    assert.equal(result.steps.length, fixture.tokens.length);
    result.steps.forEach((tokens, step) => {
      const differing = tokens.filter((t, i) => t !== fixture.tokens[step][i]).length;
      assert.equal(differing, 0, `step ${step} run: ${differing} of ${tokens.length} tokens differ from Python's`);
    });
    console.log(`# edit ${mode}: encoder tokens identical; ${result.steps.length} steps run x ${result.steps[0].length} tokens identical`);
  });
}

test("bundles that are tampered with, incomplete or escaping are refused with a message naming the file", { timeout: TIMEOUT }, async () => {
  const page = await harness(1);
  const errors = {};
  for (const name of ["tampered", "missing", "escaping"]) errors[name] = await page.evaluate((b) => window.openError(b), `/bundles/${name}/`);
  await page.close();
  assert.match(errors.tampered ?? "", /checksum mismatch for vq_decoder\.onnx/);
  assert.match(errors.missing ?? "", /bundle file missing: transformer_guided\.onnx/);
  assert.match(errors.escaping ?? "", /'\.\.\/tiny\/text_encoder\.onnx' points outside the bundle/);
});

test("the demo page generates with the demo model's int8 bundle (or fp32 when there is no int8 one)", { timeout: TIMEOUT }, async () => {
  const steps = Number(process.env.MEISSONIC_WEB_DEMO_STEPS || 16);
  const page = await browser.newPage({ viewport: { width: 960, height: 760 } });
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  const bundle = fs.existsSync(path.join(BUNDLES, "demo-int8")) ? "demo-int8" : "demo-fp32"; // ci.sh: MEISSONIC_WEB_INT8=0
  await page.goto(`${origin}/demo/?bundle=${bundle}&threads=2`);
  await page.waitForSelector("#status[data-state=ready]", { timeout: 60_000 });
  await page.fill("#prompt", "a red triangle at the top left on a white background");
  await page.fill("#steps", String(steps));
  await page.fill("#seed", "0");
  await page.click("#generate");
  await page.waitForSelector("#status[data-state=done], #status[data-state=error]", { timeout: TIMEOUT });
  const status = await page.textContent("#status");
  assert.match(status, /^done/, status);
  const summary = await page.evaluate(() => {
    const { result } = window.demo;
    let [min, max] = [255, 0];
    result.image.data.forEach((v, i) => {
      if (i % 4 !== 3) [min, max] = [Math.min(min, v), Math.max(max, v)];
    });
    return { steps: result.stepMs.length, min, max, listed: document.querySelectorAll("#steps-list li").length };
  });
  assert.equal(summary.steps, steps);
  assert.equal(summary.listed, steps);
  assert.ok(summary.max - summary.min > 100, "the image is nearly uniform");
  fs.mkdirSync(OUT, { recursive: true });
  const shot = path.join(OUT, "demo-page.png");
  await page.screenshot({ path: shot, fullPage: true });
  // Inpainting in the page: paint the left third of the image, redraw it, the rest keeps its tokens.
  const before = await page.evaluate(async () => {
    const canvas = document.getElementById("canvas");
    const { data, width, height } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    return Array.from(await window.demo.pipeline.encodeImage({ data, width, height }));
  });
  await page.selectOption("#mode", "inpaint");
  await page.fill("#prompt", "a blue circle at the top left on a white background");
  const box = await page.locator("#mask").boundingBox();
  await page.mouse.move(box.x + box.width * 0.05, box.y + box.height * 0.05);
  await page.mouse.down();
  for (const [fx, fy] of [[0.25, 0.05], [0.25, 0.45], [0.05, 0.45], [0.05, 0.25], [0.25, 0.25]]) {
    await page.mouse.move(box.x + box.width * fx, box.y + box.height * fy, { steps: 8 });
  }
  await page.mouse.up();
  await page.click("#generate");
  await page.waitForSelector("#status[data-state=done], #status[data-state=error]", { timeout: TIMEOUT });
  const editStatus = await page.textContent("#status");
  assert.match(editStatus, /^done: .*inpaint/, editStatus);
  const kept = await page.evaluate((tokensBefore) => {
    const { repaint, result } = window.demo;
    let repainted = 0;
    let changedOutside = 0;
    repaint.forEach((on, i) => {
      if (on) repainted++;
      else if (result.tokens[i] !== tokensBefore[i]) changedOutside++;
    });
    return { repainted, changedOutside };
  }, before);
  assert.ok(kept.repainted > 10, `only ${kept.repainted} cells painted`);
  assert.equal(kept.changedOutside, 0, "inpainting changed tokens outside the painted cells");
  await page.screenshot({ path: path.join(OUT, "demo-page-inpaint.png"), fullPage: true });
  console.log(`# demo page (${bundle}): ${steps} steps done; screenshot ${shot}: ${await page.textContent("#summary")}`);
  await page.close();
});
