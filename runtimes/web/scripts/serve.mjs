#!/usr/bin/env node
// serve.mjs — a tiny static server for the demo page and the browser tests; no dependencies, loopback only.
//
//   node scripts/serve.mjs BUNDLE_DIR [MORE_BUNDLE_DIRS...] [--port 8080] [--host 127.0.0.1]
//
// Serves this package (demo/, src/, the onnxruntime-web and tokenizer files in node_modules/) at /, and
// each bundle folder at /bundles/NAME/ (NAME: the folder's name); /bundles/index.json lists them. It sends
// the cross-origin isolation headers (COOP/COEP) that wasm threads (SharedArrayBuffer) need, and refuses
// any path that leaves a served folder.

import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json; charset=utf-8",
  ".wasm": "application/wasm",
  ".png": "image/png",
  ".txt": "text/plain; charset=utf-8",
};

/** The file `urlPath` names below `root`, or null when it would leave `root`. */
function resolveInside(root, urlPath) {
  const target = path.resolve(root, "." + path.posix.normalize("/" + urlPath));
  return target === root || target.startsWith(root + path.sep) ? target : null;
}

/** Start serving; resolves to the http.Server (listening). bundles: { name: folder }. */
export function startServer({ bundles = {}, port = 8080, host = "127.0.0.1", root = PACKAGE_ROOT } = {}) {
  const mounts = Object.fromEntries(Object.entries(bundles).map(([name, dir]) => [name, path.resolve(dir)]));
  const server = http.createServer((request, response) => {
    const headers = {
      "Cross-Origin-Opener-Policy": "same-origin",
      "Cross-Origin-Embedder-Policy": "require-corp",
      "Cross-Origin-Resource-Policy": "same-origin",
      "Cache-Control": "no-store",
    };
    let urlPath;
    try {
      urlPath = decodeURIComponent(new URL(request.url, "http://localhost").pathname);
    } catch {
      response.writeHead(400, headers).end("bad request\n");
      return;
    }
    if (urlPath === "/") {
      response.writeHead(302, { ...headers, Location: "/demo/" }).end();
      return;
    }
    if (urlPath === "/bundles/index.json") {
      response.writeHead(200, { ...headers, "Content-Type": TYPES[".json"] }).end(JSON.stringify(Object.keys(mounts)));
      return;
    }
    let file = null;
    const bundleMatch = urlPath.match(/^\/bundles\/([^/]+)(\/.*)?$/);
    if (bundleMatch && mounts[bundleMatch[1]]) file = resolveInside(mounts[bundleMatch[1]], bundleMatch[2] ?? "/");
    else if (!bundleMatch) file = resolveInside(root, urlPath);
    if (file && fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, "index.html");
    if (!file || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      response.writeHead(404, { ...headers, "Content-Type": TYPES[".txt"] }).end(`not found: ${urlPath}\n`);
      return;
    }
    const type = TYPES[path.extname(file)] ?? "application/octet-stream";
    response.writeHead(200, { ...headers, "Content-Type": type, "Content-Length": fs.statSync(file).size });
    fs.createReadStream(file).pipe(response);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve(server));
  });
}

function parseArgs(argv) {
  const args = { bundles: {}, port: 8080, host: "127.0.0.1" };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--port") args.port = Number(argv[++i]);
    else if (argv[i] === "--host") args.host = argv[++i];
    else if (argv[i] === "--help" || argv[i] === "-h") {
      console.log("usage: node scripts/serve.mjs BUNDLE_DIR [MORE_BUNDLE_DIRS...] [--port 8080] [--host 127.0.0.1]");
      process.exit(0);
    } else {
      const dir = path.resolve(argv[i]);
      if (!fs.existsSync(path.join(dir, "manifest.json"))) {
        console.error(`error: ${argv[i]} is not a bundle (no manifest.json); export one with meissonic-edge export`);
        process.exit(2);
      }
      args.bundles[path.basename(dir)] = dir;
    }
  }
  return args;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = parseArgs(process.argv.slice(2));
  if (Object.keys(args.bundles).length === 0) {
    console.error("error: give at least one bundle folder: node scripts/serve.mjs BUNDLE_DIR");
    process.exit(2);
  }
  startServer(args).then(
    (server) => {
      const { port } = server.address();
      console.log(`serving ${Object.keys(args.bundles).join(", ")}: open http://${args.host}:${port}/demo/`);
    },
    (e) => {
      console.error(`error: cannot listen on ${args.host}:${args.port}: ${e.message}`);
      process.exit(1);
    },
  );
}
