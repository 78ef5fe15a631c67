"""Hostile upstreams: what one long line costs to read, and how long another client waits meanwhile.

(1) In-process, the line reader alone: one line with no line break, arriving in 512-byte pieces
    (an upstream writing small chunks; the backends read up to 64 KiB when more has arrived),
    through `modules.http_backends.iter_lines`, next to the reader it replaced (which re-split
    everything it had buffered on every read) as the baseline.
(2) A live server (`api_server.py`, one gevent worker, default limits) whose experts are a
    hostile stand-in upstream in a process of its own. `GET /api/version` is timed from this
    process, one request after another on a kept-alive connection: first with nothing else
    running (the baseline), then while 8 hostile answers are in flight, kept so by a load
    process of its own: 3 answers of one 10 MB line, 3 answers that never end (cut by
    `server.max_upstream_answer_bytes`), 2 answers sent one byte a second.

    venv/bin/python -m bench.bench_hostile [--probes 400] [--repo PATH]

`--repo` runs the live part against another checkout (for example the code before the bounded
reader); its probes time out after 10 s, and a timed-out probe counts as 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests

from bench.load import percentile
from bench.servers import REPO, free_port, stop_process, wait_until_ready

KINDS = ("longline", "endless", "trickle")
PROBE_TIMEOUT = 10.0
# (route, expert) of each hostile answer kept in flight; the trickling ones are held, not repeated.
REPEATED = [("/api/chat", "longline"), ("/v1/chat/completions", "longlineai"), ("/api/chat", "longlineai"),
            ("/api/chat", "endless"), ("/v1/chat/completions", "endlessai"), ("/v1/chat/completions", "endless")]
HELD = [("/api/chat", "trickle"), ("/v1/chat/completions", "trickleai")]


# --- (1) the line reader -----------------------------------------------------------------------

def quadratic_iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The reader before the fix, verbatim: the baseline."""
    pending: bytes | None = None
    for chunk in chunks:
        if pending is not None:
            chunk = pending + chunk
        lines = chunk.splitlines()
        if lines and lines[-1] and chunk and lines[-1][-1] == chunk[-1]:
            pending = lines.pop()
        else:
            pending = None
        yield from lines
    if pending is not None:
        yield pending


def time_reader(reader: Any, size: int) -> float:
    piece = b"a" * 512
    chunks = [piece] * (size // 512)
    started = time.perf_counter()
    for _ in reader(chunks):
        pass
    return time.perf_counter() - started


def bench_reader() -> list[dict[str, Any]]:
    from modules.http_backends import iter_lines

    rows = []
    for size in (256 * 1024, 1024 * 1024, 2 * 1024 * 1024, 10 * 1024 * 1024):
        # The old reader on 10 MB takes minutes (quadratic): measured up to 2 MB only.
        old = time_reader(quadratic_iter_lines, size) if size <= 2 * 1024 * 1024 else None
        rows.append({"bytes": size, "new_s": time_reader(iter_lines, size), "old_s": old})
    return rows


# --- (2) the live server -----------------------------------------------------------------------

def start_hostile_upstream() -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen([sys.executable, "-m", "bench.bench_hostile", "--serve-upstream"], cwd=REPO,
                               stdout=subprocess.PIPE)
    assert process.stdout is not None
    port = int(process.stdout.readline().decode().strip() or 0)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url + "/", process, 10, None)
    return process, url


