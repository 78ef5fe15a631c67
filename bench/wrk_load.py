"""Closed-loop load from `wrk` (C, epoll) instead of Python threads, driven by bench/wrk_chat.lua.

On 2 cores the load generator shares the CPU with the server it measures; bench/load.py spends
roughly as much CPU per request as a small Flask server does, so it capped every contender at
the same low figure. wrk costs a fraction of that. It keeps its connections alive, as load.py
does, and times each request from its first byte written to its last byte read.

One wrk thread (-t1) drives all connections: a single epoll loop is far from saturated at
these rates (it spends about 0.06 ms of CPU per request against the bare relay at c=16, where
load.py spends 0.24 ms), and -t2 measured the same rate at slightly more CPU per request.

Every body differs (the Lua script puts a request number in place of load.PLACEHOLDER), each
run taking a fresh range of numbers; a body without the placeholder is sent as is.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.load import Target

SCRIPT = Path(__file__).resolve().with_name("wrk_chat.lua")
THREADS = 1
# Each wrk run numbers its requests from its own block, far above load.py's numbers.
_RUN_BLOCK = 10_000_000
_runs = itertools.count(100)


@dataclass
class WrkResult:
    """What `summarize` in bench_overhead reads from a LoadResult, from wrk's own counters."""

    count: int
    errors: int
    elapsed: float
    first_error: str
    p50_s: float
    p99_s: float
    # CPU seconds wrk itself used (user + system), to show what the load costs.
    client_cpu_s: float = 0.0

    @property
    def per_second(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, q: float) -> float:
        if self.count == 0:
            return math.nan
        if q == 50:
            return self.p50_s * 1000
        if q == 99:
            return self.p99_s * 1000
        raise ValueError(f"wrk runs report p50 and p99 only, not p{q}")


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run_wrk(target: Target, *, concurrency: int, seconds: float, timeout_s: int = 60) -> WrkResult:
    """Load `target` from `concurrency` kept-alive connections for about `seconds` (whole seconds)."""
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    duration = max(1, round(seconds))
    env = {
        **os.environ,
        "WRK_PATH": target.path,
        "WRK_BODY": target.body.decode(),
        "WRK_EXPECT": "\n".join(piece.decode() for piece in target.expect),
        "WRK_THREADS": str(THREADS),
        "WRK_FIRST": str(next(_runs) * _RUN_BLOCK),
        "WRK_HEADER": f"{target.expect_header[0]}: {target.expect_header[1]}" if target.expect_header else "",
    }
    command = [binary, f"-t{THREADS}", f"-c{concurrency}", f"-d{duration}s", f"--timeout={timeout_s}s",
               "-s", str(SCRIPT), target.base_url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration + timeout_s + 30,
                          check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((row for row in done.stdout.splitlines() if row.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-1000:]}{done.stdout[-1000:]}")
    figures = json.loads(line.removeprefix("WRKJSON "))
    bad = figures["bad_status"] + figures["incomplete"]
    socket_errors = figures["connect"] + figures["read"] + figures["write"] + figures["timeout"]
    first_error = figures["first_error"]
    if not first_error and socket_errors:
        first_error = (f"socket errors: connect {figures['connect']}, read {figures['read']}, "
                       f"write {figures['write']}, timeout {figures['timeout']}")
    return WrkResult(
        count=figures["requests"] - bad,
        errors=bad + socket_errors,
        elapsed=figures["duration_us"] / 1e6,
        first_error=first_error,
        p50_s=figures["p50_us"] / 1e6,
        p99_s=figures["p99_us"] / 1e6,
        client_cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )
