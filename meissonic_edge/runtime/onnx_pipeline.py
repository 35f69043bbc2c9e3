"""The runtime: generate images from a bundle with numpy and onnxruntime only (no torch).

    from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline
    pipe = OnnxPipeline("bundle/")                      # checks the manifest and every checksum
    image = pipe("a red circle", steps=16, seed=0, height=512, width=512)

The sampling loop is the shared one in `sampler.py`, so a seed gives the same tokens as the PyTorch
reference. With `low_memory=True` only one graph is loaded at a time: the text encoder, then the
transformer, then the VQ decoder, each released after use (and its memory handed back to the system, see
`heap.py`); the VQ decoder is then the tiled one (`tiled_decoder.py`) when the bundle has it.

Editing (img2img, inpainting, outpainting: `editing.py`) encodes the image with the bundle's `vq_encoder`
first; in low-memory mode that graph too is loaded only while it encodes, and it is the tiled encoder
(`tiled_encoder.py`) when the bundle has it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from meissonic_edge.runtime.bundle import BundleError, read_manifest, verify_files
from meissonic_edge.runtime.config import VQ_STRIDE
from meissonic_edge.runtime.editing import edit_options
from meissonic_edge.runtime.heap import release_freed_memory, trim_heap
from meissonic_edge.runtime.imaging import to_pil
from meissonic_edge.runtime.sampler import EditStart, Generation, GenerationOptions, sample
from meissonic_edge.runtime.tiled_decoder import TILED_GRAPH, TiledDecoder
from meissonic_edge.runtime.tiled_encoder import TILED_ENCODER_GRAPH, TiledEncoder
from meissonic_edge.runtime.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

PIPELINE_GRAPHS = ("text_encoder", "transformer", "vq_decoder")
GUIDED_GRAPH = "transformer_guided"  # optional: guidance inside the graph (see guided.py)


class OnnxDenoiser:
    """The transformer graph with the text conditioning of one generation bound to it."""

    def __init__(self, session: ort.InferenceSession, encoder_hidden_states, text_embeds, micro_conds):
        self.session = session
        self.feed = {
            "encoder_hidden_states": encoder_hidden_states,
            "text_embeds": text_embeds,
            "micro_conds": micro_conds,
        }

    def logits(self, tokens: np.ndarray, timestep: int) -> np.ndarray:
        timesteps = np.full((tokens.shape[0],), timestep, dtype=np.float32)
        return self.session.run(["logits"], {**self.feed, "tokens": tokens, "timestep": timesteps})[0]


class GuidedOnnxDenoiser(OnnxDenoiser):
    """The guided transformer graph: takes [uncond; cond], returns guided logits (B, h*w, K), one copy."""

    applies_guidance = True

    def __init__(self, session, encoder_hidden_states, text_embeds, micro_conds, guidance_scale: float):
        super().__init__(session, encoder_hidden_states, text_embeds, micro_conds)
        self.feed["guidance_scale"] = np.array([guidance_scale], dtype=np.float32)


def check_session_io(session: ort.InferenceSession, graph: dict, name: str) -> None:
    """The graph's inputs and outputs must be the ones the manifest promises (names, types, ranks)."""
    for kind, actual in (("input", session.get_inputs()), ("output", session.get_outputs())):
        expected = {spec["name"]: spec for spec in graph.get(f"{kind}s", [])}
        found = {arg.name: arg for arg in actual}
        for missing in sorted(set(expected) - set(found)):
            raise BundleError(f"{name} graph has no {kind} {missing!r} that the manifest names")
        for extra in sorted(set(found) - set(expected)):
            raise BundleError(f"{name} graph has an {kind} {extra!r} that the manifest does not name")
        for arg_name, arg in found.items():
            spec = expected[arg_name]
            if arg.type != spec["dtype"] or len(arg.shape) != len(spec["shape"]):
                raise BundleError(
                    f"{name} graph {kind} {arg_name!r} is {arg.type} of rank {len(arg.shape)}, "
                    f"the manifest says {spec['dtype']} of rank {len(spec['shape'])}"
                )


