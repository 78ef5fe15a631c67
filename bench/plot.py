"""Draw bench/figures.png from bench/results.json (needs matplotlib; run with the bench venv).

    /work/bench_venv/bin/python bench/plot.py bench/results.json bench/figures.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PROXIES = ("bare relay", "lemoe", "litellm proxy")
COLORS = {"direct": "#999999", "bare relay": "#4c72b0", "lemoe": "#55a868", "litellm proxy": "#c44e52"}


def case_label(case: dict[str, Any]) -> str:
    return f"{case['route']}\n{'stream' if case['stream'] else 'JSON'}"


def draw_bars(ax: Any, cases: list[dict[str, Any]], names: tuple[str, ...], field: str) -> None:
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [c["results"].get(name, {}).get(field, 0.0) for c in cases]
        positions = [x + (i - (len(names) - 1) / 2) * width for x in range(len(cases))]
        bars = ax.bar(positions, values, width, label=name, color=COLORS[name])
        ax.bar_label(bars, fmt="%.0f" if field == "rps" else "%.1f", fontsize=7)
    ax.set_xticks(range(len(cases)), [case_label(c) for c in cases])
    ax.legend(fontsize=8)


def main(results_path: str, out_path: str) -> int:
    results = json.loads(Path(results_path).read_text())
    cases = results["overhead"]["cases"]
    c1 = [c for c in cases if c["concurrency"] == 1]
    c16 = [c for c in cases if c["concurrency"] == 16]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    draw_bars(left, c1, PROXIES, "added_ms")
    left.set_title("Added latency at concurrency 1 (ms, lower is better)")
    left.set_ylabel("p50 minus direct p50 (ms)")
    # The stand-in upstream alone answers tens of thousands per second; drawn next to the
    # proxies it would flatten their bars, so it is left to the tables.
    draw_bars(right, c16, PROXIES, "rps")
    right.set_title(f"Throughput at concurrency 16, {results.get('overhead', {}).get('workers', 1)} worker(s) (req/s, higher is better)")
    right.set_ylabel("requests per second")
    fig.suptitle(f"LeMoE vs a bare Flask relay vs LiteLLM's proxy, same loopback upstream, 20 pieces "
                 f"({results['date']}, {results['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
