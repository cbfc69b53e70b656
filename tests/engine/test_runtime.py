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


def test_thread_counts_beyond_this_processs_cpus_are_refused_in_one_line(tmp_path):
    """64 threads on 2 CPUs took 36 s for one image, 100,000 never finished: a typo, refused up front."""
    from typer.testing import CliRunner

    from sam4med.cli import app
    from sam4med.engine.errors import InputError
    from sam4med.engine.runtime import check_threads, usable_cpus

    check_threads(None)
    check_threads(usable_cpus())
    for threads, message in ((0, "must be >= 1"), (-1, "must be >= 1"), (usable_cpus() + 1, "more than the .* CPUs this process may use")):
        with pytest.raises(InputError, match=f"--threads {threads}: {message}"):
            check_threads(threads)
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "m.png"),
                                      "--box", "1", "1", "5", "5", "--threads", "100000"])
    assert result.exit_code == 2 and result.output.startswith("error: --threads 100000: more than the")
