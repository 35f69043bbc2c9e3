#!/usr/bin/env node
// bench.mjs — seconds per step and peak memory of the web runtime in headless Chromium (wasm, 1 and 2
// threads), beside the Python runtime's on the same bundle, in the same run; writes a report folder.
//
//   node scripts/bench.mjs --bundle demo-int8=DIR --bundle tiny=DIR [--steps demo-int8=64,tiny=16]
//        [--size tiny=256] [--threads 1,2] [--python PYTHON] --out ../../benchmarks/reports/web-runtime
//
// Memory: the browser's is the peak resident memory of Chromium's whole process tree (sampled from /proc
// every 50 ms; browser, GPU/utility and renderer processes) and of its largest process (the renderer running
// the page and its wasm heap), each beside the same tree with the page loaded before generating. Python's is
// ru_maxrss of its process (scripts/bench_python.py).

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { launchChromium, sampleTreeRss } from "../test/browser/chromium.mjs";
import { startServer } from "./serve.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROMPT = "a red triangle at the top left on a white background";

function parseArgs(argv) {
  const args = { bundles: {}, steps: {}, size: {}, threads: [1, 2], python: "python", out: null, seed: 0 };
  const pairs = (text, into, convert) => text.split(",").forEach((p) => { const [k, v] = p.split("="); into[k] = convert(v); });
  for (let i = 0; i < argv.length; i++) {
    const value = argv[i + 1];
    if (argv[i] === "--bundle") { const [name, dir] = value.split("="); args.bundles[name] = path.resolve(dir); i++; }
    else if (argv[i] === "--steps") { pairs(value, args.steps, Number); i++; }
    else if (argv[i] === "--size") { pairs(value, args.size, Number); i++; }
    else if (argv[i] === "--threads") { args.threads = value.split(",").map(Number); i++; }
    else if (argv[i] === "--python") { args.python = value; i++; }
    else if (argv[i] === "--out") { args.out = path.resolve(value); i++; }
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  if (!args.out || Object.keys(args.bundles).length === 0) throw new Error("give --bundle NAME=DIR (one or more) and --out DIR");
  return args;
}

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;

async function browserRun(origin, name, manifest, options, threads) {
  const browser = await launchChromium();
  try {
    const page = await browser.newPage();
    await page.goto(`${origin}/test/browser/harness.html?threads=${threads}`);
    await page.waitForFunction(() => typeof window.runGeneration === "function");
    await new Promise((r) => setTimeout(r, 500));
    const idle = sampleTreeRss(process.pid, 50).stop();
    const sampler = sampleTreeRss(process.pid, 50);
    const started = performance.now();
    const result = await page.evaluate((args) => window.runGeneration(args), { bundle: `/bundles/${name}/`, prompt: PROMPT, options });
    const totalMs = performance.now() - started;
    const peak = sampler.stop();
    const stepsS = result.stepMs.map((ms) => ms / 1000);
    return {
      runtime: "browser-wasm", threads: result.threads, crossOriginIsolated: result.crossOriginIsolated, steps: options.steps,
      load_s: result.loadMs / 1000, mean_s_per_step: mean(stepsS), median_s_per_step: median(stepsS),
      mean_model_s_per_step: mean(result.modelStepMs) / 1000,
      generate_and_load_s: totalMs / 1000,
      peak_tree_rss_bytes: peak.peakTotal, peak_largest_process_rss_bytes: peak.peakLargest,
      idle_tree_rss_bytes: idle.peakTotal, idle_largest_process_rss_bytes: idle.peakLargest,
    };
  } finally {
    await browser.close();
  }
}

function pythonRun(python, dir, options, threads) {
  const out = execFileSync(python, [path.join(here, "bench_python.py"), dir, "--threads", String(threads), "--steps", String(options.steps),
    "--height", String(options.height), "--width", String(options.width), "--seed", String(options.seed)], { encoding: "utf8" });
  return JSON.parse(out.trim().split("\n").pop());
}

const mb = (bytes) => (bytes / 2 ** 20).toFixed(0);

/** The results as a markdown table (one row per bundle, threads and runtime). */
function table(meta, rows) {
  const lines = [
    `Command (in runtimes/web): \`${meta.command}\``,
    "",
    `${meta.date}, ${meta.cpu}, ${meta.cores} cores, ${meta.chromium}, load average at the start ${meta.load}.`,
    "",
    "| bundle | size | steps | runtime | threads | s/step mean (median) | of which in the graph | load s | peak RSS MiB | idle RSS MiB |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ];
  for (const r of rows) {
    const browser = r.runtime === "browser-wasm";
    const peak = browser ? `${mb(r.peak_largest_process_rss_bytes)} renderer / ${mb(r.peak_tree_rss_bytes)} all` : mb(r.peak_rss_bytes);
    const idle = browser ? `${mb(r.idle_largest_process_rss_bytes)} / ${mb(r.idle_tree_rss_bytes)}` : mb(r.baseline_rss_bytes);
    const model = r.mean_model_s_per_step === undefined ? "-" : r.mean_model_s_per_step.toFixed(4);
    lines.push(`| ${r.bundle} | ${r.size} | ${r.steps} | ${browser ? "Chromium wasm" : "Python (onnxruntime)"} | ${r.threads} | ` +
      `${r.mean_s_per_step.toFixed(4)} (${r.median_s_per_step.toFixed(4)}) | ${model} | ${r.load_s.toFixed(2)} | ${peak} | ${idle} |`);
  }
  return lines.join("\n") + "\n";
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const load = fs.readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
  const server = await startServer({ bundles: args.bundles, port: 0 });
  const origin = `http://127.0.0.1:${server.address().port}`;
  const rows = [];
  try {
    for (const [name, dir] of Object.entries(args.bundles)) {
      const manifest = JSON.parse(fs.readFileSync(path.join(dir, "manifest.json"), "utf8"));
      const size = args.size[name] ?? manifest.defaults.height;
      const options = { steps: args.steps[name] ?? 16, seed: args.seed, height: size, width: size };
      for (const threads of args.threads) {
        const browser = await browserRun(origin, name, manifest, options, threads);
        const python = pythonRun(args.python, dir, options, threads);
        for (const row of [browser, python]) rows.push({ bundle: name, size, guidance: manifest.defaults.guidance_scale, ...row });
        console.log(`${name} ${size}px ${threads} thread(s): browser ${browser.mean_s_per_step.toFixed(3)} s/step, ` +
          `peak ${mb(browser.peak_tree_rss_bytes)} MiB tree / ${mb(browser.peak_largest_process_rss_bytes)} MiB renderer; ` +
          `python ${python.mean_s_per_step.toFixed(3)} s/step, peak ${mb(python.peak_rss_bytes)} MiB`);
      }
    }
  } finally {
    server.close();
  }
  fs.mkdirSync(args.out, { recursive: true });
  const cpu = fs.readFileSync("/proc/cpuinfo", "utf8").match(/model name\s*:\s*(.*)/)?.[1] ?? "unknown CPU";
  const chromium = execFileSync(process.env.CHROMIUM || "/usr/bin/chromium", ["--version"], { encoding: "utf8" }).trim();
  const meta = { load, date: new Date().toISOString(), cpu, cores: (await import("node:os")).cpus().length, chromium, command: `node scripts/bench.mjs ${process.argv.slice(2).join(" ")}` };
  fs.writeFileSync(path.join(args.out, "results.json"), JSON.stringify({ meta, rows }, null, 2) + "\n");
  fs.writeFileSync(path.join(args.out, "table.md"), table(meta, rows));
  console.log(`wrote ${path.join(args.out, "results.json")}`);
}

main().catch((e) => {
  console.error(`error: ${e.message}`);
  process.exit(1);
});
