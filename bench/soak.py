"""Bounded soak: thousands of mixed requests against a real gunicorn LeMoE on loopback, with one
request in ten sent to an expert whose backend misbehaves (the stand-in upstream's fault knobs).

Prints how many answers were well-formed (the target is 100%), what each injected fault turned
into, and the server's memory (RSS and PSS of the gunicorn master and all its workers) at start,
after warm-up and at the end.

    venv/bin/python -m bench.soak [--requests 5000] [--concurrency 8] [--max-seconds 300]
                                  [--workers 2] [--gguf-fallback]

Stops by itself after `--requests` requests or `--max-seconds`, whichever comes first. Only
127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.footprint import tree_pids, tree_pss_mib, tree_rss_mib
from bench.servers import SMOLLM, Server, start_lemoe
from tests.fakes.fake_upstream import FakeUpstream, reserve_closed_port

# One expert per way a backend can fail, each reached by its own keyword.
FAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "server-down": ("ollama", {}),  # its URL is a closed port
    "refuses": ("ollama", {"refuse": True}),
    "times-out": ("ollama", {"delay_first": 2.0}),
    "http-500": ("openai", {"fail_status": 500}),
    "garbage": ("openai", {"garbage": True}),
    "error-before-first-token": ("ollama", {"stream_error": "crashed", "stream_error_after": 0}),
    "drops-mid-stream": ("ollama", {"tokens": ["a", "b", "c", "d", "e"], "drop_after": 2}),
    "error-mid-stream": ("openai", {"tokens": ["a", "b", "c", "d"], "stream_error": "oom", "stream_error_after": 2}),
}
FAULT_SHARE = 0.10
EXPERT_TIMEOUT = 0.5
INFERENCE_ROUTES = ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions")
LISTING_ROUTES = ("/api/tags", "/v1/models", "/api/version", "/api/ps")


def fault_keyword(fault: str) -> str:
    return "zq" + fault.replace("-", "")


def write_project(root: Path, upstream_url: str, closed_url: str, workers: int, gguf_fallback: bool) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "models").mkdir()
    fallback: dict[str, Any] = (
        {"type": "local", "format": "gguf", "model_path": SMOLLM, "options": {"num_predict": 8}} if gguf_fallback
        else {"type": "ollama", "url": upstream_url, "model_name": "fallback-model"})
    experts = [
        {"id": 0, "label": "fallback", "description": "General fallback.", **fallback},
        {"id": 1, "label": "coder", "keywords": ["python", "code"], "type": "ollama", "url": upstream_url,
         "model_name": "coder-model"},
        {"id": 2, "label": "writer", "keywords": ["poem", "story"], "type": "openai", "url": upstream_url,
         "model_name": "writer-model"},
    ]
    for i, (fault, (kind, _)) in enumerate(FAULTS.items(), start=3):
        url = closed_url if fault == "server-down" else upstream_url
        experts.append({"id": i, "label": fault, "keywords": [fault_keyword(fault)], "type": kind, "url": url,
                        "model_name": f"{fault}-model", "timeout": EXPERT_TIMEOUT})
    config = {
        "server": {"host": "127.0.0.1", "workers": workers, "threads": 16, "connect_timeout": 1,
                   "read_timeout": 5, "log_file": "logs/lemoe.log",
                   # Off, so every faulty request really reaches its failing backend.
                   "expert_cooldown_seconds": 0},
        "router": {"model_path": "", "categories_file": "config/experts.json"},
        # Off: one client address sends everything.
        "rate_limit": {"per_minute": 0},
    }
    (root / "config" / "experts.json").write_text(json.dumps({"max_experts": 16, "experts": experts}, indent=2))
    path = root / "config" / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass(frozen=True)
class Planned:
    method: str
    path: str
    body: dict[str, Any] | None
    stream: bool
    fault: str | None


def plan_request(rng: random.Random) -> Planned:
    if rng.random() < 0.1:
        return Planned("GET", rng.choice(LISTING_ROUTES), None, False, None)
    fault = rng.choice(list(FAULTS)) if rng.random() < FAULT_SHARE / 0.9 else None
    text = fault_keyword(fault) if fault else rng.choice(["write python code", "a short poem", "hello there"])
    route, stream = rng.choice(INFERENCE_ROUTES), rng.random() < 0.5
    body: dict[str, Any] = {
        "/api/chat": {"model": "lemoe", "messages": [{"role": "user", "content": text}]},
        "/api/generate": {"model": "lemoe", "prompt": text},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": text}], "max_tokens": 8},
        "/v1/completions": {"prompt": text, "max_tokens": 8},
    }[route]
    return Planned("POST", route, {**body, "stream": stream}, stream, fault)


def outcome_of(planned: Planned, r: requests.Response) -> str:
    """How the request ended, or 'MALFORMED: ...' when the answer breaks its protocol."""
    text = r.content.decode("utf-8", errors="replace")
    if "Traceback" in text or 'File "' in text:
        return "MALFORMED: traceback in body"
    if r.status_code != 200:
        return _error_outcome(planned, r)
    if planned.method == "GET":
        return "listed" if isinstance(r.json(), dict) else "MALFORMED: listing is not an object"
    openai = planned.path.startswith("/v1/")
    if not planned.stream:
        body = r.json()
        ok = (body["choices"][0]["finish_reason"] is not None) if openai else body.get("done") is True
        return _answered(r) if ok else "MALFORMED: unfinished answer"
    if openai:
        events = [e for e in text.split("\n\n") if e]
        if not events or not all(e.startswith("data: ") for e in events):
            return "MALFORMED: not SSE"
        if events[-1] == "data: [DONE]":
            return _answered(r)
        last = json.loads(events[-1][len("data: "):])
        return "stream ended with SSE error event" if set(last) == {"error"} else "MALFORMED: SSE cut short"
    lines = [json.loads(line) for line in text.splitlines() if line]
    if lines and lines[-1].get("done") is True:
        return _answered(r)
    if lines and set(lines[-1]) == {"error"}:
        return "stream ended with NDJSON error line"
    return "MALFORMED: NDJSON cut short"


def _answered(r: requests.Response) -> str:
    if r.headers.get("X-LeMoE-Route-Method") == "fallback":
        return "answered (routed to the fallback)"
    if r.headers.get("X-LeMoE-Expert") == "fallback":
        return "answered by the fallback (expert failed)"
    return "answered by the chosen expert"


def _error_outcome(planned: Planned, r: requests.Response) -> str:
    try:
        error = r.json()["error"]
    except (ValueError, KeyError):
        return f"MALFORMED: {r.status_code} without a protocol error body"
    shaped = isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} \
        if planned.path.startswith("/v1/") else isinstance(error, str)
    return f"HTTP {r.status_code} in protocol" if shaped else f"MALFORMED: {r.status_code} error body shape"


def send(session: requests.Session, base: str, planned: Planned) -> str:
    try:
        r = session.request(planned.method, base + planned.path, json=planned.body, timeout=60)
        return outcome_of(planned, r)
    except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
        return f"MALFORMED: {type(exc).__name__}"


def run_requests(base: str, plans: list[Planned], concurrency: int, deadline: float,
                 done: Callable[[int], None]) -> list[tuple[Planned, str]]:
    local = threading.local()
    results: list[tuple[Planned, str]] = []
    lock = threading.Lock()

    def one(planned: Planned) -> None:
        if time.monotonic() > deadline:
            return
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        outcome = send(session, base, planned)
        with lock:
            results.append((planned, outcome))
            done(len(results))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, plans))
    return results


def memory_line(label: str, server: Server) -> str:
    pids = tree_pids(server.process.pid)
    each = " + ".join(f"{own_rss_mib(pid):.0f}" for pid in pids)
    return (f"{label:<14} RSS {tree_rss_mib(server.process.pid):7.1f} MiB  PSS {tree_pss_mib(server.process.pid):7.1f} "
            f"MiB  (master + {len(pids) - 1} workers: {each} MiB)")


def own_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def print_report(results: list[tuple[Planned, str]], elapsed: float, memory: list[str]) -> int:
    total = len(results)
    malformed = [outcome for _, outcome in results if outcome.startswith("MALFORMED")]
    well_formed = total - len(malformed)
    faulty = [(p, o) for p, o in results if p.fault]
    print(f"\nrequests sent            {total} in {elapsed:.1f}s ({total / elapsed:.0f}/s)")
    print(f"backend faults injected  {len(faulty)} ({100 * len(faulty) / max(total, 1):.1f}%)")
    print(f"answered well-formed     {well_formed}/{total} = {100 * well_formed / max(total, 1):.2f}%")
    print("\noutcomes, all requests:")
    for outcome, count in Counter(o for _, o in results).most_common():
        print(f"  {count:6d}  {outcome}")
    print("\nerrors by kind (injected fault -> what the client got):")
    by_fault: dict[str, Counter[str]] = {}
    for planned, outcome in faulty:
        mode = "stream" if planned.stream else "whole"
        by_fault.setdefault(f"{planned.fault} ({mode})", Counter())[outcome] += 1
    for fault in sorted(by_fault):
        cells = ", ".join(f"{outcome}: {count}" for outcome, count in by_fault[fault].most_common())
        print(f"  {fault:<38} {cells}")
    print("\nserver memory (gunicorn master + workers):")
    for line in memory:
        print("  " + line)
    return 0 if not malformed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--gguf-fallback", action="store_true", help="the packaged GGUF model as fallback (slower)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    plans = [plan_request(rng) for _ in range(args.requests)]
    warmup = min(200, len(plans) // 10)
    with FakeUpstream() as upstream, reserve_closed_port() as closed_port, \
            tempfile.TemporaryDirectory(prefix="lemoe-soak-") as tmp:
        for fault, (_, knobs) in FAULTS.items():
            if knobs:
                upstream.behave(f"{fault}-model", **knobs)
        project = Path(tmp)
        config = write_project(project, upstream.url, f"http://127.0.0.1:{closed_port}", args.workers,
                               args.gguf_fallback)
        server = start_lemoe(config, project, ready_path="/")
        try:
            memory = [memory_line("start", server)]
            print(f"LeMoE on {server.url}, {args.workers} workers; {len(plans)} requests, "
                  f"{args.concurrency} at a time, {FAULT_SHARE:.0%} to failing backends")
            deadline = time.monotonic() + args.max_seconds
            started = time.monotonic()
            results = run_requests(server.url, plans[:warmup], args.concurrency, deadline, lambda n: None)
            memory.append(memory_line("after warm-up", server))

            def progress(n: int) -> None:
                if n % 500 == 0:
                    print(f"  {warmup + n} requests ...", flush=True)

            results += run_requests(server.url, plans[warmup:], args.concurrency, deadline, progress)
            elapsed = time.monotonic() - started
            memory.append(memory_line("end", server))
        finally:
            server.stop()
    return print_report(results, elapsed, memory)


if __name__ == "__main__":
    sys.exit(main())
