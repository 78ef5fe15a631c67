"""`main.py calibrate`: learn from labelled rows on top of the configuration, never instead of it.

The configuration (keywords + descriptions, scored by the embedding router) gives every query a
prior: a probability per expert plus "none of these experts". A calibration learns a residual
on top of that prior, and only where the rows can teach something:

- **Only the experts with rows are tuned.** An expert (or "none", i.e. the fallback) with fewer
  than `MIN_ROWS_TO_TUNE` labelled rows is left out of the read-out. When the prior's favourite
  for a query is such an expert, the prior decides, exactly as without a calibration: rows that
  never mention an expert cannot teach the router anything about it, so they must not be able
  to take its queries away.
- **The learned part starts at zero.** The read-out is a logistic regression whose logits are
  the prior's log-probabilities plus a regularised linear term over the query vector. With few
  rows the L2 penalty keeps the term near zero, so the decision stays the prior's; the term
  grows only as far as the rows support it.
- **Measured before it is written.** `calibrate` scores the read-out by cross-validation on the
  rows it got (every row, the untuned experts' included) against the uncalibrated
  configuration on the same rows, and refuses to produce a calibration that is worse.

Everything here is a pure function of vectors, probabilities and rows; the router applies a
read-out with `apply_readout`, and `main.py` only adds files and printing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from modules.embedding_router import EmbeddingRouter

Row = Mapping[str, Any]
CALIBRATION_FORMAT = 3
# The query vector is unit length; scaled so that the read-out's weights stay O(1).
READOUT_FEATURE_SCALE = 10.0
# Fewer labelled rows than this for an expert and it is not tuned at all: a residual fitted on
# a handful of rows mostly memorises them.
MIN_ROWS_TO_TUNE = 10
# Fewer than this and the report warns that the expert's tuning rests on little evidence.
FEW_ROWS_WARNING = 30
# The one name the "none of these experts" class has in files and reports.
NONE_LABEL = "(none)"


@dataclass(frozen=True)
class Readout:
    """A residual read-out over some of the router's classes (index E is "none")."""

    columns: tuple[int, ...]
    weights: np.ndarray  # d x len(columns)
    bias: np.ndarray  # (len(columns),)
    # Confidence threshold for the decisions the read-out makes; the others keep the config's.
    threshold: float
    fingerprint: str
    # How far the prior's log-probabilities are trusted, learned with the weights (starts at 1:
    # the prior as it is). The rows say whether the configuration's confidence is too sharp or
    # too flat for them, so the read-out need not spend its weights undoing it.
    prior_scale: float = 1.0


def readout_features(query_vectors: np.ndarray) -> np.ndarray:
    return np.asarray(query_vectors, dtype=np.float64) * READOUT_FEATURE_SCALE


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probs


