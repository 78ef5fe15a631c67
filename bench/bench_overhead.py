"""(b) What LeMoE adds to a request, next to a bare Flask relay and LiteLLM's proxy.

Every contender forwards to the same zero-latency stand-in upstream (its own process), which
answers 20 pieces. "Added" is a contender's median latency minus the median of calling the
upstream directly, at concurrency 1; at concurrency 16 the figure is requests per second.
Each case also reports the CPU time the server's processes spent per request (user + system,
all processes and threads), which is steadier than wall-clock figures on a shared machine.

The load comes from `wrk` when it is installed (bench/wrk_load.py), else from bench/load.py's
Python threads, which on 2 cores eat much of the CPU the contenders need. Every request has its
own text ("... (17)"), so LeMoE routes each one; its answers must carry the intended expert in
X-LeMoE-Expert, or they count as errors.

    venv/bin/python -m bench.bench_overhead [--litellm PATH] [--workers N] [--keyword-router]
        [--upstream fast|werkzeug] [--load wrk|python]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.footprint import tree_cpu_seconds, tree_pss_mib, tree_rss_mib
from bench.load import PLACEHOLDER, LoadResult, Target, run_load
from bench.servers import (
    OLLAMA_MODEL,
    OPENAI_MODEL,
    UPSTREAMS,
    Server,
    find_litellm,
    litellm_version,
    start_bare_relay,
    start_lemoe,
    start_litellm,
    start_upstream,
    write_lemoe_project,
)
from bench.wrk_load import THREADS as WRK_THREADS
from bench.wrk_load import WrkResult, run_wrk, wrk_binary

TOKENS = 20
# "poem" -> writer (OpenAI backend), "python" -> coder (Ollama), by either router; every request
# gets its own number appended.
OPENAI_QUERY = "write a short poem about the sea"
OLLAMA_QUERY = "write a python function that adds two numbers"
EXPERT_FOR_ROUTE = {"openai": "writer", "ollama": "coder"}
LAST_PIECE = f"tok{TOKENS - 1}".encode()
ROUTES = ("openai", "ollama")
CONTENDERS = ("direct", "bare relay", "lemoe", "litellm proxy")


@dataclass(frozen=True)
class Budget:
    """How long each measurement may run: bounded in count and in time."""

    warmup_requests: int = 30
    requests_c1: int = 400
    seconds_c1: float = 8.0
    warmup_seconds_c16: float = 1.5
    seconds_c16: float = 6.0
    # wrk runs for whole seconds, not a request count.
    wrk_warmup_seconds: float = 1.0
    wrk_seconds_c1: float = 4.0
    wrk_warmup_seconds_c16: float = 2.0


def chat_body(model: str, query: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": query}], "stream": stream}).encode()


def expected_pieces(path: str, stream: bool) -> tuple[bytes, ...]:
    """The last answer piece, and for a stream its protocol's end marker."""
    if not stream:
        return (LAST_PIECE,)
    return (LAST_PIECE, b"[DONE]" if path.startswith("/v1/") else b'"done":true')


def target_for(contender: str, base_url: str, route: str, stream: bool) -> Target:
    """The request each contender gets for one case: same question, same upstream, same answer.

    LeMoE's answers must also name the expert the question belongs to.
    """
    query = f"{OPENAI_QUERY if route == 'openai' else OLLAMA_QUERY} ({PLACEHOLDER})"
    header = None
    if contender == "lemoe":
        model, path = "lemoe", ("/v1/chat/completions" if route == "openai" else "/api/chat")
        header = ("X-LeMoE-Expert", EXPERT_FOR_ROUTE[route])
    elif contender == "litellm proxy":
        # LiteLLM's proxy speaks OpenAI to its clients only; its "ollama" case is an OpenAI
        # request that it forwards to the upstream's Ollama /api/chat.
        model, path = ("writer" if route == "openai" else "coder"), "/v1/chat/completions"
    else:
        model = OPENAI_MODEL if route == "openai" else OLLAMA_MODEL
        path = "/v1/chat/completions" if route == "openai" else "/api/chat"
    return Target(base_url, path, chat_body(model, query, stream), expected_pieces(path, stream), header)


def check_answer(target: Target) -> None:
    """One request first, so a misconfigured (or misrouting) contender fails loudly."""
    result = run_load(target, concurrency=1, max_requests=1, max_seconds=30)
    if result.errors:
        raise RuntimeError(f"{target.base_url}{target.path}: {result.first_error}")