def options_from_manifest(manifest: dict) -> GenerationOptions:
    """The generation defaults recorded in a bundle's manifest."""
    d = manifest["defaults"]
    micro = d.get("micro_conditions", {})
    try:
        return GenerationOptions(
            steps=d["steps"],
            guidance_scale=d["guidance_scale"],
            negative_prompt=d["negative_prompt"],
            height=d["height"],
            width=d["width"],
            temperature=tuple(d["temperature"]),
            token_temperature=d.get("token_temperature", 1.0),  # bundles before it was an option drew at 1
            aesthetic_score=micro.get("aesthetic_score", 6.0),
            crop=tuple(micro.get("crop", (0, 0))),
        )
    except (KeyError, TypeError) as e:
        raise BundleError(f"manifest defaults are incomplete: {e}") from None


def session_options(name: str, threads: int | None = None, low_memory: bool = False) -> ort.SessionOptions:
    """onnxruntime's settings for the graph `name`: the runtime's memory policy for low-memory mode."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not low_memory:
        return options
    if name in ("transformer", GUIDED_GRAPH):
        # The transformer runs the same shapes every step: it keeps its arena (without one it peaked at
        # 6.1 GB instead of 1.5 GB and its first step took 20 s instead of 8 s, meissonic int4 at 1024x1024)
        # but plans no memory pattern, a block sized for every intermediate allocated up front: 1086 MiB
        # peak instead of 1199 MiB at the same speed (block-128 int4 bundle, guided, 1024x1024).
        options.enable_mem_pattern = False
    elif name not in (TILED_GRAPH, TILED_ENCODER_GRAPH):
        # Graphs that run once (text encoder, VQ graphs): no arena and no memory pattern, so tensors live
        # only as long as they are needed. The untiled VQ decoder at 1024x1024 peaks at 4.6 GB instead of
        # 10.8 GB. The tiled decoder's and encoder's layer graphs run strip after strip and keep their arena.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    return options


class OnnxPipeline:
    """Prompt -> image from an exported bundle."""

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        low_memory: bool = False,
        verify_checksums: bool = True,
    ):
        self.root = Path(bundle_dir)
        self.manifest = read_manifest(self.root)
        if self.manifest.get("backend", "onnx") != "onnx":
            raise BundleError(
                f"{self.root} is a {self.manifest['backend']} bundle; this runtime runs ONNX bundles "
                "(export one with --format onnx)"
            )
        verify_files(self.root, self.manifest, checksums=verify_checksums)
        self.model = self.manifest["model"]
        self.tokenizer = ClipTokenizer.from_dir(self.root / self.manifest["tokenizer"]["dir"])
        self.providers = providers or ["CPUExecutionProvider"]
        unknown = sorted(set(self.providers) - set(ort.get_available_providers()))
        if unknown:
            raise BundleError(
                f"onnxruntime provider(s) {', '.join(unknown)} not available here "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        self.threads = threads
        self.low_memory = low_memory
        self.sessions: dict[str, ort.InferenceSession] = {}
        if not low_memory:
            for name in ("text_encoder", self.transformer_graph(guided=True), "vq_decoder"):
                self.session(name)

    # ---- sessions

    def session_options(self, name: str) -> ort.SessionOptions:
        return session_options(name, self.threads, self.low_memory)

    def require_encoder(self) -> None:
        """Editing needs the bundle's VQ encoder: say so before any work if it has none."""
        if "vq_encoder" not in self.manifest["graphs"]:
            raise BundleError(
                f"{self.root} has no vq_encoder graph, which editing needs: re-export the bundle with this version"
            )

    def transformer_graph(self, guided: bool) -> str:
        """The guided graph when there is guidance and the bundle has it, else the plain transformer."""
        return GUIDED_GRAPH if guided and GUIDED_GRAPH in self.manifest["graphs"] else "transformer"

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self.sessions:
            graph = self.manifest["graphs"].get(name)
            if graph is None:
                raise BundleError(f"this bundle has no {name} graph")
            session = self.open_session(self.root / graph["file"], name)
            check_session_io(session, graph, name)
            self.sessions[name] = session
        return self.sessions[name]

    def open_session(self, path: Path, name: str) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), self.session_options(name), providers=self.providers)
        except (ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError) as e:
            raise BundleError(f"cannot load {path.relative_to(self.root)}: {str(e).splitlines()[0]}") from None

    def release(self, name: str) -> None:
        if self.low_memory and self.sessions.pop(name, None) is not None:
            release_freed_memory()

    # ---- stages

    def default_options(self) -> GenerationOptions:
        return options_from_manifest(self.manifest)

    def encode_text(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (text_embeds (B, Dp), hidden_states (B, 77, Dt))."""
        input_ids = self.tokenizer.encode(texts)
        text_embeds, hidden = self.session("text_encoder").run(
            ["text_embeds", "hidden_states"], {"input_ids": input_ids}
        )
        self.release("text_encoder")
        return text_embeds, hidden

    def tiled(self, graph: str, runner: type):
        """In low-memory mode, the bundle's tiled runner of `graph` (a session per layer, while it runs), or None."""
        if not self.low_memory or graph not in self.manifest["graphs"]:
            return None
        open_layer = lambda path: self.open_session(path, graph)  # noqa: E731
        return runner(self.root, self.manifest["graphs"][graph], open_layer, release=trim_heap)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) float32 in [0, 1] -> VQ tokens (B, H/16, W/16).

        In low-memory mode the tiled encoder runs when the bundle has one (see tiled_encoder.py).
        """
        encoder = self.tiled(TILED_ENCODER_GRAPH, TiledEncoder)
        if encoder is not None:
            return encoder(image)
        tokens = self.session("vq_encoder").run(["tokens"], {"image": image.astype(np.float32, copy=False)})[0]
        self.release("vq_encoder")
        return tokens

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """VQ tokens (B, h, w) -> images (B, 3, 16h, 16w) float32 in [0, 1].

        In low-memory mode the tiled decoder runs when the bundle has one (see tiled_decoder.py).
        """
        decoder = self.tiled(TILED_GRAPH, TiledDecoder)
        if decoder is not None:
            return decoder(tokens)
        image = self.session("vq_decoder").run(["image"], {"tokens": tokens.astype(np.int64)})[0]
        self.release("vq_decoder")
        return image

    def generate(
        self,
        prompt: str | list[str],
        options: GenerationOptions | None = None,
        progress: bool = False,
        callback: Callable[[int, np.ndarray], None] | None = None,
        image=None,
        mask=None,
        expand: tuple[int, int, int, int] | None = None,
        **overrides,
    ) -> Generation:
        """Generate one image per prompt; `overrides` replace fields of `options` (default: the bundle's).

        With `image` (a path or PIL image) it edits: img2img alone, inpainting with `mask` (white = repaint),
        outpainting with `expand` (left, top, right, bottom pixels); `strength=` sets the share of steps run.
        """
        options, edit = edit_options(
            options or self.default_options(), overrides, self.model["token_stride"], image, mask, expand
        )
        start = None
        if edit is not None:
            self.require_encoder()
            start = EditStart(self.encode(edit.pixels)[0], edit.repaint)
        schedule = self.model["masking_schedule"]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)

        texts = [options.negative_prompt] * batch + prompts if options.guided else prompts
        text_embeds, hidden = self.encode_text(texts)
        micro = np.tile(options.micro_conds(), (len(texts), 1))
        graph = self.transformer_graph(options.guided)
        if graph == GUIDED_GRAPH:
            denoiser = GuidedOnnxDenoiser(self.session(graph), hidden, text_embeds, micro, options.guidance_scale)
        else:
            denoiser = OnnxDenoiser(self.session(graph), hidden, text_embeds, micro)
        grid = (options.height // VQ_STRIDE, options.width // VQ_STRIDE)
        tokens = sample(
            denoiser,
            batch,
            grid,
            self.model["mask_token_id"],
            options,
            schedule=schedule if edit is None else edit.schedule(schedule),
            progress=progress,
            callback=callback,
            start=start,
        )
        del denoiser
        self.release(graph)
        return Generation(images=to_pil(self.decode(tokens)), tokens=tokens)

    def __call__(self, prompt: str, **options) -> Image.Image:
        return self.generate(prompt, **options).images[0]
