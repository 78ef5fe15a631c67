"""Eval report metrics on hand-made rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from modules.chat_types import RouteDecision
from modules.route_eval import (
    Routed,
    accuracy_report,
    confusion_matrix,
    eval_report,
    expected_label,
    precision_recall_f1,
    read_rows,
    route_rows,
    user_texts_from_row,
)

LABELS = ["fallback", "coding", "cooking"]


def _routed(
    expected: str, got: str, score: float = 0.5, latency: float = 1.0, text: str = "q"
) -> Routed:
    return Routed(
        text,
        expected,
        RouteDecision(LABELS.index(got), got, score, "embedding"),
        latency,
    )


def test_precision_recall_f1_by_hand() -> None:
    expected = ["coding", "coding", "cooking", "fallback"]
    predicted = ["coding", "cooking", "cooking", "coding"]
    # coding: tp 1, predicted 2, support 2 -> P 0.5, R 0.5, F1 0.5
    assert precision_recall_f1(expected, predicted, "coding") == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "support": 2,
    }
    # cooking: tp 1, predicted 2, support 1 -> P 0.5, R 1.0, F1 2/3
    cooking = precision_recall_f1(expected, predicted, "cooking")
    assert (
        cooking["precision"] == 0.5
        and cooking["recall"] == 1.0
        and cooking["f1"] == pytest.approx(2 / 3)
    )
    # fallback: never predicted -> P 0, R 0
    assert precision_recall_f1(expected, predicted, "fallback")["f1"] == 0.0


def test_accuracy_report_by_hand() -> None:
    expected = ["coding", "coding", "cooking", "fallback"]
    predicted = ["coding", "cooking", "cooking", "fallback"]
    report = accuracy_report(expected, predicted, LABELS, "fallback")
    assert report["n"] == 4
    assert report["accuracy"] == 0.75
    # F1: fallback 1.0, coding 2/3 (P 1, R 0.5), cooking 2/3 (P 0.5, R 1).
    assert report["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 2 / 3) / 3)
    assert report["fallback"] == {"precision": 1.0, "recall": 1.0}
    assert report["per_expert"]["coding"]["support"] == 2
    assert report["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_macro_f1_skips_labels_nobody_asked_for_or_got() -> None:
    report = accuracy_report(["coding"], ["coding"], LABELS, "fallback")
    assert report["macro_f1"] == 1.0


def test_confusion_matrix_rows_are_expected_columns_predicted() -> None:
    assert confusion_matrix(["a", "a", "b"], ["b", "a", "b"], ["a", "b"]) == [
        [1, 1],
        [0, 1],
    ]


def test_labels_of_no_expert_expect_the_fallback() -> None:
    assert expected_label("oos", LABELS, "fallback") == "fallback"
    assert expected_label("adversarial", LABELS, "fallback") == "fallback"
    assert expected_label("coding", LABELS, "fallback") == "coding"


def test_rows_read_with_context(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"text": "make it shorter", "label": "cooking", "context": ["a cake recipe"]}\n\n{"text": "hi", "label": "oos"}\n'
    )
    rows = read_rows(path)
    assert [user_texts_from_row(r) for r in rows] == [
        ["a cake recipe", "make it shorter"],
        ["hi"],
    ]


# Characters str.splitlines() breaks a line at, though JSONL does not: a pasted prompt can hold
# any of them unescaped (json.dumps(..., ensure_ascii=False) leaves U+2028 and U+0085 raw).
LINE_BREAKS_INSIDE_TEXT = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\r"]


def test_a_row_is_one_line_whatever_its_text_holds(tmp_path: Path) -> None:
    texts = [f"before{ch}after" for ch in LINE_BREAKS_INSIDE_TEXT]
    body = "".join(
        '{"text": "' + text + '", "label": "x"}' + ("\r\n" if i % 2 else "\n")
        for i, text in enumerate(texts)
    )
    path = tmp_path / "rows.jsonl"
    path.write_bytes(body.encode("utf-8"))
    rows = read_rows(path)
    assert [row["text"] for row in rows] == texts
    assert all(row["label"] == "x" for row in rows)


def test_a_bad_row_after_an_odd_character_keeps_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"text": "a\u2028b\x0cc", "label": "x"}\r\n{not json\r\n'.encode())
    with pytest.raises(ValueError, match=r"rows.jsonl:2"):
        read_rows(path)


@pytest.mark.parametrize(
    "line",
    [
        '{"label": "x"}',
        "{not json",
        '{"text": "a", "label": "x", "context": "not a list"}',
        "[1, 2]",
    ],
)
def test_bad_rows_name_their_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok", "label": "x"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl:2"):
        read_rows(path)


def test_eval_report_latency_baselines_and_worst_misroutes() -> None:
    routed = [
        _routed("coding", "coding", latency=1.0),
        _routed("coding", "cooking", score=0.9, latency=2.0, text="confident mistake"),
        _routed("fallback", "cooking", score=0.6, latency=3.0, text="smaller mistake"),
        _routed("cooking", "cooking", latency=100.0),
    ]
    keyword_only = [_routed(r.expected, "fallback") for r in routed]
    report = eval_report(routed, LABELS, "fallback", keyword_only)
    assert report["accuracy"] == 0.5
    assert report["latency_ms"]["p50"] == 2.5
    assert 90.0 < report["latency_ms"]["p99"] <= 100.0
    assert report["baselines"]["always_fallback"] == 0.25
    assert report["baselines"]["keyword_only"] == 0.25
    assert [m["text"] for m in report["worst_misroutes"]] == [
        "confident mistake",
        "smaller mistake",
    ]
    assert report["methods"] == {"embedding": 4}
    json.dumps(report)  # the CLI writes it as JSON


def test_route_rows_passes_context_and_reports_progress() -> None:
    seen: list[Sequence[str]] = []
    progress: list[tuple[int, int]] = []

    def route(texts: Sequence[str]) -> RouteDecision:
        seen.append(list(texts))
        return RouteDecision(0, "fallback", 0.1, "fallback")

    rows = [
        {"text": "b", "label": "coding", "context": ["a"]},
        {"text": "c", "label": "nobody"},
    ]
    routed = route_rows(
        rows, route, LABELS, "fallback", progress=lambda i, n: progress.append((i, n))
    )
    assert seen == [["a", "b"], ["c"]]
    assert [r.expected for r in routed] == ["coding", "fallback"]
    assert progress == [(1, 2), (2, 2)]
