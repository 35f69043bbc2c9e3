// fs-source.mjs — a bundle source reading a folder with node:fs (the browser uses httpSource).

import fs from "node:fs/promises";
import path from "node:path";

export function fsSource(dir) {
  return {
    describe: dir,
    async read(relative) {
      try {
        return new Uint8Array(await fs.readFile(path.join(dir, relative)));
      } catch (e) {
        if (e.code === "ENOENT") return null;
        throw e;
      }
    },
  };
}
