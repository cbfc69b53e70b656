"""Process-wide CPU settings applied once at start-up by the CLI and the benchmarks, and the arithmetic PyTorch
runs in (``precision_autocast``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import TYPE_CHECKING

from sam4med.engine.errors import InputError

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library on Linux (found once: find_library runs ldconfig), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep glibc from returning and re-zeroing large blocks between tensors of one shape.

    SAM's encoder and decoder allocate and free tens of MB per call; with glibc's defaults each
    such block is an mmap/munmap pair whose pages are zeroed again on every call. Raising the
    mmap and trim thresholds keeps them in the heap, which roughly halved the encoder's time on a
    2-core machine (figures: benchmarks/engine.py).
    Returns False (and changes nothing) where the C library is not glibc.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))


def precision_autocast(device_type: str, precision: str) -> torch.autocast:
    """What ``precision`` means wherever PyTorch computes (inference and training): "bf16" is bfloat16 autocast,
    "fp32" a disabled one."""
    import torch  # not at import: the ONNX Runtime path of ``segment`` starts without it

    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX), where bf16 pays."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``).

    ``tune_allocator`` keeps freed blocks for the next call of the same shape, and ONNX Runtime frees its
    activations into the same heap: between two images of an item loop that is a few hundred MB that
    nothing will need until the next image's encoder runs, on top of which that image's peak would sit.
    Does nothing where the C library is not glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or a job's share, not the whole machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    """A thread count of at least 1 and at most the CPUs this process may use (beyond, threads only wait
    for each other, and ONNX Runtime makes every one of them up front)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"--threads {threads}: must be >= 1 (or unset for PyTorch's choice)")
    if threads > usable_cpus():
        raise InputError(f"--threads {threads}: more than the {usable_cpus()} CPUs this process may use")


def configure_cpu(threads: int | None = None) -> None:
    """Allocator tuning plus an optional PyTorch thread count."""
    check_threads(threads)
    tune_allocator()
    if threads:
        import torch  # not before: the ONNX Runtime path of ``segment`` starts without it

        torch.set_num_threads(threads)
