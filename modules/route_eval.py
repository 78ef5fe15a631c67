"""Measure a router on labelled rows (calibration.py learns from them).

Rows are JSONL objects `{"text": ..., "label": ..., "context": [earlier user messages]?}`. A
label that names no configured expert is expected to reach the fallback expert. Everything here
is a function of rows and decisions, so the CLI (`main.py eval` / `calibrate`) only adds file
handling, a progress bar and printing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modules.chat_types import RouteDecision

Row = Mapping[str, Any]
RouteFn = Callable[[Sequence[str]], RouteDecision]
Progress = Callable[[int, int], None]
# Misroutes listed in the report, most confident first (the ones that hurt most).
WORST_MISROUTES = 10


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Labelled rows from a JSONL file; blank lines are skipped, a bad row names its line."""
    rows = []
    # A JSONL record ends at "\n" only. str.splitlines() (and universal newlines, which turn a
    # lone "\r" into one) would also cut a row at U+2028, U+0085 or a form feed inside its text;
    # a "\r" left before the "\n" is JSON whitespace. strict=False takes raw control characters
    # inside strings, which some writers emit unescaped.
    for number, line in enumerate(path.read_bytes().decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, strict=False)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"{path}:{number}: {problem}")
        rows.append(row)
    return rows


def _row_problem(row: Any) -> str:
    if (
        not isinstance(row, dict)
        or not isinstance(row.get("text"), str)
        or not isinstance(row.get("label"), str)
    ):
        return "a row needs string fields 'text' and 'label'"
    context = row.get("context", [])
    if not isinstance(context, list) or not all(isinstance(c, str) for c in context):
        return "'context' must be a list of strings"
    return ""


def user_texts_from_row(row: Row) -> list[str]:
    """The conversation a row stands for: its context turns, then its text."""
    return [*row.get("context", []), row["text"]]


def expected_label(
    label: str, expert_labels: Iterable[str], fallback_label: str
) -> str:
    """The expert a row should reach: its label if an expert has it, else the fallback."""
    return label if label in set(expert_labels) else fallback_label


@dataclass(frozen=True)
class Routed:
    """One row's outcome."""

    text: str
    expected: str
    decision: RouteDecision
    latency_ms: float


def route_rows(
    rows: Sequence[Row],
    route: RouteFn,
    expert_labels: Sequence[str],
    fallback_label: str,
    progress: Progress | None = None,
) -> list[Routed]:
    """Route every row, timing each decision."""
    routed = []
    for i, row in enumerate(rows):
        texts = user_texts_from_row(row)
        start = time.perf_counter()
        decision = route(texts)
        elapsed = (time.perf_counter() - start) * 1000.0
        routed.append(
            Routed(
                row["text"],
                expected_label(row["label"], expert_labels, fallback_label),
                decision,
                elapsed,
            )
        )
        if progress is not None:
            progress(i + 1, len(rows))
    return routed


def precision_recall_f1(
    expected: Sequence[str], predicted: Sequence[str], label: str
) -> dict[str, float]:
    """Precision, recall, F1 and support of one label (0.0 where undefined)."""
    tp = sum(1 for e, p in zip(expected, predicted) if e == label and p == label)
    n_pred = sum(1 for p in predicted if p == label)
    support = sum(1 for e in expected if e == label)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def confusion_matrix(
    expected: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> list[list[int]]:
    """Counts by [expected][predicted], in the order of `labels`."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for e, p in zip(expected, predicted):
        matrix[index[e]][index[p]] += 1
    return matrix


def percentile(values: Sequence[float], q: float) -> float:
    return (
        float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0
    )


def accuracy_report(
    expected: Sequence[str],
    predicted: Sequence[str],
    labels: Sequence[str],
    fallback_label: str,
) -> dict[str, Any]:
    """n, accuracy, macro-F1, per-expert P/R/F1/support, fallback P/R and the confusion matrix.

    Macro-F1 averages over the labels that occur among the expected or predicted ones, so an
    expert nobody asked for and nothing was sent to does not count as a zero.
    """
    n = len(expected)
    per_expert = {
        label: precision_recall_f1(expected, predicted, label) for label in labels
    }
    present = [
        label for label in labels if per_expert[label]["support"] or label in predicted
    ]
    fallback = per_expert[fallback_label]
    return {
        "n": n,
        "accuracy": sum(1 for e, p in zip(expected, predicted) if e == p) / n
        if n
        else 0.0,
        "macro_f1": float(np.mean([per_expert[label]["f1"] for label in present]))
        if present
        else 0.0,
        "per_expert": per_expert,
        "fallback": {"precision": fallback["precision"], "recall": fallback["recall"]},
        "labels": list(labels),
        "confusion": confusion_matrix(expected, predicted, labels),
    }


def eval_report(
    routed: Sequence[Routed],
    labels: Sequence[str],
    fallback_label: str,
    keyword_only: Sequence[Routed] | None = None,
) -> dict[str, Any]:
    """The full report for `main.py eval`: metrics, latency, baselines and worst misroutes."""
    expected = [r.expected for r in routed]
    predicted = [r.decision.label for r in routed]
    report = accuracy_report(expected, predicted, labels, fallback_label)
    latencies = [r.latency_ms for r in routed]
    report["latency_ms"] = {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }
    report["methods"] = {
        m: sum(1 for r in routed if r.decision.method == m)
        for m in sorted({r.decision.method for r in routed})
    }
    baselines = {
        "always_fallback": accuracy_report(
            expected, [fallback_label] * len(expected), labels, fallback_label
        )["accuracy"]
    }
    if keyword_only is not None:
        kw = accuracy_report(
            expected, [r.decision.label for r in keyword_only], labels, fallback_label
        )
        baselines["keyword_only"] = kw["accuracy"]
        baselines["keyword_only_macro_f1"] = kw["macro_f1"]
    report["baselines"] = baselines
    wrong = sorted(
        (r for r in routed if r.decision.label != r.expected),
        key=lambda r: -r.decision.score,
    )
    report["worst_misroutes"] = [
        {
            "text": r.text[:200],
            "expected": r.expected,
            "got": r.decision.label,
            "score": round(r.decision.score, 4),
            "method": r.decision.method,
        }
        for r in wrong[:WORST_MISROUTES]
    ]
    return report