def serve_upstream() -> int:
    """The stand-in upstream with its hostile models; prints its port, serves until SIGTERM."""
    import signal

    from tests.fakes.fake_upstream import FakeUpstream

    upstream = FakeUpstream().start()
    upstream.behave("longline-model", long_line=10_000_000)
    upstream.behave("endless-model", tokens=["more "], endless=True)
    upstream.behave("trickle-model", trickle=1.0)
    print(upstream.port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    upstream.stop()
    return 0


def write_project(root: Path, upstream_url: str) -> Path:
    def remote(i: int, label: str, kind: str, model: str) -> dict[str, Any]:
        return {"id": i, "label": label, "description": f"{label} expert", "keywords": [] if i == 0 else [label],
                "type": kind, "url": upstream_url, "model_name": model}

    experts = [remote(0, "fallback", "ollama", "fallback-model")]
    for i, kind in enumerate(KINDS):
        experts += [remote(2 * i + 1, kind, "ollama", f"{kind}-model"),
                    remote(2 * i + 2, f"{kind}ai", "openai", f"{kind}-model")]
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "config" / "experts.json").write_text(json.dumps({"experts": experts}, indent=2))
    config = {"server": {"host": "127.0.0.1", "log_file": "logs/lemoe.log"},
              "router": {"model_path": "", "categories_file": "config/experts.json"},
              "rate_limit": {"per_minute": 0}}
    path = root / "config" / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_lemoe(repo: Path, config: Path, project: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    python = repo / "venv" / "bin" / "python"
    env = {**os.environ, "LEMOE_PROJECT_DIR": str(project)}
    log = open(project / "server.out", "wb")  # noqa: SIM115 - kept open for the server's life
    process = subprocess.Popen([str(python if python.exists() else sys.executable), str(repo / "api_server.py"),
                                "--config", str(config), "--port", str(port)],
                               cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url + "/", process, 60, project / "server.out")
    return process, url


def probe(url: str, count: int) -> tuple[list[float], int]:
    """Latencies of `count` GET /api/version, one after another; and how many timed out."""
    latencies: list[float] = []
    timeouts = 0
    with requests.Session() as session:
        for _ in range(count):
            started = time.perf_counter()
            try:
                session.get(url + "/api/version", timeout=PROBE_TIMEOUT).raise_for_status()
            except requests.Timeout:
                timeouts += 1
                latencies.append(PROBE_TIMEOUT)
                continue
            latencies.append(time.perf_counter() - started)
            time.sleep(0.005)
    return latencies, timeouts


def hostile_load(url: str, seconds: float) -> int:
    """Keep the hostile answers in flight until SIGTERM (or `seconds`); print how many ended, and how."""
    import signal
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    held = []
    for route, expert in HELD:
        body = json.dumps({"model": expert, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        held.append(sock)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ended: dict[str, int] = {}
    lock = threading.Lock()

    def repeat(route: str, expert: str) -> None:
        body = {"model": expert, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        while not stop.is_set():
            # Read as it comes, so that an answer still running at the end is let go then.
            tail = b""
            try:
                with requests.post(url + route, json=body, stream=True, timeout=30) as r:
                    how = "still running at the end"
                    for piece in r.iter_content(65536):
                        tail = (tail + piece)[-1000:]
                        if stop.is_set():
                            break
                    else:
                        last = (tail.decode(errors="replace").splitlines() or [""])[-1]
                        ending = "error end" if '"error"' in last else "answer"
                        how = f"{r.status_code} {ending}"
            except requests.RequestException as exc:
                how = type(exc).__name__
            with lock:
                ended[f"{expert} {how}"] = ended.get(f"{expert} {how}", 0) + 1

    threads = [threading.Thread(target=repeat, args=pair) for pair in REPEATED]
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    for sock in held:
        sock.close()
    print(json.dumps(ended), flush=True)
    return 0


def summary(latencies: list[float], timeouts: int) -> dict[str, Any]:
    return {"probes": len(latencies), "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000, "max_ms": max(latencies) * 1000, "timeouts": timeouts}


def bench_live(repo: Path, probes: int) -> dict[str, Any]:
    upstream, upstream_url = start_hostile_upstream()
    workdir = Path(tempfile.mkdtemp(prefix="lemoe-hostile-"))
    server = None
    try:
        config = write_project(workdir, upstream_url)
        server, url = start_lemoe(repo, config, workdir)
        probe(url, 50)  # warm-up
        idle = summary(*probe(url, probes))
        # Stopped when the probes are done, however long they take (seconds each, with the old
        # reader); the bound only guards against a probe loop that never returns.
        load = subprocess.Popen([sys.executable, "-m", "bench.bench_hostile", "--hostile-load", url,
                                 "--seconds", str(probes * PROBE_TIMEOUT + 60)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        time.sleep(2)
        started = time.monotonic()
        hostile = summary(*probe(url, probes))
        hostile["seconds"] = time.monotonic() - started
        load.terminate()
        out, _ = load.communicate(timeout=120)
        hostile["hostile_answers_ended"] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        return {"repo": str(repo), "idle": idle, "hostile": hostile}
    finally:
        if server is not None:
            stop_process(server)
        stop_process(upstream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=400)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose api_server.py is measured live")
    parser.add_argument("--skip-reader", action="store_true")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hostile-load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        return serve_upstream()
    if args.hostile_load:
        return hostile_load(args.hostile_load, args.seconds)

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if not args.skip_reader:
        print("(1) one line with no line break, in 512-byte pieces: seconds to read it")
        print(f"{'line':>10}  {'this reader':>12}  {'old reader (baseline)':>22}")
        for row in bench_reader():
            old = f"{row['old_s']:.3f} s" if row["old_s"] is not None else "(minutes)"
            print(f"{row['bytes'] / 1048576:>8.2f} MB  {row['new_s']:>10.4f} s  {old:>22}")
    live = bench_live(args.repo.resolve(), args.probes)
    print(f"(2) GET /api/version, {args.probes} probes one after another, server {live['repo']}")
    for name in ("idle", "hostile"):
        row = live[name]
        print(f"  {name:>7}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, max {row['max_ms']:.1f} ms, "
              f"timed out {row['timeouts']}")
    print(f"  hostile answers ended during the probes: {live['hostile']['hostile_answers_ended']}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
