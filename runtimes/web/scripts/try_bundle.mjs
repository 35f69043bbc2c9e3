#!/usr/bin/env node
// try_bundle.mjs — does a bundle generate in headless Chromium (wasm)? For the big ones: prints how far it
// got (loading each graph, the steps, the VQ decode), the error if any, the time, and the peak resident
// memory of the renderer process and of Chromium's whole process tree.
//
//   node scripts/try_bundle.mjs BUNDLE_DIR [--size 512] [--steps 2] [--threads 2] [--timeout 900]

import path from "node:path";
import { launchChromium, sampleTreeRss } from "../test/browser/chromium.mjs";
import { startServer } from "./serve.mjs";

const argv = process.argv.slice(2);
const option = (name, fallback) => {
  const at = argv.indexOf(`--${name}`);
  return at >= 0 ? Number(argv[at + 1]) : fallback;
};
const dir = path.resolve(argv[0] ?? "");
const size = option("size", 512);
const steps = option("steps", 2);
const threads = option("threads", 2);
const timeoutS = option("timeout", 900);

const server = await startServer({ bundles: { probe: dir }, port: 0 });
const browser = await launchChromium();
const mib = (b) => (b / 2 ** 20).toFixed(0);
const sampler = sampleTreeRss(process.pid, 100);
const started = performance.now();
let outcome;
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.log(`[page ${m.type()}] ${m.text().slice(0, 300)}`));
  page.on("crash", () => console.log("[page crashed]"));
  await page.goto(`http://127.0.0.1:${server.address().port}/test/browser/harness.html?threads=${threads}`);
  await page.waitForFunction(() => typeof window.runGeneration === "function");
  await page.exposeFunction("reportProgress", (m) => console.log(`[${((performance.now() - started) / 1000).toFixed(1)} s] ${m}`));
  page.setDefaultTimeout(timeoutS * 1000);
  outcome = await page.evaluate(async ({ size, steps }) => {
    const { WebPipeline, httpSource } = await import("/src/index.js");
    const ort = await import("onnxruntime-web");
    try {
      const pipeline = await WebPipeline.load(httpSource("/bundles/probe/"), { ort, onProgress: window.reportProgress });
      const options = { steps, height: size, width: size };
      await pipeline.prepare(options, window.reportProgress);
      window.reportProgress("graphs loaded");
      const result = await pipeline.generate("a photo of a red fox in the snow", options, {
        onStep: ({ step, ms }) => window.reportProgress(`step ${step + 1}: ${(ms / 1000).toFixed(2)} s`),
      });
      return { ok: true, stepMs: result.stepMs, width: result.image.width };
    } catch (e) {
      return { ok: false, error: String(e.message ?? e).slice(0, 500) };
    }
  }, { size, steps });
} catch (e) {
  outcome = { ok: false, error: `page: ${e.message.split("\n")[0]}` };
} finally {
  const peak = sampler.stop();
  console.log(JSON.stringify({ bundle: dir, size, steps, threads, seconds: (performance.now() - started) / 1000, ...outcome,
    peak_renderer_mib: mib(peak.peakLargest), peak_tree_mib: mib(peak.peakTotal) }));
  await browser.close();
  server.close();
}
