"""Where one worker's CPU goes on the request and stream path: a sampling profile (py-spy).

Starts the stand-in upstream (20 pieces per answer) and LeMoE on the default router with one
worker, sends streamed (or plain JSON) chat requests for `--seconds` from `--concurrency`
threads, each with its own text, and samples the worker with py-spy. Prints the share of
samples per stage of the path (parse, guards, route, upstream read, event conversion,
formatting, write, metrics, logging, gevent/gunicorn) from the innermost project or library
frame of each sample. py-spy is not a project dependency: pass the binary of a venv of its own.

    venv/bin/python -m bench.profile_path --py-spy /path/to/py-spy [--stream] [--api openai|ollama]
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.load import Target, run_load
from bench.servers import start_lemoe, start_upstream, write_lemoe_project

QUERY = "write a python function that adds two numbers @@N@@"
# First matching (file substring, function substring) of a sample's stack, innermost first,
# decides its stage. Order matters: the most specific first.
STAGES = (
    ("metrics", ("modules/ops/metrics.py", "prometheus_client")),
    ("logging", ("modules/logger.py", "logging/__init__.py")),
    ("route (router, encoder)", ("embedding_router.py", "generic_router.py", "encoders.py", "use_onnx.py",
                                 "encode_batching.py", "decision_cache.py", "route_input.py", "router_factory.py",
                                 "paged_table.py", "rapidfuzz", "onnxruntime", "numpy")),
    ("upstream read (HTTP client)", ("http_backends.py", "urllib3", "http/client.py")),
    ("event conversion + formatting (protocol)", ("modules/protocol/",)),
    ("runner", ("expert_runner.py", "expert_health.py", "backend_registry.py")),
    ("parse + guards (Flask, werkzeug, limits)", ("modules/guards/", "flask", "werkzeug", "flask_limiter",
                                                   "limits/", "http_views.py", "services.py", "capabilities.py")),
    ("json", ("json/",)),
    ("write + server loop (gunicorn, gevent)", ("gunicorn", "gevent", "greenlet", "socket.py", "ssl.py",
                                                "modules/ops/gevent_worker.py")),
)


def stage_of(frames: list[str]) -> str:
    for frame in frames:
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--py-spy", required=True, help="py-spy binary (a venv of its own)")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--api", choices=("openai", "ollama"), default="openai")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=12, help="innermost frames to list")
    args = parser.parse_args(argv)
    upstream = start_upstream(20)
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        lemoe = start_lemoe(write_lemoe_project(project, upstream.url, threads=256, workers=1), project)
        try:
            worker = subprocess.run(["pgrep", "-P", str(lemoe.process.pid)], capture_output=True, text=True,
                                    check=True).stdout.split()[0]
            if args.api == "openai":
                path, body = "/v1/chat/completions", {"model": "lemoe", "stream": args.stream,
                                                       "messages": [{"role": "user", "content": QUERY}]}
            else:
                path, body = "/api/chat", {"model": "lemoe", "stream": args.stream,
                                           "messages": [{"role": "user", "content": QUERY}]}
            target = Target(lemoe.url, path, json.dumps(body).encode(), (b"tok19",))
            raw = project / "profile.txt"
            spy = subprocess.Popen([args.py_spy, "record", "--pid", worker, "--rate", "250", "--format", "raw",
                                    "--output", str(raw), "--duration", str(int(args.seconds)), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result: dict[str, object] = {}
            load = threading.Thread(target=lambda: result.update(
                r=run_load(target, concurrency=args.concurrency, max_requests=10**9, max_seconds=args.seconds)))
            load.start()
            load.join()
            spy.wait(timeout=args.seconds + 30)
            counts: collections.Counter[str] = collections.Counter()
            leaves: collections.Counter[str] = collections.Counter()
            for line in raw.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                frames = stack.split(";")[::-1]  # innermost first
                counts[stage_of(frames)] += int(n)
                leaves[frames[0]] += int(n)
            total = sum(counts.values()) or 1
            done = result["r"]
            print(f"{args.api} {'stream' if args.stream else 'JSON'}, c={args.concurrency}, {args.seconds:.0f} s: "
                  f"{getattr(done, 'count', '?')} answers, {getattr(done, 'errors', '?')} errors, {total} samples of the worker")
            for stage, n in counts.most_common():
                print(f"  {stage:<45} {n / total:6.1%}")
            print("innermost frames:")
            for frame, n in leaves.most_common(args.top):
                print(f"  {n / total:6.1%}  {frame}")
        finally:
            lemoe.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
