"""Fine-tuning a classifier router: the packaged base, the training run, the saved folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from modules.classifier_heads import MEAN_POOLING, POOLING_KEY
from modules.classifier_training import (
    HELD_OUT_FILE,
    TRAINING_SUMMARY_FILE,
    class_labels,
    class_weights,
    packaged_base_model,
    sample_rows,
    train_classifier,
)
from modules.config_manager import ExpertConfig, RouterConfig
from modules.decision_router import ONNX_MODEL_FILE, DecisionRouter
from modules.route_eval import read_rows

SUBJECTS = {
    "banking": ["my account balance", "a wire transfer", "my savings account", "the routing number", "a bank deposit"],
    "travel": ["a flight to Rome", "a hotel in Lisbon", "my passport", "a rental car", "my luggage"],
    "kitchen": ["a pasta recipe", "the oven temperature", "baking bread", "a salad dressing", "grilling fish"],
    "oos": ["the moon landing", "jazz history", "a chess opening", "volcano facts", "the tallest tree"],
}
ASKS = ["Tell me about {}", "I have a question on {}", "Help me with {}", "What should I know about {}"]


def labelled_rows() -> list[dict[str, Any]]:
    """80 rows, 20 per label, sorted by label as labelled files often are."""
    return [
        {"text": ask.format(subject), "label": label}
        for label, subjects in SUBJECTS.items()
        for subject in subjects
        for ask in ASKS
    ]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    base = tmp_path_factory.mktemp("training")
    rows = write_rows(base / "rows.jsonl", labelled_rows())
    summary = train_classifier(rows, base / "models" / "router", epochs=1, limit=60, progress=False)
    return base / "models" / "router", summary


def test_the_packaged_base_is_the_folder_with_the_transformer_weights() -> None:
    folder = packaged_base_model()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


def test_a_missing_base_package_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not installed"):
        packaged_base_model("no_such_model_package_here")


def test_training_returns_a_summary_of_the_run(trained: tuple[Path, dict[str, Any]]) -> None:
    _, summary = trained
    assert summary["labels"] == ["banking", "kitchen", "oos", "travel"]
    assert summary["rows"] == 60
    # A fifth of each label's rows is held out.
    assert summary["trained_rows"] == sum(summary["label_counts"].values()) == 60 - summary["held_out"]["rows"]
    assert 8 <= summary["held_out"]["rows"] <= 16
    assert summary["epochs_run"] == summary["best_epoch"] == 1
    assert summary["train_layers"] == 2 and summary["pooling"] == "cls"
    assert summary["train_seconds"] >= summary["encode_seconds"] > 0
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert math.isfinite(summary["held_out_loss"])


def test_the_held_out_rows_are_saved_and_give_a_threshold_table(trained: tuple[Path, dict[str, Any]],
                                                               tmp_path: Path) -> None:
    out_dir, summary = trained
    held = read_rows(out_dir / HELD_OUT_FILE)
    assert len(held) == summary["held_out"]["rows"]
    assert {row["label"] for row in held} == set(summary["labels"])
    table = summary["held_out"]["thresholds"]
    assert [row["threshold"] for row in table][:3] == [0.0, 0.05, 0.1]
    assert all(row["fallback_recall"] is not None for row in table)
    assert summary["held_out"]["chosen"] in table
    assert summary["held_out"]["fallback_labels"] == ["oos"]
    # Nothing held out: no table, no file.
    rows = write_rows(tmp_path / "rows.jsonl", labelled_rows())
    everything = train_classifier(rows, tmp_path / "all", epochs=1, held_out_share=0.0, progress=False)
    assert everything["held_out"] is None and everything["trained_rows"] == 80
    assert not (tmp_path / "all" / HELD_OUT_FILE).exists()


def test_the_saved_folder_is_a_complete_model_with_labels_as_classes(trained: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out_dir, summary = trained
    config = json.loads((out_dir / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(4)] == summary["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(out_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    logits = model(**tokenizer(["Help me with a wire transfer"], return_tensors="pt")).logits
    assert tuple(logits.shape) == (1, 4)
    assert (out_dir / ONNX_MODEL_FILE).stat().st_size > 1_000_000
    saved = json.loads((out_dir / TRAINING_SUMMARY_FILE).read_text())
    assert saved["labels"] == summary["labels"] and saved["rows"] == 60
    assert saved["train_seconds"] > 0
    # The staging folder was renamed into place: nothing else is left beside it.
    assert [p.name for p in out_dir.parent.iterdir()] == ["router"]
    assert not [p.name for p in out_dir.iterdir() if p.name.endswith(".fp32")]


def test_retraining_replaces_the_folder_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "router"
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}")
    (out_dir / "stale-file.bin").write_text("old weights")
    two_labels = [row for row in labelled_rows() if row["label"] in ("banking", "travel")]
    summary = train_classifier(write_rows(tmp_path / "rows.jsonl", two_labels), out_dir, epochs=1, batch_size=16)
    assert summary["labels"] == ["banking", "travel"] and summary["rows"] == 40
    assert not (out_dir / "stale-file.bin").exists()
    assert json.loads((out_dir / "config.json").read_text())["id2label"] == {"0": "banking", "1": "travel"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router", "rows.jsonl"]
    # Progress goes to stderr: the frozen layers' pass, then one bar per epoch with the time left.
    err = capsys.readouterr().err
    assert "encoding (frozen layers)" in err and "epoch 1/1" in err and "held-out loss" in err


def test_a_folder_that_is_not_a_model_is_never_replaced(tmp_path: Path) -> None:
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    rows = write_rows(tmp_path / "rows.jsonl", labelled_rows())
    with pytest.raises(ValueError, match="not a model folder"):
        train_classifier(rows, precious, epochs=1, progress=False)
    assert (precious / "todo.txt").read_text() == "keep me"


def test_one_label_is_not_enough_to_train(tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", [r for r in labelled_rows() if r["label"] == "banking"])
    with pytest.raises(ValueError, match="at least 2 labels"):
        train_classifier(rows, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_bad_row_names_its_line(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hi", "label": "a"}\n{"text": "no label"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2"):
        train_classifier(rows, tmp_path / "out", progress=False)


def test_class_labels_are_sorted_and_unique() -> None:
    assert class_labels(labelled_rows()) == ["banking", "kitchen", "oos", "travel"]


def test_rare_classes_weigh_more_but_less_than_their_rarity() -> None:
    rows = [{"text": "t", "label": "big"}] * 16 + [{"text": "t", "label": "rare"}]
    big, rare = class_weights(["big", "rare"], rows)
    assert big == 1.0
    assert rare == pytest.approx(4.0)


def test_limit_draws_a_seeded_sample_across_labels() -> None:
    rows = labelled_rows()
    sample = sample_rows(rows, 20, seed=0)
    assert len(sample) == 20
    assert sample == sample_rows(rows, 20, seed=0)
    assert sample != sample_rows(rows, 20, seed=1)
    # The file is sorted by label: the first 20 rows would all be "banking".
    assert len({row["label"] for row in sample}) > 1
    assert sample_rows(rows, None, seed=0) is rows
    assert sample_rows(rows, 1000, seed=0) is rows
    with pytest.raises(ValueError):
        sample_rows(rows, 0, seed=0)


GENERAL = ExpertConfig(id=0, label="general", type="ollama", url="http://127.0.0.1:11434", model_name="m")
EXPERTS = (GENERAL, *(ExpertConfig(id=i, label=label, type="ollama", url="http://127.0.0.1:11434", model_name="m")
                      for i, label in enumerate(["banking", "kitchen", "travel"], start=1)))


def test_fast_mode_fits_a_read_out_of_the_frozen_encoder_that_both_runtimes_serve(tmp_path: Path) -> None:
    import numpy as np

    rows = write_rows(tmp_path / "rows.jsonl", labelled_rows())
    summary = train_classifier(rows, tmp_path / "fast", train_layers=0, progress=False)
    assert summary["pooling"] == "mean" and summary["train_layers"] == 0
    config = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert config[POOLING_KEY] == MEAN_POOLING
    # The encoder is the base, untouched.
    from safetensors.torch import load_file

    base = load_file(packaged_base_model() / "model.safetensors")
    saved = load_file(tmp_path / "fast" / "model.safetensors")
    key = next(k for k in saved if k.endswith("encoder.layer.5.output.dense.weight"))
    assert (saved[key] == base[next(k for k in base if k.endswith("encoder.layer.5.output.dense.weight"))]).all()
    served = DecisionRouter(EXPERTS, RouterConfig(confidence_threshold=0.0), tmp_path / "fast")
    reference = DecisionRouter(EXPERTS, RouterConfig(confidence_threshold=0.0), tmp_path / "fast", runtime="torch")
    texts = ["Help me with a wire transfer", "Tell me about a flight to Rome", "I have a question on baking bread"]
    onnx_probs = np.concatenate([served.probabilities([t]) for t in texts])
    torch_probs = np.concatenate([reference.probabilities([t]) for t in texts])
    assert np.abs(onnx_probs - torch_probs).max() < 0.05
    assert [served.route([t]).label for t in texts] == ["banking", "travel", "kitchen"]
