// chromium.mjs — launching the system Chromium (Debian's `chromium`) headless with playwright-core, which
// downloads no browser; and sampling the resident memory of the browser's whole process tree from /proc.

import fs from "node:fs";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Without the background-networking flags Chromium keeps trying to reach its services (no network here).
export const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--enable-features=SharedArrayBuffer",
];

/** A fresh browser (playwright gives it a new temporary --user-data-dir). */
export async function launchChromium() {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium (or set CHROMIUM=/path/to/chromium)`);
  }
  return chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true });
}

function children() {
  const byParent = new Map();
  for (const pid of fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (!byParent.has(ppid)) byParent.set(ppid, []);
      byParent.get(ppid).push(Number(pid));
    } catch {
      // the process ended while we looked
    }
  }
  return byParent;
}

function rssBytes(pid) {
  try {
    const line = fs.readFileSync(`/proc/${pid}/status`, "utf8").split("\n").find((l) => l.startsWith("VmRSS:"));
    return line ? Number(line.split(/\s+/)[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/**
 * Sample every `intervalMs` the RSS of all processes under `rootPid` (the driver's own process: Chromium
 * runs as its child). stop() -> { peakTotal, peakLargest } in bytes: the whole tree's peak, and the peak
 * of its largest single process (the renderer that runs the page and its wasm heap).
 */
export function sampleTreeRss(rootPid, intervalMs = 100) {
  let peakTotal = 0;
  let peakLargest = 0;
  const sampleOnce = () => {
    const byParent = children();
    const stack = [...(byParent.get(rootPid) ?? [])];
    let total = 0;
    while (stack.length) {
      const pid = stack.pop();
      const rss = rssBytes(pid);
      total += rss;
      peakLargest = Math.max(peakLargest, rss);
      stack.push(...(byParent.get(pid) ?? []));
    }
    peakTotal = Math.max(peakTotal, total);
  };
  sampleOnce();
  const timer = setInterval(sampleOnce, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      sampleOnce();
      return { peakTotal, peakLargest };
    },
  };
}
