"""Fresh processes timed and sized, as a user starts them: shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import time


def run_process(command: list[str], environment: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak resident MB (``ru_maxrss`` of the child) of one process; exits on failure."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    process.stderr.close()
    return seconds, usage.ru_maxrss / 1024
