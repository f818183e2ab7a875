"""What /proc says about a running process: resident memory, threads, open descriptors.

Used by the reliability suite (tests/reliability) and the benchmarks (bench/) to compare a daemon with itself over time
(or with a baseline server) without any help from inside the process.
"""

import contextlib
import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def status(pid: int) -> dict[str, str]:
    """The fields of /proc/<pid>/status, e.g. {"VmRSS": "40212 kB", "Threads": "21"}."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def rss_bytes(pid: int) -> int:
    return int(status(pid)["VmRSS"].split()[0]) * 1024


def threads(pid: int) -> int:
    return int(status(pid)["Threads"])


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor points at (socket:[inode], pipe:[...], anon_inode:..., paths)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(targets)


def wait_for(probe: Callable[[], T], accept: Callable[[T], bool], timeout: float) -> T:
    """Re-reads `probe()` until `accept(value)` holds or `timeout` seconds pass; returns the
    last value either way, so the caller's assertion shows what was seen.

    /proc has no change notification, so this polls (every 20 ms) with a hard deadline: a
    bounded wait on a condition, not a sleep that hopes something has happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if accept(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.02)
