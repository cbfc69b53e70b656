"""Process-wide CPU settings applied once at start-up by the CLI and the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from sam4med.engine.errors import InputError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep glibc from returning and re-zeroing large blocks between tensors of one shape.

    SAM's encoder and decoder allocate and free tens of MB per call; with glibc's defaults each
    such block is an mmap/munmap pair whose pages are zeroed again on every call. Raising the
    mmap and trim thresholds keeps them in the heap, which roughly halved the encoder's time on a
    2-core machine (figures: benchmarks/engine.py).
    Returns False (and changes nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))


def configure_cpu(threads: int | None = None) -> None:
    """Allocator tuning plus an optional PyTorch thread count."""
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: must be >= 1 (or unset for PyTorch's choice)")
    tune_allocator()
    if threads:
        import torch  # not before: the ONNX Runtime path of ``segment`` starts without it

        torch.set_num_threads(threads)