def pick_load_generator(choice: str) -> str:
    """"wrk" or "python"; "auto" is wrk when installed."""
    if choice == "auto":
        return "wrk" if wrk_binary() else "python"
    if choice == "wrk" and not wrk_binary():
        raise SystemExit("--load wrk: wrk is not installed (apt-get install wrk)")
    return choice


def describe_load_generator(kind: str) -> str:
    if kind == "wrk":
        return f"wrk -t{WRK_THREADS} ({wrk_binary()}), bench/wrk_chat.lua"
    return "bench/load.py (Python threads)"


Result = LoadResult | WrkResult


def measure(target: Target, concurrency: int, budget: Budget, pid: int,
            load: str = "python") -> tuple[Result, float, float]:
    """The load result, and the server's and the load generator's CPU milliseconds per answered request."""
    if load == "wrk":
        warmup = budget.wrk_warmup_seconds if concurrency == 1 else budget.wrk_warmup_seconds_c16
        seconds = budget.wrk_seconds_c1 if concurrency == 1 else budget.seconds_c16
        run_wrk(target, concurrency=concurrency, seconds=warmup)
        cpu_before = tree_cpu_seconds(pid)
        wrk_result = run_wrk(target, concurrency=concurrency, seconds=seconds)
        result: Result = wrk_result
        client_cpu = wrk_result.client_cpu_s
    elif concurrency == 1:
        run_load(target, concurrency=1, max_requests=budget.warmup_requests, max_seconds=10)
        cpu_before, client_before = tree_cpu_seconds(pid), _own_cpu_seconds()
        result = run_load(target, concurrency=1, max_requests=budget.requests_c1, max_seconds=budget.seconds_c1)
        client_cpu = _own_cpu_seconds() - client_before
    else:
        run_load(target, concurrency=concurrency, max_requests=10**9, max_seconds=budget.warmup_seconds_c16)
        cpu_before, client_before = tree_cpu_seconds(pid), _own_cpu_seconds()
        result = run_load(target, concurrency=concurrency, max_requests=10**9, max_seconds=budget.seconds_c16)
        client_cpu = _own_cpu_seconds() - client_before
    cpu_ms = (tree_cpu_seconds(pid) - cpu_before) * 1000 / max(1, result.count)
    return result, cpu_ms, client_cpu * 1000 / max(1, result.count)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize(result: Result, cpu_ms: float, client_cpu_ms: float = math.nan) -> dict[str, Any]:
    figures = {
        "cpu_ms_per_request": round(cpu_ms, 2),
        "count": result.count,
        "errors": result.errors,
        "first_error": result.first_error,
        "p50_ms": round(result.percentile_ms(50), 3),
        "p99_ms": round(result.percentile_ms(99), 3),
        "rps": round(result.per_second, 1),
    }
    # What the load generator spent, to show it is not what limits the figures.
    figures["client_cpu_ms_per_request"] = round(client_cpu_ms, 3)
    return figures


def start_contenders(upstream_url: str, workdir: Path, litellm_bin: Path | None, workers: int,
                     threads: int, keyword_router: bool = False) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    try:
        servers["bare relay"] = start_bare_relay(upstream_url, workdir, threads=threads, workers=workers)
        project = workdir / "lemoe"
        config = write_lemoe_project(project, upstream_url, threads=threads, workers=workers,
                                     keyword_router=keyword_router)
        servers["lemoe"] = start_lemoe(config, project)
        if litellm_bin is not None:
            servers["litellm proxy"] = start_litellm(litellm_bin, upstream_url, workdir, workers=workers)
    except Exception:
        for server in servers.values():
            server.stop()
        raise
    return servers