def _prior_offsets(prior: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log of the prior restricted to `columns` (renormalised), and the mass it had there."""
    part = prior[:, columns]
    mass = part.sum(axis=1, keepdims=True)
    return np.log(np.maximum(part / np.maximum(mass, 1e-12), 1e-12)), mass


def apply_readout(
    prior: np.ndarray,
    query_vectors: np.ndarray,
    readout: Readout,
    oos_gate: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, tuned): the prior, re-weighted by the read-out where it may decide.

    The read-out decides a row when the prior's favourite is one of its columns and the prior
    does not rule the query out (its "none" share below `oos_gate`: the read-out has only seen
    the kind of off-topic text its rows had, and long jailbreak prompts look like none of it).
    It only moves probability between its own columns: an untuned expert keeps exactly its prior
    probability.
    """
    columns = np.asarray(readout.columns)
    tuned = np.isin(prior.argmax(axis=1), columns) & (prior[:, -1] < oos_gate)
    probs = prior.astype(np.float64, copy=True)
    if tuned.any():
        offsets, mass = _prior_offsets(prior[tuned], columns)
        logits = readout.prior_scale * offsets + readout_features(query_vectors[tuned]) @ readout.weights + readout.bias
        probs[np.ix_(np.flatnonzero(tuned), columns)] = softmax(logits) * mass
    return probs, tuned


def fit_residual(
    features: np.ndarray,
    offsets: np.ndarray,
    targets: np.ndarray,
    l2: float,
    none_column: int | None,
    none_weight: float = 3.0,
    steps: int = 600,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Multinomial logistic regression over per-row offsets (the prior's log-probabilities) times
    a learned scale (Adam; L2 on the weights, and on the scale's distance from 1).

    Out-of-scope rows are rare in labelled sets yet are what "none" must learn from, so they
    weigh `none_weight` times more than the others.
    """
    n_classes = offsets.shape[1]
    weights = np.zeros((features.shape[1], n_classes))
    bias = np.zeros(n_classes)
    onehot = np.eye(n_classes)[targets]
    sample_weight = np.ones(len(targets))
    if none_column is not None:
        sample_weight[targets == none_column] = none_weight
    sample_weight /= sample_weight.sum()
    scale = np.ones(1)
    params = (weights, bias, scale)
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        grad_logits = (softmax(scale[0] * offsets + features @ weights + bias) - onehot) * sample_weight[:, None]
        grads = [
            features.T @ grad_logits + l2 * weights,
            grad_logits.sum(axis=0),
            np.array([(grad_logits * offsets).sum() + l2 * (scale[0] - 1.0)]),
        ]
        for i, (param, grad) in enumerate(zip(params, grads)):
            moments[i] = 0.9 * moments[i] + 0.1 * grad
            squares[i] = 0.999 * squares[i] + 0.001 * grad * grad
            param -= 0.05 * (moments[i] / (1 - 0.9**t)) / (np.sqrt(squares[i] / (1 - 0.999**t)) + 1e-8)
        # A negative scale would turn the configuration's favourite into its least likely.
        np.maximum(scale, 0.0, out=scale)
    return weights, bias, float(scale[0])


def decide(probs: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Chosen class per row: the best expert if it reaches its row's threshold and beats "none",
    else E ("none": the router goes down its chain)."""
    experts = probs[:, :-1]
    best = experts.argmax(axis=1)
    confidence = experts.max(axis=1)
    accepted = (confidence >= thresholds) & (confidence > probs[:, -1])
    chosen: np.ndarray = np.where(accepted, best, probs.shape[1] - 1)
    return chosen


THRESHOLD_GRID = tuple(float(t) for t in np.round(np.arange(0.0, 0.951, 0.025), 3))


def choose_threshold(
    probs: np.ndarray,
    targets: np.ndarray,
    tuned: np.ndarray,
    config_threshold: float,
    target_fallback_recall: float,
) -> tuple[float, float, float]:
    """The threshold for tuned rows with the best accuracy among those reaching the fallback
    recall target (the most accurate one when none does). Returns (threshold, accuracy, recall)."""
    none = probs.shape[1] - 1
    is_none = targets == none
    candidates = []
    for threshold in THRESHOLD_GRID:
        chosen = decide(probs, np.where(tuned, threshold, config_threshold))
        accuracy = float((chosen == targets).mean())
        recall = float((chosen[is_none] == none).mean()) if is_none.any() else 1.0
        candidates.append((recall >= target_fallback_recall, accuracy, recall, threshold))
    _, accuracy, recall, threshold = max(candidates, key=lambda c: (c[0], c[1]))
    return threshold, accuracy, recall


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` found, and whether it may be written."""

    readout: Readout | None
    l2: float
    labels: tuple[str, ...]  # the router's experts; index E is "none"
    row_counts: dict[str, int]
    tuned: tuple[str, ...]
    untuned: tuple[str, ...]
    warnings: tuple[str, ...]
    # Out-of-fold figures on the calibration rows: no row was scored by a read-out fitted on it.
    oof_accuracy: float
    oof_fallback_recall: float
    # The uncalibrated configuration on the same rows.
    base_accuracy: float
    base_fallback_recall: float
    # Per class: (recall without, recall with), out of fold.
    recalls: dict[str, tuple[float, float]] = field(default_factory=dict)
    refused: str = ""

    @property
    def accepted(self) -> bool:
        return self.readout is not None and not self.refused


def _recalls(chosen: np.ndarray, targets: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return {
        name: float((chosen[targets == i] == i).mean())
        for i, name in enumerate(names)
        if (targets == i).any()
    }


def calibrate(
    router: EmbeddingRouter,
    rows: Sequence[Row],
    target_fallback_recall: float = 0.6,
    folds: int = 3,
    l2_grid: Sequence[float] = (1e-3, 1e-2),
    seed: int = 0,
) -> Calibration:
    """Fit the residual read-out on labelled rows, and measure it against the configuration.

    Regularisation and threshold are chosen on out-of-fold predictions; the read-out is then
    refitted on every row. A row whose label names no expert counts for "none" (the fallback).
    """
    labels = tuple(router.anchors.labels)
    names = (*labels, NONE_LABEL)
    none = len(labels)
    targets = np.array([labels.index(r["label"]) if r["label"] in labels else none for r in rows])
    counts = np.bincount(targets, minlength=none + 1)
    row_counts = {name: int(c) for name, c in zip(names, counts)}
    columns = np.flatnonzero(counts >= MIN_ROWS_TO_TUNE)
    tuned_names = tuple(names[i] for i in columns)
    untuned = tuple(n for n in names if n not in tuned_names)
    warnings = tuple(
        f"{name}: {row_counts[name]} rows (fewer than {MIN_ROWS_TO_TUNE}): not tuned, keeps the configuration's scores"
        if name in untuned
        else f"{name}: only {row_counts[name]} rows: tuned on little evidence"
        for name in names
        if row_counts[name] < FEW_ROWS_WARNING
    )
    queries = router.encode_queries([r["text"] for r in rows])
    prior = router.standardized_probabilities(queries)
    gate = router.settings.calibrated_oos_gate
    config_threshold = router.config_threshold
    base_chosen = decide(prior, config_threshold)
    base_accuracy = float((base_chosen == targets).mean()) if len(rows) else 0.0
    is_none = targets == none
    base_recall = float((base_chosen[is_none] == none).mean()) if is_none.any() else 1.0
    base_recalls = _recalls(base_chosen, targets, names)
    common: dict[str, Any] = dict(
        labels=labels, row_counts=row_counts, tuned=tuned_names, untuned=untuned, warnings=warnings,
        base_accuracy=base_accuracy, base_fallback_recall=base_recall,
    )
    if len(columns) < 2:
        return Calibration(
            None, 0.0, oof_accuracy=base_accuracy, oof_fallback_recall=base_recall,
            refused=f"needs at least {MIN_ROWS_TO_TUNE} rows for each of two classes (experts or out-of-scope)",
            **common,
        )
    fit_rows = np.isin(targets, columns)
    local = np.searchsorted(columns, np.where(fit_rows, targets, columns[0]))
    none_column = int(np.searchsorted(columns, none)) if none in columns else None
    features = readout_features(queries)
    fold_of = np.random.default_rng(seed).permutation(len(rows)) % folds
    best: tuple[bool, float, float, float, float, np.ndarray] | None = None
    for l2 in l2_grid:
        oof = prior.astype(np.float64, copy=True)
        oof_tuned = np.zeros(len(rows), dtype=bool)
        for k in range(folds):
            train = (fold_of != k) & fit_rows
            offsets, _ = _prior_offsets(prior[train], columns)
            weights, bias, scale = fit_residual(features[train], offsets, local[train], l2, none_column)
            held = np.flatnonzero(fold_of == k)
            readout = Readout(tuple(int(c) for c in columns), weights, bias, 0.0, "", scale)
            oof[held], oof_tuned[held] = apply_readout(prior[held], queries[held], readout, gate)
        threshold, accuracy, recall = choose_threshold(
            oof, targets, oof_tuned, config_threshold, target_fallback_recall
        )
        chosen = decide(oof, np.where(oof_tuned, threshold, config_threshold))
        candidate = (recall >= target_fallback_recall, accuracy, l2, threshold, recall, chosen)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    assert best is not None
    _, accuracy, l2, threshold, recall, chosen = best
    new_recalls = _recalls(chosen, targets, names)
    recalls = {n: (base_recalls[n], new_recalls[n]) for n in base_recalls}
    if accuracy < base_accuracy:
        return Calibration(
            None, l2, oof_accuracy=accuracy, oof_fallback_recall=recall, recalls=recalls,
            refused=f"cross-validated accuracy {accuracy:.1%} is below the uncalibrated configuration's {base_accuracy:.1%}",
            **common,
        )
    offsets, _ = _prior_offsets(prior[fit_rows], columns)
    weights, bias, scale = fit_residual(features[fit_rows], offsets, local[fit_rows], l2, none_column)
    readout = Readout(tuple(int(c) for c in columns), weights, bias, threshold, router.anchors.fingerprint, scale)
    return Calibration(readout, l2, oof_accuracy=accuracy, oof_fallback_recall=recall, recalls=recalls, **common)


def readout_to_json(readout: Readout, labels: Sequence[str]) -> dict[str, Any]:
    names = (*labels, NONE_LABEL)
    return {
        "format": CALIBRATION_FORMAT,
        "fingerprint": readout.fingerprint,
        "labels": list(labels),
        "columns": [names[c] for c in readout.columns],
        "confidence_threshold": readout.threshold,
        "weights": np.round(readout.weights, 6).tolist(),
        "bias": np.round(readout.bias, 6).tolist(),
        "prior_scale": round(readout.prior_scale, 6),
    }


def readout_from_json(data: Mapping[str, Any], labels: Sequence[str], fingerprint: str, dim: int) -> Readout | None:
    """The read-out in `data` if it was fitted on these very experts and encoder, else None."""
    if data.get("format") != CALIBRATION_FORMAT or data.get("fingerprint") != fingerprint:
        return None
    names = (*labels, NONE_LABEL)
    if list(data.get("labels", [])) != list(labels) or not all(c in names for c in data["columns"]):
        return None
    columns = tuple(names.index(c) for c in data["columns"])
    weights = np.asarray(data["weights"], dtype=np.float64)
    bias = np.asarray(data["bias"], dtype=np.float64)
    threshold = float(data["confidence_threshold"])
    prior_scale = float(data["prior_scale"])
    if weights.shape != (dim, len(columns)) or bias.shape != (len(columns),) or not 0 <= threshold <= 1:
        return None
    if not 0 <= prior_scale < float("inf"):
        return None
    return Readout(columns, weights, bias, threshold, fingerprint, prior_scale)


def calibration_json(calibration: Calibration) -> dict[str, Any]:
    """The calibration file: the read-out and the measurements that let it be written."""
    assert calibration.readout is not None
    data = readout_to_json(calibration.readout, calibration.labels)
    data["l2"] = calibration.l2
    data["rows"] = calibration.row_counts
    data["cross_validated"] = {
        "accuracy": round(calibration.oof_accuracy, 4),
        "fallback_recall": round(calibration.oof_fallback_recall, 4),
        "uncalibrated_accuracy": round(calibration.base_accuracy, 4),
        "uncalibrated_fallback_recall": round(calibration.base_fallback_recall, 4),
    }
    return data


def calibrated_config(raw_config: Mapping[str, Any], calibration_file: str) -> dict[str, Any]:
    """A copy of config.json's content that uses the calibration file.

    The threshold the calibration chose lives in the calibration file and applies only to the
    decisions its read-out makes, so `router.confidence_threshold` stays the configuration's.
    """
    import json

    config: dict[str, Any] = json.loads(json.dumps(raw_config))
    config.setdefault("router", {})["calibration_file"] = calibration_file
    return config


def calibration_report(calibration: Calibration) -> str:
    """What `main.py calibrate` prints: which experts it could tune and how it measured."""
    lines = [
        f"tuned: {', '.join(calibration.tuned) or '-'}",
        f"not tuned (keep the configuration's scores): {', '.join(calibration.untuned) or '-'}",
        *(f"warning: {w}" for w in calibration.warnings),
        "",
        "cross-validated on these rows       accuracy   fallback recall",
        f"  uncalibrated configuration        {calibration.base_accuracy:>7.1%}   {calibration.base_fallback_recall:>7.1%}",
        f"  calibrated                        {calibration.oof_accuracy:>7.1%}   {calibration.oof_fallback_recall:>7.1%}",
    ]
    if calibration.recalls:
        lines += ["", f"{'recall per class':<24} {'without':>8} {'with':>8} {'rows':>6}"]
        for name, (before, after) in calibration.recalls.items():
            lines.append(f"  {name:<22} {before:>8.2f} {after:>8.2f} {calibration.row_counts[name]:>6}")
    if calibration.readout is not None and not calibration.refused:
        lines.append(f"\nconfidence threshold for the tuned decisions: {calibration.readout.threshold:.3f}")
    if calibration.refused:
        lines.append(f"\nrefused: {calibration.refused}; nothing written")
    return "\n".join(lines)
