"""Calibration learns on top of the configuration: what it tunes, what it leaves alone, when it refuses.

The router tests use the real packaged encoder and real CLINC150 rows (tests/data/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modules.calibration import (
    MIN_ROWS_TO_TUNE,
    NONE_LABEL,
    Readout,
    apply_readout,
    calibrate,
    calibrated_config,
    calibration_json,
    calibration_report,
    choose_threshold,
    decide,
    fit_residual,
)
from modules.config_manager import ExpertConfig, RouterConfig, load_config
from modules.embedding_router import EmbeddingRouter, EmbeddingSettings, load_readout
from modules.encoding.encoders import PACKAGED_ENCODER, build_encoder

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "clinc150_sample.jsonl"


def _sample(split: str) -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [r for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def encoder():
    enc = build_encoder(PACKAGED_ENCODER)
    assert enc is not None
    return enc


@pytest.fixture(scope="module")
def clinc_router(encoder) -> EmbeddingRouter:
    config = load_config(REPO / "config" / "examples" / "clinc150_config.json")
    return EmbeddingRouter(config.experts, config.router, encoder)


def _decisions(router: EmbeddingRouter, rows: list[dict]) -> np.ndarray:
    probs, thresholds = router.probabilities(router.encode_queries([r["text"] for r in rows]))
    return decide(probs, thresholds)


def _targets(router: EmbeddingRouter, rows: list[dict]) -> np.ndarray:
    labels = list(router.anchors.labels)
    return np.array([labels.index(r["label"]) if r["label"] in labels else len(labels) for r in rows])


def test_decide_and_choose_threshold_reach_the_fallback_target() -> None:
    # Columns: expert a, expert b, none. Two in-scope rows, two out-of-scope rows whose
    # expert probability is only moderately high.
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.6, 0.1, 0.3], [0.55, 0.15, 0.3]])
    targets = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(decide(probs, 0.5), [0, 1, 0, 0])
    tuned = np.ones(4, dtype=bool)
    threshold, accuracy, recall = choose_threshold(probs, targets, tuned, 0.4, target_fallback_recall=1.0)
    assert 0.6 < threshold <= 0.8
    assert (accuracy, recall) == (1.0, 1.0)
    # Rows the read-out did not decide keep the configuration's threshold whatever is chosen.
    untuned = np.zeros(4, dtype=bool)
    _, accuracy, _ = choose_threshold(probs, targets, untuned, 0.4, target_fallback_recall=1.0)
    assert accuracy == 0.5


def test_fit_residual_learns_what_the_offsets_get_wrong() -> None:
    rng = np.random.default_rng(1)
    centers = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    targets = np.repeat([0, 1, 2], 30)
    features = centers[targets] + rng.normal(0, 0.5, (90, 2))
    # A prior that is sure of the wrong class for every row.
    offsets = np.log(np.full((90, 3), 0.05) + 0.85 * np.eye(3)[(targets + 1) % 3])
    weights, bias, scale = fit_residual(features, offsets, targets, l2=1e-3, none_column=2, steps=800)
    assert ((scale * offsets + features @ weights + bias).argmax(axis=1) == targets).mean() > 0.95
    # A prior that is always wrong is trusted less than as it came.
    assert 0 <= scale < 1


def test_fit_residual_keeps_a_right_prior_at_full_strength_or_more() -> None:
    rng = np.random.default_rng(2)
    targets = np.repeat([0, 1, 2], 30)
    features = rng.normal(0, 0.5, (90, 2))  # nothing to learn from the vectors
    offsets = np.log(np.full((90, 3), 0.1) + 0.7 * np.eye(3)[targets])
    _, _, scale = fit_residual(features, offsets, targets, l2=1e-3, none_column=2, steps=800)
    assert scale >= 1


def test_a_readout_with_no_learned_weight_is_the_prior() -> None:
    prior = np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2]])
    readout = Readout((0, 2), np.zeros((4, 2)), np.zeros(2), 0.3, "f")
    probs, tuned = apply_readout(prior, np.ones((3, 4)), readout, oos_gate=0.9)
    np.testing.assert_allclose(probs, prior)
    # Row 3's favourite (column 1) is not tuned: the read-out never decides it.
    assert tuned.tolist() == [True, True, False]


def test_an_untuned_expert_keeps_its_probability() -> None:
    prior = np.array([[0.5, 0.3, 0.2]])
    readout = Readout((0, 2), np.array([[-5.0, 5.0]]), np.zeros(2), 0.0, "f")
    probs, tuned = apply_readout(prior, np.array([[1.0]]), readout, oos_gate=0.9)
    assert tuned.tolist() == [True]
    assert probs[0, 1] == pytest.approx(0.3)
    assert probs[0].sum() == pytest.approx(1.0)
    assert probs[0, 2] > probs[0, 0]  # the read-out moved the tuned mass


def test_calibration_on_rows_lacking_an_expert_keeps_that_experts_recall(clinc_router: EmbeddingRouter) -> None:
    calibrate_rows = [r for r in _sample("calibrate") if r["label"] != "banking"]
    measure = _sample("measure")
    targets = _targets(clinc_router, measure)
    banking = list(clinc_router.anchors.labels).index("banking")
    is_banking = targets == banking
    before = _decisions(clinc_router, measure)

    calibration = calibrate(clinc_router, calibrate_rows, l2_grid=(1e-3,))
    assert calibration.accepted, calibration.refused
    assert "banking" in calibration.untuned
    assert any(w.startswith("banking: 0 rows") for w in calibration.warnings)
    clinc_router.readout = calibration.readout
    try:
        after = _decisions(clinc_router, measure)
    finally:
        clinc_router.readout = None

    recall_before = (before[is_banking] == banking).mean()
    recall_after = (after[is_banking] == banking).mean()
    assert recall_after >= recall_before - 0.05
    # ...while the experts it had rows for got better on rows it never saw.
    assert (after[~is_banking] == targets[~is_banking]).mean() > (before[~is_banking] == targets[~is_banking]).mean() + 0.05


def test_calibrate_writes_a_readout_the_router_uses(
    clinc_router: EmbeddingRouter, encoder, tmp_path: Path
) -> None:
    rows = _sample("calibrate")
    calibration = calibrate(clinc_router, rows, l2_grid=(1e-3,))
    assert calibration.accepted
    assert set(calibration.tuned) == {*clinc_router.anchors.labels, NONE_LABEL}
    assert calibration.oof_accuracy >= calibration.base_accuracy
    report = calibration_report(calibration)
    assert "uncalibrated configuration" in report and "banking" in report

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration_json(calibration)))
    assert load_readout(path, clinc_router.anchors) is not None
    assert calibrated_config({"router": {"confidence_threshold": 0.4}}, "config/c.json")["router"] == {
        "confidence_threshold": 0.4,
        "calibration_file": "config/c.json",
    }
    config = load_config(REPO / "config" / "examples" / "clinc150_config.json")
    calibrated = EmbeddingRouter(
        config.experts, config.router, encoder, settings=EmbeddingSettings(calibration_file=str(path))
    )
    assert calibrated.readout is not None
    measure = _sample("measure")
    targets = _targets(calibrated, measure)
    assert (_decisions(calibrated, measure) == targets).mean() > (_decisions(clinc_router, measure) == targets).mean()
    assert calibrated.route(["what is my checking account balance"]).label == "banking"


def test_too_few_rows_are_refused(clinc_router: EmbeddingRouter) -> None:
    rows = [r for r in _sample("calibrate") if r["label"] == "banking"][: MIN_ROWS_TO_TUNE - 1]
    calibration = calibrate(clinc_router, rows)
    assert not calibration.accepted
    assert "rows for each of two classes" in calibration.refused
    assert "nothing written" in calibration_report(calibration)


def test_a_stale_calibration_is_ignored(encoder, tmp_path: Path) -> None:
    experts = [
        ExpertConfig(id=0, label="fallback", type="ollama", url="http://127.0.0.1:11434", model_name="m"),
        ExpertConfig(id=1, label="coding", keywords=["python"], type="ollama", url="http://127.0.0.1:11434",
                     model_name="m"),
    ]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": 1, "fingerprint": "x", "weights": [], "bias": []}))
    router = EmbeddingRouter(experts, RouterConfig(), encoder, settings=EmbeddingSettings(calibration_file=str(path)))
    assert router.readout is None
