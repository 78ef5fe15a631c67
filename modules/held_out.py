"""Rows a classifier is not trained on, and what they say about its confidence threshold.

`main.py train` keeps a stratified share of the rows out of training. They decide when training
stops, and they give every candidate `confidence_threshold` an accuracy and a fallback
precision / recall, measured on rows the model never saw, so that the threshold a config uses is
never chosen on the rows it is reported on.

The table follows the classifier router's first step (modules/decision_router.py): the classes
that name no specialist (`fallback_labels`, CLINC's `oos`) add up to the fallback expert; a
specialist wins when it is the most probable and reaches the threshold, anything else goes to
the fallback expert. The router's later steps (earlier turns, keywords) are not simulated:
`main.py eval` on the saved held-out rows measures the whole chain.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

THRESHOLDS = (*(round(0.05 * i, 2) for i in range(20)), 0.99)
# Held-out accuracy (share of the rows) that the proposed threshold may give up against the most
# accurate one, to send unsure questions to the fallback expert.
ACCURACY_BUDGET = 0.02


def held_out_split(labels: Sequence[str], share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): `share` of each label's rows held out, seeded.

    Every label keeps at least one training row, and a label with two or more rows gives at
    least one to the held-out part, so that each class is both learnt and measured.
    """
    if not 0 <= share < 1:
        raise ValueError("the held-out share must be at least 0 and below 1")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    held: list[int] = []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        count = 0 if share == 0 or len(rows) < 2 else min(len(rows) - 1, max(1, round(share * len(rows))))
        held.extend(rows[:count])
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def threshold_table(
    probabilities: np.ndarray, targets: Sequence[int], class_labels: Sequence[str], fallback_labels: Sequence[str]
) -> list[dict[str, Any]]:
    """Accuracy and fallback precision / recall at each of THRESHOLDS, on the held-out rows."""
    fallback = np.array([label in fallback_labels for label in class_labels])
    specialist_probs = np.where(fallback, -1.0, probabilities)
    best_specialist = specialist_probs.argmax(axis=1)
    best_probability = specialist_probs.max(axis=1)
    fallback_probability = probabilities[:, fallback].sum(axis=1) if fallback.any() else np.zeros(len(probabilities))
    targets_array = np.asarray(targets)
    expected_fallback = fallback[targets_array]
    table = []
    for threshold in THRESHOLDS:
        to_specialist = (best_probability > fallback_probability) & (best_probability >= threshold)
        correct = np.where(to_specialist, best_specialist == targets_array, expected_fallback)
        caught = int((~to_specialist & expected_fallback).sum())
        sent = int((~to_specialist).sum())
        table.append({
            "threshold": threshold,
            "accuracy": round(float(correct.mean()), 4),
            "fallback_precision": round(caught / sent, 4) if sent else 0.0,
            "fallback_recall": round(caught / int(expected_fallback.sum()), 4) if expected_fallback.any() else None,
        })
    return table


def chosen_threshold(table: Sequence[dict[str, Any]], accuracy_budget: float = ACCURACY_BUDGET) -> dict[str, Any]:
    """The highest threshold whose held-out accuracy stays within `accuracy_budget` of the best.

    Why not the lowest threshold that reaches a fallback recall target: the in-scope rows are
    many, so their held-out accuracy is a firm figure, but the out-of-scope rows are few and
    drawn from the same small pool as the trained ones, so their recall overstates the recall on
    new out-of-scope questions. On CLINC150 threshold 0 caught 80% of the 20 held-out `oos` rows
    and 49% of the validation split's 100. So the whole budget is spent on sending unsure
    questions to the fallback expert. Without out-of-scope rows, the most accurate threshold.
    """
    best_accuracy = max(row["accuracy"] for row in table)
    candidates = [row for row in table if row["accuracy"] >= best_accuracy - accuracy_budget]
    if candidates[0]["fallback_recall"] is None:
        return max(candidates, key=lambda row: (row["accuracy"], -row["threshold"]))
    return max(candidates, key=lambda row: row["threshold"])
