"""(a) How long one routing decision takes, for the router each configuration builds.

The router is built exactly as the server builds it (`modules.router_factory.build_router`)
from each config file (default: config/config.json, then the example expert sets in
config/examples/), and called in-process: no HTTP, no logging.

    venv/bin/python -m bench.bench_routing [--config config/config.json ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.load import percentile
from bench.servers import REPO
from modules.config_manager import load_config
from modules.decision_cache import DecisionCache
from modules.errors import ConfigError
from modules.router_factory import build_router

# About 40 characters, as typed in a chat box.
SHORT_HIT = "Write a python function to sort a list."
SHORT_MISS = "Make it shorter and more polite, please."
PREVIOUS_TURN = "Escribe una funcion en python que ordene una lista"
# About 1,200 characters: a pasted paragraph whose request comes at the end.
_FILLER = ("Yesterday we talked about the quarterly plan, the budget for the new office, the "
           "schedule of the team offsite and who should book the rooms for the visitors. ")


def long_text(tail: str, size: int = 1200) -> str:
    body = (_FILLER * (size // len(_FILLER) + 1))[: size - len(tail) - 1]
    return f"{body} {tail}"


def queries() -> dict[str, list[str]]:
    """The conversations routed: user turns, oldest first."""
    return {
        "short, keyword hit (40 ch)": [SHORT_HIT],
        "short, follow-up -> cascade (40 ch)": [PREVIOUS_TURN, SHORT_MISS],
        "long, keyword at the end (1,200 ch)": [long_text("Now translate all of that into French.")],
        "long, no keyword (1,200 ch)": [long_text("What do you think about it?")],
    }


def routing_configs() -> list[Path]:
    """The default configuration, then the larger example expert sets shipped in config/examples."""
    return [REPO / "config" / "config.json", *sorted((REPO / "config" / "examples").glob("*_config.json"))]


def time_decisions(route: Any, turns: list[str], max_calls: int, max_seconds: float) -> tuple[list[float], Any]:
    """Per-call seconds of `route(turns)`, after a few warm-up calls."""
    decision = None
    for _ in range(20):
        decision = route(turns)
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(samples) < max_calls and time.perf_counter() < deadline:
        started = time.perf_counter()
        route(turns)
        samples.append(time.perf_counter() - started)
    return samples, decision


def run(config_paths: list[Path], max_calls: int = 5000, max_seconds: float = 3.0) -> list[dict[str, Any]]:
    rows = []
    for path in config_paths:
        started = time.perf_counter()
        try:
            config = load_config(path)
            router = build_router(config)
        except ConfigError as exc:
            # The classifier example needs a model folder that `main.py train` makes first.
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"(a) {path.name}: not measured ({first_line})", file=sys.stderr)
            continue
        build_ms = (time.perf_counter() - started) * 1000
        for name, turns in queries().items():
            samples, decision = time_decisions(router.route, turns, max_calls, max_seconds)
            # The same conversation again through the server's decision cache (every call a hit).
            cached, _ = time_decisions(DecisionCache(router, config.router.decision_cache_size).route,
                                       turns, max_calls, max_seconds)
            rows.append({
                "config": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                "experts": len(config.experts),
                "router": type(router).__name__,
                "build_ms": round(build_ms, 1),
                "query": name,
                "calls": len(samples),
                "p50_us": round(percentile(samples, 50) * 1e6, 1),
                "p99_us": round(percentile(samples, 99) * 1e6, 1),
                "cached_p50_us": round(percentile(cached, 50) * 1e6, 1),
                "cached_p99_us": round(percentile(cached, 99) * 1e6, 1),
                "decision": f"{decision.label} ({decision.method})",
            })
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("(a) routing decision latency, in-process")
    print(f"{'router (config, experts)':<52} {'query':<38} {'p50':>9} {'p99':>9} {'cached p50':>11} {'p99':>9}  decision")
    for row in rows:
        who = f"{row['router']} ({Path(row['config']).name}, {row['experts']})"
        print(f"{who:<52} {row['query']:<38} {row['p50_us']:>7.1f}us {row['p99_us']:>7.1f}us "
              f"{row['cached_p50_us']:>9.1f}us {row['cached_p99_us']:>7.1f}us  {row['decision']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", type=Path, help="config.json whose router to time (repeatable)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    rows = run([p.resolve() for p in args.config or routing_configs()])
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
