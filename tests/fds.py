"""The test process's open file descriptors: how many, and waiting for a count to come back.

Every hostile-input test checks that nothing leaks by counting
``/proc/self/fd`` before and after; connection threads close their fds
asynchronously, so the count is read again until it is back or time is up.
"""

from __future__ import annotations

import os
import time

__all__ = ["fd_count", "settled_fd_count"]


def fd_count() -> int:
    """File descriptors open in this process."""
    return len(os.listdir("/proc/self/fd"))


def settled_fd_count(before: int, timeout: float) -> int:
    """The fd count once it equals ``before``, or as it is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    count = fd_count()
    while count != before and time.monotonic() < deadline:
        time.sleep(0.01)
        count = fd_count()
    return count
