"""Memory and CPU time of a whole server (the gunicorn master and all its workers), from /proc.

RSS counts pages shared between the master and its forked workers once per process, so the
sum over-states the real use; PSS splits shared pages between their users and sums to what
the server costs the machine. Both are reported.
"""

from __future__ import annotations

import os
from pathlib import Path


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += child_pids(current)
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mib(pid: int) -> float:
    return sum(_status_kib(p, "VmRSS") for p in tree_pids(pid)) / 1024


def tree_pss_mib(pid: int) -> float:
    return sum(_pss_kib(p) for p in tree_pids(pid)) / 1024


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by `pid` and its descendants (threads included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: field 14 (utime) and 15 (stime) of proc(5) are at 11 and 12.
        total += int(fields[11]) + int(fields[12])
    return total / ticks
