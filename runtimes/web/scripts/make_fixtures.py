"""Write the parity fixtures the web runtime's tests compare against, from the Python side.

    python runtimes/web/scripts/make_fixtures.py OUT_DIR --tiny TINY_BUNDLE --demo DEMO_BUNDLE [--demo-steps 16]

OUT_DIR/
  rng.json                 np.random.default_rng(seed).random(n) for many seeds and lengths
  schedule.json            mask_len for every step of many step counts and sequence lengths; linspace tables
  tokenizer-tiny.json      ClipTokenizer ids of a few hundred prompts, for each bundle's tokenizer
  tokenizer-demo.json
  sampler-synthetic.json   sampler.sample on seeded random logits (+ .bin: the logits, float32)
  generation-tiny.json     OnnxPipeline.generate: per-step tokens, per-step logits (+ .bin) and the image
  generation-demo.json     (demo: the model's sampling settings; demo-guided: guidance 4, Gumbel 2 -> 0)
  generation-demo-guided.json
  edit-img2img.json        OnnxPipeline.generate with an image (img2img, strength 0.6) and with a mask (inpainting):
  edit-inpaint.json        the image (+ .bin, RGBA), the repaint grid, the VQ encoder's tokens, every step's tokens

Binary files are little-endian float32 (logits) or uint8 (images); the JSON says where each array starts.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from meissonic_edge.runtime import onnx_pipeline as runtime_module
from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline
from meissonic_edge.runtime.sampler import EditStart, GenerationOptions, mask_ratio, sample
from meissonic_edge.runtime.tokenizer import ClipTokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["top left", "top right", "center", "bottom left", "bottom right"]
ODD_PROMPTS = [
    "",
    " ",
    "A RED Circle",
    "a  red\tcircle\n on   white",
    "don't, won't; it's the cat's toy — I'll see",
    "numbers 0123456789 and 3.14159 and 1,000,000",
    "émigré café naïve façade",
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀 and symbols ©®™ ±×÷",
    "mixed-case CamelCaseWords snake_case kebab-case",
    "<|startoftext|> a red circle <|endoftext|>",
    "a<|endoftext|>b",
    "punctuation!!! ??? ... ,,, ;;; ::: ((())) [[]] {{}}",
    "tab\tseparated\twords",
    "combining e\u0301 accents and NFC é",
    "apostrophes 's 't 're 've 'm 'll 'd",
    "'S 'T 'RE upper contractions",
    "trailing spaces     ",
    "a " * 100,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "the quick brown fox jumps over the lazy dog " * 5,
    "zero\u200bwidth space and non\u00a0breaking",
    "math ∑∫√∞ greek αβγδ cyrillic абвгд",
]


def prompts() -> list[str]:
    out = list(ODD_PROMPTS)
    for colour in COLOURS:
        for shape in SHAPES:
            for place in PLACES:
                out.append(f"a {colour} {shape} at the {place}")
            out.append(f"a {colour} {shape} at the top left on a black background")
            out.append(f"A {colour.upper()} {shape.title()}, drawn neatly!")
    rng = np.random.default_rng(7)
    words = COLOURS + SHAPES + ["on", "a", "the", "white", "gray", "background", "big", "tiny", "dog", "42"]
    for _ in range(300 - len(out)):
        out.append(" ".join(rng.choice(words, size=int(rng.integers(1, 30)))))
    return out


def write_tokenizer(out: Path, name: str, bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    tokenizer = ClipTokenizer.from_dir(bundle / manifest["tokenizer"]["dir"])
    texts = prompts()
    ids = tokenizer.encode(texts)
    data = {"prompts": texts, "ids": ids.tolist()}
    (out / f"tokenizer-{name}.json").write_text(json.dumps(data, ensure_ascii=False))


def write_rng(out: Path) -> None:
    cases = []
    for seed in [
        0,
        1,
        2,
        3,
        7,
        42,
        1234,
        99999,
        2**31 - 1,
        2**32 - 1,
        2**32,
        2**40 + 3,
        2**63,
        2**64 - 1,
        2**64,
        2**100 + 17,
    ]:
        for n in (1, 5, 1000):
            cases.append({"seed": str(seed), "n": n, "values": np.random.default_rng(seed).random(n).tolist()})
    for seed in range(100):
        cases.append({"seed": str(seed), "n": 20, "values": np.random.default_rng(seed).random(20).tolist()})
    (out / "rng.json").write_text(json.dumps(cases))


def write_schedule(out: Path) -> None:
    mask_lens = []
    for schedule in ("cosine", "linear"):
        for steps in [*range(1, 65), 100, 128, 200, 256]:
            for seq_len in (16, 64, 256, 1024, 4096):
                lens = [math.floor(seq_len * mask_ratio(i, steps, schedule)) for i in range(steps)]
                mask_lens.append({"schedule": schedule, "steps": steps, "seq_len": seq_len, "mask_len": lens})
    spaces = []
    for start, stop in ((2.0, 0.0), (0.0, 0.0), (0.5, 0.01), (1.0, 0.3), (3.7, 1.1)):
        for num in (1, 2, 3, 16, 64, 256):
            spaces.append({"start": start, "stop": stop, "num": num, "values": np.linspace(start, stop, num).tolist()})
    (out / "schedule.json").write_text(json.dumps({"mask_len": mask_lens, "linspace": spaces}))


class RandomDenoiser:
    """Seeded random logits; records what it returned."""

    def __init__(self, vocab: int, seed: int, scale: float):
        self.rng = np.random.default_rng(seed)
        self.vocab, self.scale = vocab, scale
        self.calls: list[np.ndarray] = []

    def logits(self, tokens: np.ndarray, timestep: int) -> np.ndarray:
        b, h, w = tokens.shape
        logits = (self.rng.standard_normal((b, h * w, self.vocab)) * self.scale).astype(np.float32)
        self.calls.append(logits.copy())
        return logits


def write_synthetic_sampler(out: Path) -> None:
    cases, blobs, offset = [], [], 0
    specs = [
        dict(
            batch=1,
            grid=(8, 8),
            vocab=64,
            scale=3.0,
            steps=12,
            guidance_scale=1.0,
            temperature=(2.0, 0.0),
            token_temperature=1.0,
            seed=0,
            schedule="cosine",
        ),
        dict(
            batch=1,
            grid=(8, 8),
            vocab=64,
            scale=3.0,
            steps=12,
            guidance_scale=1.0,
            temperature=(0.0, 0.0),
            token_temperature=0.5,
            seed=1,
            schedule="cosine",
        ),
        dict(
            batch=2,
            grid=(4, 6),
            vocab=40,
            scale=2.0,
            steps=7,
            guidance_scale=9.0,
            temperature=(2.0, 0.0),
            token_temperature=1.0,
            seed=5,
            schedule="cosine",
        ),
        dict(
            batch=1,
            grid=(4, 4),
            vocab=100,
            scale=8.0,
            steps=5,
            guidance_scale=3.0,
            temperature=(1.0, 0.3),
            token_temperature=0.7,
            seed=2**40,
            schedule="linear",
        ),
        dict(
            batch=1,
            grid=(2, 2),
            vocab=16,
            scale=1.0,
            steps=1,
            guidance_scale=1.0,
            temperature=(2.0, 0.0),
            token_temperature=1.0,
            seed=3,
            schedule="cosine",
        ),
        dict(
            batch=1,
            grid=(16, 16),
            vocab=512,
            scale=6.0,
            steps=32,
            guidance_scale=1.0,
            temperature=(0.0, 0.0),
            token_temperature=0.5,
            seed=0,
            schedule="cosine",
        ),
        # editing: img2img (random masking before the first step run), inpainting (repaint mask, linear schedule)
        dict(
            batch=1,
            grid=(8, 8),
            vocab=64,
            scale=3.0,
            steps=12,
            guidance_scale=1.0,
            temperature=(2.0, 0.0),
            token_temperature=1.0,
            seed=11,
            schedule="cosine",
            edit="img2img",
            strength=0.6,
        ),
        dict(
            batch=2,
            grid=(4, 6),
            vocab=40,
            scale=2.0,
            steps=10,
            guidance_scale=5.0,
            temperature=(0.0, 0.0),
            token_temperature=0.5,
            seed=12,
            schedule="cosine",
            edit="img2img",
            strength=1.0,
        ),
        dict(
            batch=1,
            grid=(8, 8),
            vocab=64,
            scale=3.0,
            steps=16,
            guidance_scale=1.0,
            temperature=(2.0, 0.0),
            token_temperature=1.0,
            seed=13,
            schedule="linear",
            edit="inpaint",
            strength=1.0,
        ),
        dict(
            batch=1,
            grid=(8, 8),
            vocab=64,
            scale=3.0,
            steps=16,
            guidance_scale=1.0,
            temperature=(1.0, 0.0),
            token_temperature=1.0,
            seed=14,
            schedule="linear",
            edit="inpaint",
            strength=0.5,
        ),
    ]
    for spec in specs:
        start, start_json = None, None
        if spec.get("edit"):
            edit_rng = np.random.default_rng(spec["seed"] + 200)
            seq_len = spec["grid"][0] * spec["grid"][1]
            image_tokens = edit_rng.integers(0, spec["vocab"], seq_len)
            repaint = edit_rng.random(seq_len) < 0.4 if spec["edit"] == "inpaint" else None
            start = EditStart(
                image_tokens.reshape(spec["grid"]), None if repaint is None else repaint.reshape(spec["grid"])
            )
            start_json = {"tokens": image_tokens.tolist(), "repaint": None if repaint is None else repaint.tolist()}
        options = GenerationOptions(
            strength=spec.get("strength", 1.0),
            steps=spec["steps"],
            guidance_scale=spec["guidance_scale"],
            seed=spec["seed"],
            temperature=spec["temperature"],
            token_temperature=spec["token_temperature"],
            height=16 * spec["grid"][0],
            width=16 * spec["grid"][1],
        )
        denoiser = RandomDenoiser(spec["vocab"], seed=spec["seed"] + 100, scale=spec["scale"])
        steps = []
        sample(
            denoiser,
            spec["batch"],
            spec["grid"],
            spec["vocab"],
            options,
            schedule=spec["schedule"],
            callback=lambda step, tokens, steps=steps: steps.append(tokens.reshape(-1).tolist()),
            start=start,
        )
        logit_offsets = []
        for logits in denoiser.calls:
            blobs.append(logits.tobytes())
            logit_offsets.append(offset)
            offset += logits.nbytes
        cases.append(
            {
                **spec,
                "seed": str(spec["seed"]),
                "mask_token_id": spec["vocab"],
                "logits_offsets": logit_offsets,
                "logits_length": int(denoiser.calls[0].size),
                "tokens": steps,
                "start": start_json,
            }
        )
    (out / "sampler-synthetic.bin").write_bytes(b"".join(blobs))
    (out / "sampler-synthetic.json").write_text(json.dumps(cases))


def write_generation(out: Path, name: str, bundle: Path, prompt: str, **overrides) -> None:
    """Run the Python runtime; record the logits the sampler saw and the tokens after every step."""
    pipe = OnnxPipeline(bundle)
    recorded: list[np.ndarray] = []
    original_sample = runtime_module.sample

    def recording_sample(denoiser, *args, **kwargs):
        class Recorder:
            applies_guidance = getattr(denoiser, "applies_guidance", False)

            def logits(self, tokens, timestep):
                logits = denoiser.logits(tokens, timestep)
                recorded.append(logits.copy())
                return logits

        return original_sample(Recorder(), *args, **kwargs)

    steps: list[list[int]] = []
    runtime_module.sample = recording_sample
    try:
        generation = pipe.generate(
            prompt, callback=lambda step, tokens: steps.append(tokens.reshape(-1).tolist()), **overrides
        )
    finally:
        runtime_module.sample = original_sample
    options = pipe.default_options()
    image = np.asarray(generation.images[0], dtype=np.uint8)  # (H, W, 3)
    blob = b"".join(r.astype(np.float32).tobytes() for r in recorded)
    (out / f"generation-{name}.bin").write_bytes(blob + image.tobytes())
    merged = {**options.__dict__, **overrides}
    data = {
        "prompt": prompt,
        "options": {
            "steps": merged["steps"],
            "seed": merged["seed"],
            "height": merged["height"],
            "width": merged["width"],
            "guidanceScale": merged["guidance_scale"],
            "negativePrompt": merged["negative_prompt"],
            "temperature": list(merged["temperature"]),
            "tokenTemperature": merged["token_temperature"],
        },
        "mask_token_id": pipe.model["mask_token_id"],
        "logits_shape": list(recorded[0].shape),
        "logits_bytes": len(blob),
        "image_shape": list(image.shape),
        "tokens": steps,
    }
    (out / f"generation-{name}.json").write_text(json.dumps(data))


def write_edit_generation(out: Path, name: str, bundle: Path, prompt: str, mask: bool, **overrides) -> None:
    """An edit with the Python runtime: a generated image, then img2img (mask=False) or inpainting of its
    left half (mask=True). Records the image (RGBA), the repaint grid, the encoder's tokens and every step's."""
    from PIL import Image

    from meissonic_edge.runtime.editing import plan_edit

    pipe = OnnxPipeline(bundle)
    image = pipe("a green square at the center on a white background", steps=16, seed=5)
    mask_image = None
    if mask:
        mask_image = Image.new("L", image.size, 0)
        mask_image.paste(255, (0, 0, image.size[0] // 2, image.size[1]))
    edit = plan_edit(image, mask_image, None, pipe.model["token_stride"])
    encoded = pipe.encode(edit.pixels)[0]
    steps: list[list[int]] = []
    pipe.generate(
        prompt,
        image=image,
        mask=mask_image,
        callback=lambda step, tokens: steps.append(tokens.reshape(-1).tolist()),
        **overrides,
    )
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
    (out / f"edit-{name}.bin").write_bytes(rgba.tobytes())
    options = {**pipe.default_options().__dict__, **overrides}
    data = {
        "prompt": prompt,
        "options": {"steps": options["steps"], "seed": options["seed"], "strength": options["strength"]},
        "width": image.size[0],
        "height": image.size[1],
        "repaint": None if edit.repaint is None else edit.repaint.reshape(-1).astype(int).tolist(),
        "encoded": encoded.reshape(-1).tolist(),
        "tokens": steps,
    }
    (out / f"edit-{name}.json").write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", type=Path, required=True, help="fp32 bundle of a random tiny model")
    parser.add_argument("--demo", type=Path, help="the demo model's bundle (int8 or fp32)")
    parser.add_argument("--demo-steps", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_rng(args.out)
    write_schedule(args.out)
    write_synthetic_sampler(args.out)
    write_tokenizer(args.out, "tiny", args.tiny)
    write_generation(
        args.out, "tiny", args.tiny, "a red circle at the top left", steps=12, seed=3, height=128, width=128
    )
    if args.demo:
        write_tokenizer(args.out, "demo", args.demo)
        write_generation(
            args.out,
            "demo",
            args.demo,
            "a yellow triangle at the center on a black background",
            steps=args.demo_steps,
            seed=0,
        )
        # Guidance (the guided graph), Gumbel noise and upstream's token temperature on the demo model too.
        write_generation(
            args.out,
            "demo-guided",
            args.demo,
            "a blue circle at the bottom right on a gray background",
            steps=24,
            seed=7,
            guidance_scale=4.0,
            temperature=(2.0, 0.0),
            token_temperature=1.0,
        )
        write_edit_generation(
            args.out,
            "img2img",
            args.demo,
            "a red circle at the center on a white background",
            False,
            steps=24,
            strength=0.6,
            seed=1,
        )
        write_edit_generation(
            args.out,
            "inpaint",
            args.demo,
            "a blue triangle at the top left on a white background",
            True,
            steps=24,
            seed=2,
        )
    print(f"wrote fixtures to {args.out}")


if __name__ == "__main__":
    main()
