"""The bench's child process: one job, a generation or a logit comparison, measured in a fresh interpreter so
that its peak resident memory is its own. `bench()` writes each job as JSON, and the child writes its result:

    python -m meissonic_edge.bench.child --child OUT_DIR/runs/<variant>/<size>px/generation-job.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from meissonic_edge.bench.fidelity import logit_agreement
from meissonic_edge.bench.memory import RssMonitor, max_rss_bytes, mib, ru_maxrss_bytes
from meissonic_edge.bench.results import PHASES, write_json
from meissonic_edge.fileio import write_atomic

# ----------------------------------------------------------------------------------------------- one generation


class PhaseWatch:
    """Wraps a pipeline's `encode_text` and `decode` to mark the phases of each generation (time and memory)."""

    def __init__(self, pipe, monitor: RssMonitor):
        self.monitor = monitor
        self.marks: dict[str, float] = {}
        encode_text, decode = pipe.encode_text, pipe.decode

        def timed_encode_text(*args, **kwargs):
            self.mark("text_encoding")
            out = encode_text(*args, **kwargs)
            self.mark("sampling")
            return out

        def timed_decode(*args, **kwargs):
            self.mark("vq_decode")
            out = decode(*args, **kwargs)
            self.mark(None)
            return out

        pipe.encode_text, pipe.decode = timed_encode_text, timed_decode

    def mark(self, phase: str | None) -> None:
        self.monitor.enter(phase)
        self.marks[phase or "done"] = time.perf_counter()


class FeedRecorder:
    """Stands in for an OnnxPipeline's transformer session during one generation: runs it, and keeps the feeds
    of chosen steps, so that the logit comparison gets exactly what the graph got."""

    def __init__(self, pipe, steps: list[int]):
        self.pipe = pipe
        self.steps = set(steps)
        self.calls = 0
        self.feeds: dict[int, dict[str, np.ndarray]] = {}
        self.session = None
        open_session = pipe.session

        def session(name):
            if name not in ("transformer", "transformer_guided"):
                return open_session(name)
            self.session = open_session(name)
            return self

        pipe.session = session

    def run(self, output_names, feed):
        if self.calls in self.steps:
            # the plain transformer's inputs (the guided graph's, less its scale): fidelity runs the plain graph
            inputs = {name: value for name, value in feed.items() if name != "guidance_scale"}
            self.feeds[self.calls] = {name: np.array(value, copy=True) for name, value in inputs.items()}
        self.calls += 1
        return self.session.run(output_names, feed)

    def detach(self) -> dict[int, dict[str, np.ndarray]]:
        del self.pipe.session  # the class's method again
        return self.feeds


def save_transformer_inputs(path: Path, feeds: dict[int, dict[str, np.ndarray]]) -> None:
    """One .npz: per step `tokens_<step>` and `timestep_<step>`, and the conditioning they share."""
    first = feeds[min(feeds)]
    arrays = {name: first[name] for name in ("encoder_hidden_states", "text_embeds", "micro_conds")}
    for step, feed in feeds.items():
        arrays[f"tokens_{step}"], arrays[f"timestep_{step}"] = feed["tokens"], feed["timestep"]
    write_atomic(path, lambda f: np.savez(f, steps=np.array(sorted(feeds)), **arrays))


def load_pipeline(job: dict, monitor: RssMonitor) -> tuple[object, float, float]:
    """Import and construct the job's pipeline; return it with the import and load seconds."""
    start = time.perf_counter()
    if job["backend"] == "onnx":
        from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline

        import_s = time.perf_counter() - start
        monitor.enter("load")
        start = time.perf_counter()
        pipe = OnnxPipeline(job["path"], threads=job["threads"], low_memory=job["low_memory"])
    else:
        import torch

        from meissonic_edge.model.reference import ReferencePipeline

        if job["threads"]:
            torch.set_num_threads(job["threads"])
        import_s = time.perf_counter() - start
        monitor.enter("load")
        start = time.perf_counter()
        pipe = ReferencePipeline.from_model_dir(job["path"])
    load_s = time.perf_counter() - start
    monitor.enter(None)
    return pipe, import_s, load_s