def run(litellm_path: str | None = None, workers: int = 1, threads: int = 32,
        budget: Budget = Budget(), skip_litellm: bool = False, *, upstream_kind: str = "fast",
        load: str = "auto", keyword_router: bool = False) -> dict[str, Any]:
    """Measure every case on every contender; returns the figures (also printed)."""
    litellm_bin = None if skip_litellm else find_litellm(litellm_path)
    load = pick_load_generator(load)
    upstream = start_upstream(TOKENS, kind=upstream_kind)
    workdir = Path(tempfile.mkdtemp(prefix="lemoe-bench-"))
    figures: dict[str, Any] = {"cases": [], "servers": {}, "workers": workers, "threads": threads,
                               "litellm": str(litellm_bin) if litellm_bin else None,
                               "litellm_version": litellm_version(litellm_bin) if litellm_bin else None,
                               "load_generator": describe_load_generator(load),
                               "upstream": UPSTREAMS[upstream_kind],
                               "router": "keywords" if keyword_router else "default",
                               "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        servers = start_contenders(upstream.url, workdir, litellm_bin, workers, threads, keyword_router)
        contenders = {"direct": upstream, **servers}
        try:
            for route in ROUTES:
                for stream in (False, True):
                    for concurrency in (1, 16):
                        figures["cases"].append(measure_case(contenders, route, stream, concurrency, budget, load))
                        print_case(figures["cases"][-1])
            for name, server in servers.items():
                figures["servers"][name] = {
                    "ready_seconds": round(server.ready_seconds, 2),
                    "rss_mib": round(tree_rss_mib(server.process.pid), 1),
                    "pss_mib": round(tree_pss_mib(server.process.pid), 1),
                }
        finally:
            for server in servers.values():
                server.stop()
    finally:
        upstream.stop()
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return figures


def measure_case(contenders: dict[str, Server], route: str, stream: bool, concurrency: int,
                 budget: Budget, load: str = "python") -> dict[str, Any]:
    """One case on every contender; "direct" is the upstream itself (its CPU is the upstream's)."""
    case: dict[str, Any] = {"route": route, "stream": stream, "concurrency": concurrency, "results": {}}
    for contender in CONTENDERS:
        server = contenders.get(contender)
        if server is None:
            continue
        target = target_for(contender, server.url, route, stream)
        check_answer(target)
        case["results"][contender] = summarize(*measure(target, concurrency, budget, server.process.pid, load))
    direct = case["results"]["direct"]["p50_ms"]
    for result in case["results"].values():
        result["added_ms"] = round(result["p50_ms"] - direct, 3)
    return case


def _cell(case: dict[str, Any], contender: str) -> str:
    result = case["results"].get(contender)
    if result is None:
        return "not measured"
    err = f" {result['errors']} ERR" if result["errors"] else ""
    cpu = f"cpu {result['cpu_ms_per_request']:.2f}"
    if case["concurrency"] == 1:
        if contender == "direct":
            return f"{result['p50_ms']:.2f} ms ({cpu}){err}"
        return f"+{result['added_ms']:.2f} ms (p99 {result['p99_ms']:.1f}, {cpu}){err}"
    return f"{result['rps']:.0f}/s (p99 {result['p99_ms']:.0f}, {cpu}){err}"


def print_case(case: dict[str, Any]) -> None:
    label = f"{case['route']:<6} {'stream' if case['stream'] else 'json  '} c={case['concurrency']:<2}"
    cells = " | ".join(f"{_cell(case, c):<31}" for c in CONTENDERS)
    print(f"{label} | {cells}", flush=True)


def describe_setup(load: str, upstream_kind: str, keyword_router: bool) -> str:
    return (f"load generator: {describe_load_generator(pick_load_generator(load))}; "
            f"upstream: {UPSTREAMS[upstream_kind]}; "
            f"LeMoE router: {'keywords only' if keyword_router else 'default (embedding)'}")


def print_header(setup: str = "") -> None:
    if setup:
        print(setup)
    print("(b) c=1: added latency (p50 minus direct p50, ms); c=16: requests/s; "
          "p99 in ms; cpu = server CPU ms per request")
    print(f"{'case':<18} | " + " | ".join(f"{c:<31}" for c in CONTENDERS), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--litellm", help="path of LiteLLM's `litellm` proxy command (default: /work/bench_venv/bin/litellm)")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn/uvicorn workers for every contender")
    parser.add_argument("--threads", type=int, default=32, help="gunicorn threads for LeMoE and the relay")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument("--keyword-router", action="store_true",
                        help="LeMoE routes on keywords only (router.model_path \"\") instead of the default router")
    parser.add_argument("--upstream", choices=sorted(UPSTREAMS), default="fast",
                        help="stand-in upstream: fast (bench/fast_upstream.py) or werkzeug (bench/upstream.py)")
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk (when installed, the default) or bench/load.py")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    print_header(describe_setup(args.load, args.upstream, args.keyword_router))
    figures = run(args.litellm, args.workers, args.threads, skip_litellm=args.skip_litellm,
                  upstream_kind=args.upstream, load=args.load, keyword_router=args.keyword_router)
    print(json.dumps(figures["servers"], indent=2))
    print(f"load average before {figures['load_average_before']}, after {figures['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
