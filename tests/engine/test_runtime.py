"""Process-wide CPU settings: the allocator keeps freed blocks for speed, and gives them back between images."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import re
from sam4med.engine.runtime import release_free_memory, tune_allocator

def rss_mb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

assert tune_allocator()
before = rss_mb()
blocks = [bytearray(8 << 20) for _ in range(40)]  # 320 MB, below the tuned mmap threshold: on the heap
held = rss_mb()
del blocks
kept = rss_mb()
release_free_memory()
print(held - before, kept - before, rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_stay_in_the_tuned_heap_until_released():
    held, kept, released = map(int, subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                                                    text=True).stdout.split())
    assert held >= 300 and kept >= 300  # tune_allocator: freed, yet still resident
    assert released < 20  # handed back