def timed_generation(pipe, watch: PhaseWatch, prompt: str, job: dict):
    """One generation; returns it with its seconds: per step, text encoding, VQ decoding, and in all."""
    step_ends = []
    start = time.perf_counter()
    result = pipe.generate(
        prompt,
        steps=job["steps"],
        seed=job["seed"],
        height=job["size"],
        width=job["size"],
        callback=lambda step, tokens: step_ends.append(time.perf_counter()),
    )
    marks = watch.marks
    seconds = {
        "steps": [end - begin for begin, end in zip([marks["sampling"], *step_ends[:-1]], step_ends, strict=True)],
        "text_encoding": marks["sampling"] - marks["text_encoding"],
        "vq_decode": marks["done"] - marks["vq_decode"],
        "generation": time.perf_counter() - start,
    }
    return result, seconds


def measure_generation(job: dict) -> dict:
    """The child's work: load, then `repeats` generations of every prompt; save tokens and images of the first."""
    from meissonic_edge.runtime.imaging import save_image

    monitor = RssMonitor()
    monitor.enter("import")
    pipe, import_s, load_s = load_pipeline(job, monitor)
    watch = PhaseWatch(pipe, monitor)
    folder = Path(job["folder"])
    seconds = []
    for repeat in range(job["repeats"]):
        for index, prompt in enumerate(job["prompts"]):
            recorder = FeedRecorder(pipe, job["record_steps"]) if job["record_steps"] and not seconds else None
            result, timings = timed_generation(pipe, watch, prompt, job)
            seconds.append(timings)
            if recorder is not None:
                save_transformer_inputs(folder / "transformer_inputs.npz", recorder.detach())
            if repeat == 0:
                write_atomic(folder / f"tokens-{index}.npy", lambda f, t=result.tokens: np.save(f, t))
                save_image(result.images[0], folder / f"image-{index}.png")
    peaks = monitor.stop()
    step_s = [step for timings in seconds for step in timings["steps"]]
    return {
        "import_s": import_s,
        "load_s": load_s,
        **{f"{key}_s": statistics.median(t[key] for t in seconds) for key in ("text_encoding", "vq_decode")},
        "generation_s": statistics.median(t["generation"] for t in seconds),
        "step_s": {"median": statistics.median(step_s), "min": min(step_s), "max": max(step_s), "all": step_s},
        "peak_rss_mib": {phase: peaks[phase] for phase in PHASES},
        "import_rss_mib": peaks["import"],
        "max_rss_mib": mib(max_rss_bytes()),
        "ru_maxrss_mib": mib(ru_maxrss_bytes()),
    }


# ------------------------------------------------------------------------------------------- the logit comparison


def measure_logits(job: dict) -> dict:
    """The child's work: both transformer graphs on the fp32 run's recorded inputs, compared step by step."""
    from meissonic_edge.runtime.onnx_pipeline import OnnxPipeline

    def transformer(bundle):  # checksums were verified when the bundle's generation was measured
        return OnnxPipeline(bundle, threads=job["threads"], low_memory=True, verify_checksums=False).session(
            "transformer"
        )

    reference = transformer(job["reference_bundle"])
    variant = reference if job["bundle"] == job["reference_bundle"] else transformer(job["bundle"])
    inputs = np.load(job["inputs"])
    shared = {name: inputs[name] for name in ("encoder_hidden_states", "text_embeds", "micro_conds")}
    steps = []
    for step in inputs["steps"].tolist():
        feed = {**shared, "tokens": inputs[f"tokens_{step}"], "timestep": inputs[f"timestep_{step}"]}
        expected = reference.run(["logits"], feed)[0]
        got = variant.run(["logits"], feed)[0]
        steps.append({"step": step, "timestep": float(feed["timestep"][0]), **logit_agreement(expected, got)})
    return {"steps": steps}


CHILD_WORK = {"generation": measure_generation, "logits": measure_logits}


def child_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    write_json(Path(job["result"]), CHILD_WORK[job["work"]](job))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        sys.exit("usage: python -m meissonic_edge.bench.child --child JOB.json (the jobs that bench() writes)")
    child_main(sys.argv[2])
