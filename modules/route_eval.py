"""Measure a router on labelled rows, and calibrate the embedding router on them.

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
from modules.embedding_router import (
    EmbeddingRouter,
    Readout,
    gate_probabilities,
    readout_features,
    readout_to_json,
    softmax,
)

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


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` found: a read-out, the threshold to use with it, and how it did."""

    readout: Readout
    confidence_threshold: float
    l2: float
    # Out-of-fold figures on the calibration rows (the read-out never saw the row it scored).
    oof_accuracy: float
    oof_fallback_recall: float


def fit_readout(
    features: np.ndarray,
    targets: np.ndarray,
    n_classes: int,
    l2: float,
    none_weight: float = 3.0,
    steps: int = 1500,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (Adam, L2), the last class being "none".

    Out-of-scope rows are rare in labelled sets yet are what the "none" class must learn, so
    they weigh `none_weight` times more than the others.
    """
    weights = np.zeros((features.shape[1], n_classes))
    bias = np.zeros(n_classes)
    onehot = np.eye(n_classes)[targets]
    sample_weight = np.where(targets == n_classes - 1, none_weight, 1.0)
    sample_weight /= sample_weight.sum()
    moments = [np.zeros_like(weights), np.zeros_like(bias)]
    squares = [np.zeros_like(weights), np.zeros_like(bias)]
    for t in range(1, steps + 1):
        grad_logits = (softmax(features @ weights + bias) - onehot) * sample_weight[
            :, None
        ]
        grads = [features.T @ grad_logits + l2 * weights, grad_logits.sum(axis=0)]
        for i, (param, grad) in enumerate(zip((weights, bias), grads)):
            moments[i] = 0.9 * moments[i] + 0.1 * grad
            squares[i] = 0.999 * squares[i] + 0.001 * grad * grad
            param -= (
                0.05
                * (moments[i] / (1 - 0.9**t))
                / (np.sqrt(squares[i] / (1 - 0.999**t)) + 1e-8)
            )
    return weights, bias


def decide(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Index of the chosen expert per row, or n_experts ("none") when the router would not accept."""
    experts = probs[:, :-1]
    best = experts.argmax(axis=1)
    confidence = experts.max(axis=1)
    accepted = (confidence >= threshold) & (confidence > probs[:, -1])
    chosen: np.ndarray = np.where(accepted, best, probs.shape[1] - 1)
    return chosen


def choose_threshold(
    probs: np.ndarray, targets: np.ndarray, target_fallback_recall: float
) -> tuple[float, float, float]:
    """The threshold with the best accuracy among those reaching the fallback recall target.

    Returns (threshold, accuracy, fallback recall). When no threshold reaches the target (or
    the rows have no out-of-scope example) the most accurate threshold is taken.
    """
    none = probs.shape[1] - 1
    is_none = targets == none
    candidates = []
    for threshold in np.round(np.arange(0.0, 0.951, 0.025), 3):
        chosen = decide(probs, float(threshold))
        accuracy = float((chosen == targets).mean())
        recall = float((chosen[is_none] == none).mean()) if is_none.any() else 1.0
        candidates.append(
            (recall >= target_fallback_recall, accuracy, recall, float(threshold))
        )
    _, accuracy, recall, threshold = max(candidates, key=lambda c: (c[0], c[1]))
    return threshold, accuracy, recall


def calibrate(
    router: EmbeddingRouter,
    rows: Sequence[Row],
    target_fallback_recall: float = 0.6,
    folds: int = 3,
    l2_grid: Sequence[float] = (1e-3, 1e-2),
    seed: int = 0,
) -> Calibration:
    """Fit the read-out and the confidence threshold on labelled rows.

    The threshold and the regularisation are chosen on out-of-fold predictions (a read-out
    fitted on all rows is nearly always sure of them, which says nothing about new queries),
    then the read-out is refitted on every row. Rows are scored by their own text: the cascade
    uses the same read-out on the joined context.
    """
    anchors = router.anchors
    labels = list(anchors.labels)
    none = len(labels)
    targets = np.array(
        [labels.index(r["label"]) if r["label"] in labels else none for r in rows]
    )
    queries = router.encode_queries([r["text"] for r in rows])
    features = readout_features(anchors, queries)
    # The router overrides the read-out where the configuration-only scoring rules a query
    # out; the threshold must be chosen on the probabilities the router will really use.
    base = router.standardized_probabilities(queries)
    gate = router.settings.calibrated_oos_gate
    fold_of = np.random.default_rng(seed).permutation(len(rows)) % folds
    # Ranked by (reaches the recall target, out-of-fold accuracy).
    best: tuple[bool, float, float, float, float] | None = (
        None  # (ok, accuracy, l2, threshold, recall)
    )
    for l2 in l2_grid:
        oof = np.zeros((len(rows), none + 1))
        for k in range(folds):
            train = fold_of != k
            weights, bias = fit_readout(features[train], targets[train], none + 1, l2)
            oof[~train] = softmax(features[~train] @ weights + bias)
        oof = gate_probabilities(oof, base, gate)
        threshold, accuracy, recall = choose_threshold(
            oof, targets, target_fallback_recall
        )
        candidate = (recall >= target_fallback_recall, accuracy, l2, threshold, recall)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    assert best is not None
    _, accuracy, l2, threshold, recall = best
    weights, bias = fit_readout(features, targets, none + 1, l2)
    return Calibration(
        Readout(weights, bias, anchors.fingerprint), threshold, l2, accuracy, recall
    )


def calibration_json(calibration: Calibration, labels: Sequence[str]) -> dict[str, Any]:
    """The calibration file's content (read back by the router's `calibration_file`)."""
    data = readout_to_json(calibration.readout, labels)
    data["confidence_threshold"] = calibration.confidence_threshold
    data["l2"] = calibration.l2
    data["oof_accuracy"] = round(calibration.oof_accuracy, 4)
    data["oof_fallback_recall"] = round(calibration.oof_fallback_recall, 4)
    return data


def calibrated_config(
    raw_config: Mapping[str, Any], calibration: Calibration, calibration_file: str
) -> dict[str, Any]:
    """A copy of config.json's content that uses the calibration (threshold and read-out file)."""
    config: dict[str, Any] = json.loads(json.dumps(raw_config))
    router = config.setdefault("router", {})
    router["confidence_threshold"] = calibration.confidence_threshold
    router["calibration_file"] = calibration_file
    return config
