"""Held-out rows: a stratified split, the threshold table, and the threshold it proposes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from modules.held_out import (
    THRESHOLDS,
    chosen_threshold,
    held_out_split,
    threshold_table,
)

CLASSES = ["banking", "oos", "travel"]


def test_each_label_gives_its_share_and_keeps_training_rows() -> None:
    labels = ["banking"] * 100 + ["travel"] * 50 + ["oos"] * 10 + ["rare"] * 2 + ["single"]
    train, held = held_out_split(labels, 0.2, seed=0)
    assert sorted(train + held) == list(range(len(labels)))
    held_counts = Counter(labels[i] for i in held)
    assert held_counts == {"banking": 20, "travel": 10, "oos": 2, "rare": 1}
    assert {labels[i] for i in train} == set(labels)
    assert held_out_split(labels, 0.2, seed=0) == (train, held)
    assert held_out_split(labels, 0.2, seed=1)[1] != held


def test_no_share_holds_nothing_out_and_a_bad_share_is_refused() -> None:
    labels = ["a", "b"] * 5
    assert held_out_split(labels, 0.0, seed=0) == (list(range(10)), [])
    for share in (-0.1, 1.0):
        with pytest.raises(ValueError, match="held-out share"):
            held_out_split(labels, share, seed=0)


def table_row(table: list[dict], threshold: float) -> dict:
    return next(row for row in table if row["threshold"] == threshold)


def test_the_table_follows_the_routers_first_step() -> None:
    probabilities = np.array([
        [0.90, 0.05, 0.05],  # banking, sure: right at every threshold up to 0.9
        [0.50, 0.10, 0.40],  # banking, unsure: right below 0.55
        [0.30, 0.45, 0.25],  # oos wins outright: fallback at any threshold
        [0.10, 0.20, 0.70],  # an oos row that looks like travel: caught only from 0.75 up
    ])
    table = threshold_table(probabilities, [0, 0, 1, 1], CLASSES, ["oos"])
    assert [row["threshold"] for row in table] == list(THRESHOLDS)
    assert table_row(table, 0.0) == {"threshold": 0.0, "accuracy": 0.75, "fallback_precision": 1.0,
                                     "fallback_recall": 0.5}
    assert table_row(table, 0.75) == {"threshold": 0.75, "accuracy": 0.75, "fallback_precision": 0.6667,
                                      "fallback_recall": 1.0}
    assert table_row(table, 0.95)["accuracy"] == 0.5 and table_row(table, 0.95)["fallback_recall"] == 1.0


def test_classes_naming_no_specialist_add_up_to_the_fallback_expert() -> None:
    # Two "none of these" classes at 0.3 each beat banking's 0.4 together.
    probabilities = np.array([[0.4, 0.3, 0.3]])
    table = threshold_table(probabilities, [1], ["banking", "oos", "chitchat"], ["oos", "chitchat"])
    assert table_row(table, 0.0)["fallback_recall"] == 1.0


def test_without_fallback_rows_there_is_no_recall() -> None:
    table = threshold_table(np.array([[0.8, 0.2], [0.3, 0.7]]), [0, 1], ["a", "b"], ["oos"])
    assert all(row["fallback_recall"] is None for row in table)
    assert chosen_threshold(table)["threshold"] == 0.0


def rows(*specs: tuple[float, float, float]) -> list[dict]:
    return [{"threshold": t, "accuracy": a, "fallback_precision": 0.5, "fallback_recall": r} for t, a, r in specs]


def test_the_highest_threshold_within_the_accuracy_budget_is_proposed() -> None:
    table = rows((0.0, 0.95, 0.4), (0.5, 0.945, 0.6), (0.7, 0.93, 0.8), (0.9, 0.90, 1.0))
    assert chosen_threshold(table)["threshold"] == 0.7
    assert chosen_threshold(table, accuracy_budget=0.01)["threshold"] == 0.5
    assert chosen_threshold(table, accuracy_budget=0.0)["threshold"] == 0.0


def test_the_budget_counts_from_the_most_accurate_threshold_wherever_it_is() -> None:
    table = rows((0.0, 0.90, 0.2), (0.3, 0.95, 0.4), (0.6, 0.94, 0.6), (0.8, 0.80, 1.0))
    assert chosen_threshold(table)["threshold"] == 0.6
