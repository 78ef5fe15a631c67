"""Every LeMoE benchmark in one run, figures side by side, checked against the targets.

    venv/bin/python -m bench.run_all [--litellm /work/bench_venv/bin/litellm] [--plot-python PY]

Writes bench/results.json and, when a Python with matplotlib is given (or found in
/work/bench_venv), bench/figures.png. Loopback only; about five minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import bench_footprint, bench_overhead, bench_routing, bench_streams
from bench.servers import REPO, UPSTREAMS

BENCH = REPO / "bench"
DEFAULT_PLOT_PYTHON = Path("/work/bench_venv/bin/python")


def case(results: dict[str, Any], route: str, stream: bool, concurrency: int) -> dict[str, Any]:
    return next(c for c in results["overhead"]["cases"]
                if (c["route"], c["stream"], c["concurrency"]) == (route, stream, concurrency))


def target_checks(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each acceptance figure of the issue."""
    lemoe = {k: case(results, r, s, c)["results"]["lemoe"]
             for k, (r, s, c) in {"json": ("openai", False, 1), "stream": ("openai", True, 1),
                                  "ojson": ("ollama", False, 1), "ostream": ("ollama", True, 1),
                                  "c16": ("openai", False, 16), "oc16": ("ollama", False, 16)}.items()}
    added_json = max(lemoe["json"]["added_ms"], lemoe["ojson"]["added_ms"])
    added_stream = max(lemoe["stream"]["added_ms"], lemoe["ostream"]["added_ms"])
    rps = min(lemoe["c16"]["rps"], lemoe["oc16"]["rps"])
    streams = max(results["streams"], key=lambda row: row["threads"])
    footprint = results["footprint"]
    return [
        ("added latency, non-streaming, c=1 <= 5 ms", f"{added_json:.2f} ms", added_json <= 5),
        ("added latency, 20-chunk stream, c=1 <= 6 ms", f"{added_stream:.2f} ms", added_stream <= 6),
        ("non-streaming at c=16 >= 400 req/s", f"{rps:.1f} req/s", rps >= 400),
        ("256 concurrent streams, 0 errors", (f"{streams['held']} held, {streams['peak_open']} at once, "
                                              f"{streams['errors']} errors (threads={streams['threads']})"),
         streams["errors"] == 0 and streams["peak_open"] >= 256),
        ("RSS of the whole server <= 400 MB (default config)",
         f"{footprint['idle_rss_mib']} MiB idle, {footprint['loaded_rss_mib']} MiB with the GGUF loaded",
         footprint["loaded_rss_mib"] <= 400),
        ("ready <= 5 s", f"{footprint['ready_seconds']} s", footprint["ready_seconds"] <= 5),
    ]


def print_targets(checks: list[tuple[str, str, bool]]) -> None:
    print("\nTargets (issue 6)")
    for target, measured, met in checks:
        print(f"  [{'met' if met else 'MISSED'}] {target}: {measured}")


def plot(results_path: Path, python: Path | None) -> None:
    if python is None or not python.is_file():
        print("plot: no Python with matplotlib given (--plot-python); bench/figures.png not updated")
        return
    done = subprocess.run([str(python), str(BENCH / "plot.py"), str(results_path), str(BENCH / "figures.png")],
                          cwd=REPO, check=False)
    print("plot: bench/figures.png" if done.returncode == 0 else "plot: failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--litellm", help="LiteLLM's `litellm` proxy command (default: /work/bench_venv/bin/litellm)")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument("--workers", type=int, default=1, help="server workers for LeMoE, the relay and LiteLLM")
    parser.add_argument("--plot-python", type=Path, default=DEFAULT_PLOT_PYTHON,
                        help="a Python with matplotlib, to draw bench/figures.png")
    parser.add_argument("--upstream", choices=sorted(UPSTREAMS), default="fast",
                        help="stand-in upstream: fast (bench/fast_upstream.py) or werkzeug (bench/upstream.py)")
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator for (b): wrk when installed, else bench/load.py")
    parser.add_argument("--keyword-router", action="store_true", help="LeMoE routes on keywords only in (b) and (c)")
    parser.add_argument("--out", type=Path, default=BENCH / "results.json")
    args = parser.parse_args(argv)

    started = time.monotonic()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
        # Other work on the machine moves every wall-clock figure: keep the load next to them.
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    results["routing"] = bench_routing.run(bench_routing.routing_configs())
    bench_routing.print_rows(results["routing"])
    print()
    bench_overhead.print_header(bench_overhead.describe_setup(args.load, args.upstream, args.keyword_router))
    results["overhead"] = bench_overhead.run(args.litellm, args.workers, skip_litellm=args.skip_litellm,
                                             upstream_kind=args.upstream, load=args.load,
                                             keyword_router=args.keyword_router)
    print(f"start-up and memory after the load: {json.dumps(results['overhead']['servers'])}")
    if results["overhead"]["litellm"] is None:
        print("litellm proxy: not measured (no `litellm` command; pass --litellm PATH)")
    print()
    results["streams"] = bench_streams.run(upstream_kind=args.upstream, keyword_router=args.keyword_router)
    bench_streams.print_rows(results["streams"])
    print()
    results["footprint"] = bench_footprint.run()
    bench_footprint.print_figures(results["footprint"])
    checks = target_checks(results)
    results["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in checks]
    print_targets(checks)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nfigures written to {args.out} ({results['seconds']} s; load average before "
          f"{results['load_average_before']}, after {results['load_average_after']})")
    plot(args.out, args.plot_python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
