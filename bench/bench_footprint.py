"""(d) Memory of the whole server and time to ready, with the default configuration.

The checkout's config/config.json and experts.json are copied into a throw-away project folder
(so logs and statistics land there) and served by `api_server.py` under gunicorn, exactly as
`./start.sh` does. "Ready" is the first 200 from GET /ready (GET / on builds without /ready).
Memory is read idle, then after one request that the packaged GGUF fallback expert answers
(which loads the model).

    venv/bin/python -m bench.bench_footprint
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench.footprint import tree_pids, tree_pss_mib, tree_rss_mib
from bench.servers import REPO, start_lemoe

# No keyword of the default experts: the fallback (SmolLM2 GGUF) answers.
FALLBACK_QUESTION = "Hello! Say hi back in three words."


def copy_default_project(root: Path) -> Path:
    shutil.copytree(REPO / "config", root / "config", ignore=shutil.ignore_patterns("examples"))
    for folder in ("models", "data", "logs"):
        (root / folder).mkdir(exist_ok=True)
    return root / "config" / "config.json"


def ask_fallback(base_url: str) -> tuple[float, str]:
    """Seconds for one short answer from the fallback expert, and which expert answered."""
    body: dict[str, Any] = {"model": "lemoe", "stream": False, "options": {"num_predict": 8},
            "messages": [{"role": "user", "content": FALLBACK_QUESTION}]}
    started = time.perf_counter()
    response = requests.post(base_url + "/api/chat", json=body, timeout=120)
    response.raise_for_status()
    return time.perf_counter() - started, response.headers.get("X-LeMoE-Expert", "?")


def run() -> dict[str, Any]:
    project = Path(tempfile.mkdtemp(prefix="lemoe-footprint-"))
    config = copy_default_project(project)
    server = start_lemoe(config, project)
    try:
        pid = server.process.pid
        time.sleep(1.0)  # let the workers finish their imports before reading memory
        figures: dict[str, Any] = {
            "ready_seconds": round(server.ready_seconds, 2),
            "ready_path": server.extra.get("ready_path", "?"),
            "processes": len(tree_pids(pid)),
            "idle_rss_mib": round(tree_rss_mib(pid), 1),
            "idle_pss_mib": round(tree_pss_mib(pid), 1),
        }
        seconds, expert = ask_fallback(server.url)
        figures.update({
            "fallback_answer_seconds": round(seconds, 2),
            "fallback_expert": expert,
            "loaded_rss_mib": round(tree_rss_mib(pid), 1),
            "loaded_pss_mib": round(tree_pss_mib(pid), 1),
        })
    finally:
        server.stop()
        shutil.rmtree(project, ignore_errors=True)
    return figures


def print_figures(figures: dict[str, Any]) -> None:
    print("(d) default configuration: start-up and memory of the whole server (gunicorn master + workers)")
    print(f"ready in {figures['ready_seconds']} s (GET {figures['ready_path']}), {figures['processes']} processes")
    print(f"idle: RSS {figures['idle_rss_mib']} MiB, PSS {figures['idle_pss_mib']} MiB")
    print(f"after one answer from '{figures['fallback_expert']}' ({figures['fallback_answer_seconds']} s, GGUF loaded): "
          f"RSS {figures['loaded_rss_mib']} MiB, PSS {figures['loaded_pss_mib']} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = run()
    print_figures(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
