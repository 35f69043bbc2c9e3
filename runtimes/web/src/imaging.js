// imaging.js — decoded images (float32, channels-first, [0, 1]) to RGBA pixels for an ImageData/canvas,
// rounded exactly as the Python runtime does: clip to [0, 1], x 255 in float32, round half to even.

const f32 = Math.fround;

/** numpy's round(): half to even. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * image: Float32Array (3 x height x width) of one image -> { width, height, data: Uint8ClampedArray RGBA },
 * which `new ImageData(data, width, height)` takes as it is.
 */
export function toRgba(image, height, width, offset = 0) {
  const plane = height * width;
  const data = new Uint8ClampedArray(plane * 4);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const v = image[offset + c * plane + i];
      const clipped = v < 0 ? 0 : v > 1 ? 1 : v; // NaN stays NaN and becomes 0 below
      data[i * 4 + c] = roundHalfEven(f32(clipped * 255));
    }
    data[i * 4 + 3] = 255;
  }
  return { width, height, data };
}
