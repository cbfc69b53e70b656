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
    _check_exit(command, process, status)
    return seconds, usage.ru_maxrss / 1024


def _check_exit(command: list[str], process: subprocess.Popen, status: int) -> None:
    """Stop the benchmark with the child's last words when it failed."""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    process.stderr.close()


def run_process_sampled(command: list[str], every: float = 0.02) -> tuple[float, float, float]:
    """:func:`run_process`'s wall seconds and peak resident MB, and the peak of the child's anonymous memory
    (``RssAnon``, sampled from ``/proc`` every ``every`` seconds): the resident set also counts the pages of
    the shared libraries a process maps, which the system can drop and read again, the heap not."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anonymous_kb = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{process.pid}/status", encoding="ascii") as handle:
                fields = dict(line.split(":", 1) for line in handle)
            anonymous_kb = max(anonymous_kb, int(fields["RssAnon"].split()[0]))
        except (OSError, KeyError, ValueError):  # exiting between two samples
            pass
        time.sleep(every)
    seconds = time.perf_counter() - started
    _check_exit(command, process, status)
    return seconds, usage.ru_maxrss / 1024, anonymous_kb / 1024
