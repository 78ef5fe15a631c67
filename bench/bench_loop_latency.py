"""(g) A short request's latency while long routing decisions run, with and without routing
off the event loop.

Each contender is `api_server.py` on the checkout's default configuration (the packaged
embedding router, one gevent worker, the rate limit off). 16 client threads send
POST /v1/route in a loop, each message about 1,500 characters and different from every other
(so the decision cache never answers); meanwhile one client sends GET /api/version, one request
after another, and its latencies are the figures. The same is measured on an idle server.

The baseline is the code before decisions moved to the thread pool: by default the parent of
the commit that added `OffLoopRouter`, exported with `git archive` into a temporary folder.

    venv/bin/python -m bench.bench_loop_latency [--probes 400] [--baseline REF | --baseline-repo PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench.bench_footprint import copy_default_project
from bench.bench_restart import start_server
from bench.servers import REPO, stop_process

LOADERS = 16
FILLER = ("Here is the report I mentioned, with the numbers from last quarter and the notes from "
          "the meeting, which ran long because everyone had questions about the budget. ")


def long_message(n: int) -> str:
    # ~1,500 characters; the number makes every conversation new to the decision cache.
    return f"({n}) " + FILLER * 9 + "Can you write a python function that totals these figures?"


def baseline_commit() -> str:
    """The parent of the commit that moved routing decisions to the thread pool."""
    found = subprocess.run(["git", "log", "--format=%H", "-S", "class OffLoopRouter", "--reverse", "--",
                            "modules/router_factory.py"], cwd=REPO, capture_output=True, text=True, check=True)
    first = found.stdout.split()[0]
    return f"{first}^"


def export(ref: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "venv").symlink_to((REPO / "venv").resolve())
    return into


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2), "p99_ms": round(at(0.99) * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2)}


def probe(url: str, count: int) -> list[float]:
    session = requests.Session()
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        reply = session.get(url + "/api/version", timeout=30)
        latencies.append(time.perf_counter() - started)
        if reply.status_code != 200:
            raise RuntimeError(f"GET /api/version answered {reply.status_code}")
        time.sleep(0.005)
    return latencies


class Loaders:
    def __init__(self, url: str, threads: int) -> None:
        self.url = url
        self.decisions = 0
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Loaders:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _loop(self, index: int) -> None:
        session = requests.Session()
        n = index * 1_000_000
        while not self._stop.is_set():
            n += 1
            body = {"model": "lemoe", "messages": [{"role": "user", "content": long_message(n)}]}
            try:
                ok = session.post(self.url + "/v1/route", json=body, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            with self._lock:
                if ok:
                    self.decisions += 1
                else:
                    self.errors += 1


def measure(repo: Path, probes: int) -> dict[str, Any]:
    project = Path(tempfile.mkdtemp(prefix="lemoe-loop-"))
    config = copy_default_project(project)
    data = json.loads(config.read_text())
    data["rate_limit"]["per_minute"] = 0
    config.write_text(json.dumps(data, indent=2))
    try:
        process, url = start_server(repo, config, project, workers=1)
        try:
            probe(url, 50)  # warm-up
            idle = percentiles(probe(url, probes))
            with Loaders(url, LOADERS) as load:
                time.sleep(1.0)
                before, started = load.decisions, time.monotonic()
                busy = percentiles(probe(url, probes))
                rate = (load.decisions - before) / (time.monotonic() - started)
            return {"repo": str(repo), "idle": idle, "busy": busy, "decisions_per_s": round(rate, 1),
                    "load_errors": load.errors}
        finally:
            stop_process(process)
    finally:
        shutil.rmtree(project, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=400)
    parser.add_argument("--baseline", help="git ref of the code to compare with (default: before OffLoopRouter)")
    parser.add_argument("--baseline-repo", type=Path, help="a checkout to compare with, instead of --baseline")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="lemoe-baseline-"))
    try:
        if args.baseline_repo:
            base_repo, label = args.baseline_repo.resolve(), str(args.baseline_repo)
        else:
            ref = args.baseline or baseline_commit()
            base_repo, label = export(ref, scratch / "repo"), ref
        rows = [("routing off the loop (this checkout)", measure(REPO, args.probes)),
                (f"routing on the loop ({label})", measure(base_repo, args.probes))]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"(g) GET /api/version, {args.probes} probes one after another; busy = while {LOADERS} clients send "
          "~1,500-character POST /v1/route in a loop")
    print("| server | idle p50 / p99 | busy p50 / p99 / max | decisions/s meanwhile |")
    print("|---|---|---|---|")
    for name, row in rows:
        idle, busy = row["idle"], row["busy"]
        print(f"| {name} | {idle['p50_ms']} / {idle['p99_ms']} ms | {busy['p50_ms']} / {busy['p99_ms']} / "
              f"{busy['max_ms']} ms | {row['decisions_per_s']} ({row['load_errors']} errors) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
