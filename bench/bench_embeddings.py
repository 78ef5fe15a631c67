"""Embeddings through LeMoE next to calling the packaged encoder in-process, same run.

Baselines, measured here on the same texts:
- *encoder*: `LocalEncoderBackend.embed` in this process (the encoder pass the server also runs,
  with its truncation and token estimate), no HTTP;
- *HTTP floor*: `GET /api/version` on the same server and connection: what any request costs
  (client, socket, gunicorn, Flask) before any embedding work.
"Overhead" is the server's median latency minus the encoder's median at concurrency 1: parsing,
choosing the model, JSON (or base64) out, and HTTP. At concurrency 4 the figure is texts per
second. Every request has its own text ("... (17)"), so nothing is cached anywhere.

    venv/bin/python -m bench.bench_embeddings [--requests 400] [--batch 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.servers import remove_tree, start_lemoe, stop_process, write_lemoe_project

TEXT = "How do I read a CSV file with pandas and keep only two columns? ({})"
CONCURRENCY = 4


def texts_for(i: int, batch: int) -> list[str]:
    return [TEXT.format(f"{i}.{j}") for j in range(batch)]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(latencies_s: list[float], wall_s: float, texts: int) -> dict[str, float]:
    ms = [v * 1000 for v in latencies_s]
    return {"median_ms": statistics.median(ms), "p90_ms": percentile(ms, 0.9), "p99_ms": percentile(ms, 0.99),
            "texts_per_s": texts / wall_s}


def measure_encoder(requests: int, batch: int) -> dict[str, float]:
    from modules.embeddings import EmbedRequest
    from modules.encoding.local_embeddings import build_local_backend

    backend = build_local_backend("use-multilingual", "use-multilingual", 8192)
    assert backend is not None
    for i in range(30):
        backend.embed(EmbedRequest(model=None, texts=texts_for(-i - 1, batch)))
    latencies = []
    started = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        backend.embed(EmbedRequest(model=None, texts=texts_for(i, batch)))
        latencies.append(time.perf_counter() - t0)
    return summary(latencies, time.perf_counter() - started, requests * batch)


class Client:
    """One keep-alive connection (http.client: the least client CPU of the stdlib options)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        self._connection.request(method, path, body=data, headers=headers)
        reply = self._connection.getresponse()
        payload = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {reply.status}: {payload[:200]!r}")
        parsed: dict[str, Any] = json.loads(payload)
        return parsed


def body_for(route: str, texts: list[str]) -> tuple[str, dict[str, Any]]:
    if route == "/api/embed":
        return route, {"model": "lemoe", "input": texts}
    if route == "/v1/embeddings (float)":
        return "/v1/embeddings", {"model": "lemoe", "input": texts, "encoding_format": "float"}
    return "/v1/embeddings", {"model": "lemoe", "input": texts, "encoding_format": "base64"}


def check(route: str, answer: dict[str, Any], batch: int) -> None:
    rows = answer["embeddings"] if route == "/api/embed" else [d["embedding"] for d in answer["data"]]
    size = len(rows[0]) if isinstance(rows[0], list) else len(rows[0]) * 3 // 4 // 4
    if len(rows) != batch or size != 512:
        raise RuntimeError(f"{route}: unexpected answer ({len(rows)} rows of {size})")


def measure_route_c1(url: str, route: str, requests: int, batch: int) -> dict[str, float]:
    client = Client(url)
    for i in range(30):
        client.call("POST", *body_for(route, texts_for(-i - 1, batch)))
    latencies = []
    started = time.perf_counter()
    for i in range(requests):
        path, body = body_for(route, texts_for(i, batch))
        t0 = time.perf_counter()
        answer = client.call("POST", path, body)
        latencies.append(time.perf_counter() - t0)
        check(route, answer, batch)
    return summary(latencies, time.perf_counter() - started, requests * batch)


def measure_floor(url: str, requests: int) -> dict[str, float]:
    client = Client(url)
    latencies = []
    started = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        client.call("GET", "/api/version")
        latencies.append(time.perf_counter() - t0)
    return summary(latencies, time.perf_counter() - started, 0)


def measure_route_c4(url: str, requests: int, batch: int) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        client = Client(url)
        mine = []
        for i in range(offset, requests, CONCURRENCY):
            path, body = body_for("/api/embed", texts_for(100_000 + i, batch))
            t0 = time.perf_counter()
            client.call("POST", path, body)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CONCURRENCY)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary(latencies, time.perf_counter() - started, requests * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--batch", type=int, default=1, help="texts per request")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    results: dict[str, Any] = {"batch": args.batch, "requests": args.requests}
    results["encoder in-process"] = measure_encoder(args.requests, args.batch)
    workdir = Path(tempfile.mkdtemp(prefix="lemoe-bench-embed-"))
    # Nothing listens at the experts' URL: embedding requests never reach a chat expert.
    config = write_lemoe_project(workdir, "http://127.0.0.1:9", threads=64, workers=1, keyword_router=True)
    server = start_lemoe(config, workdir, ready_path="/")
    try:
        results["HTTP floor (GET /api/version)"] = measure_floor(server.url, args.requests)
        for route in ("/api/embed", "/v1/embeddings (float)", "/v1/embeddings (base64)"):
            results[route] = measure_route_c1(server.url, route, args.requests, args.batch)
        results[f"/api/embed c={CONCURRENCY}"] = measure_route_c4(server.url, args.requests, args.batch)
    finally:
        stop_process(server.process)
        remove_tree(workdir)

    encoder = results["encoder in-process"]["median_ms"]
    print(f"embeddings, {args.batch} text(s) per request, {args.requests} requests each, 1 worker")
    print(f"{'case':34} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8} {'texts/s':>9} {'overhead ms':>12}")
    for name, row in results.items():
        if not isinstance(row, dict):
            continue
        overhead = "" if name.startswith(("encoder", "HTTP")) or " c=" in name else f"{row['median_ms'] - encoder:.2f}"
        print(f"{name:34} {row['median_ms']:>10.3f} {row['p90_ms']:>8.3f} {row['p99_ms']:>8.3f} "
              f"{row['texts_per_s']:>9.0f} {overhead:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
