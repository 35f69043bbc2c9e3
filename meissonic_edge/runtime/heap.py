"""Give freed heap memory back to the operating system between the stages of a low-memory generation.

A released onnxruntime session frees its weights and buffers, but glibc keeps much of that memory in the
process's heap for reuse: the next stage then starts from a resident size that still counts the previous
stage's graph. `malloc_trim` returns the free pages. Measured on the block-128 int4 meissonic bundle at
512x512: after the text encoder is released the process keeps 232 MiB without it, 79 MiB with it; after
the transformer, 654 MiB against 85 MiB. Elsewhere (macOS, Windows, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Return the heap's free pages to the operating system (glibc's malloc_trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_freed_memory() -> None:
    """Collect unreachable objects (a released session may sit in a reference cycle), then trim the heap."""
    gc.collect()
    trim_heap()
