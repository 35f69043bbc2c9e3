"""Resident memory of this process: now and at its peak (from /proc/self/status on Linux, else getrusage),
and the peak of each phase of a generation (`RssMonitor`)."""

from __future__ import annotations

import resource
import sys
import threading

from meissonic_edge.bench.results import PHASES

RSS_INTERVAL_S = 0.005


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), or None off Linux."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    return proc_status_bytes("VmRSS")


def ru_maxrss_bytes() -> int:
    """getrusage's ru_maxrss (KiB on Linux, bytes on macOS). On Linux it survives execve: a child's value
    starts at its parent's peak, so it is a process's own peak only when the parent was smaller."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def max_rss_bytes() -> int:
    """This process's own peak resident memory: VmHWM where /proc has it, else ru_maxrss."""
    return proc_status_bytes("VmHWM") or ru_maxrss_bytes()


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**20, 1)


class RssMonitor:
    """Peak resident memory per phase: a thread samples VmRSS every few ms, and every phase change samples
    at once, so that a phase shorter than the interval still has a value."""

    def __init__(self, interval_s: float = RSS_INTERVAL_S):
        self.interval_s = interval_s
        self.phase: str | None = None
        self.peaks: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        rss = current_rss_bytes()
        with self.lock:
            if rss is not None and self.phase is not None:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.sample()

    def enter(self, phase: str | None) -> None:
        """End the current phase with a sample, and start `phase` (None: between phases) with another."""
        self.sample()
        with self.lock:
            self.phase = phase
        self.sample()

    def stop(self) -> dict[str, float | None]:
        self.enter(None)
        self.stopped.set()
        self.thread.join()
        return {phase: mib(self.peaks.get(phase)) for phase in ("import", *PHASES)}
