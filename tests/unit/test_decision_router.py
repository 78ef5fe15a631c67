"""The classifier router on a real model fine-tuned from the packaged MiniLM by train_classifier."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modules.classifier_training import train_classifier
from modules.config_manager import ExpertConfig, RouterConfig
from modules.decision_router import (
    ONNX_MODEL_FILE,
    DecisionRouter,
    class_labels_from_model_dir,
    class_to_expert_matrix,
    experts_for_classes,
    head_tail_ids,
    padded_batch,
)

SUBJECTS = {
    "banking": ["my account balance", "a wire transfer", "my savings account", "the routing number", "a bank deposit"],
    "travel": ["a flight to Rome", "a hotel in Lisbon", "my passport", "a rental car", "my luggage"],
    "kitchen": ["a pasta recipe", "the oven temperature", "baking bread", "a salad dressing", "grilling fish"],
    # Not an expert: the class the router reads as "none of the specialists".
    "oos": ["the moon landing", "jazz history", "a chess opening", "volcano facts", "the tallest tree"],
}
ASKS = ["Tell me about {}", "I have a question on {}", "Help me with {}"]
BANKING_TEXT = "Help me with a wire transfer from my savings account"
TRAVEL_TEXT = "Help me with a flight to Rome and a hotel"


def make_expert(expert_id: int, label: str, keywords: list[str] | None = None) -> ExpertConfig:
    return ExpertConfig(
        id=expert_id, label=label, keywords=keywords or [], type="ollama",
        url="http://127.0.0.1:11434", model_name="qwen2.5:7b",
    )


EXPERTS = (
    make_expert(0, "general"),
    make_expert(1, "banking", ["bank", "account balance", "wire transfer"]),
    make_expert(2, "travel", ["flight", "hotel", "passport"]),
    make_expert(3, "kitchen", ["recipe", "oven"]),
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("decision")
    rows = [
        {"text": ask.format(subject), "label": label}
        for label, subjects in SUBJECTS.items()
        for subject in subjects
        for ask in ASKS
    ]
    (base / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A few more steps than one epoch of 60 rows at the default rate, so that the model tells
    # the topics apart, while staying far from certain (the 0.99 threshold tests rely on it).
    train_classifier(base / "rows.jsonl", base / "model", epochs=3, batch_size=8, learning_rate=1e-4, progress=False)
    return base / "model"


def relabelled_copy(model_dir: Path, target: Path, renames: dict[str, str]) -> Path:
    """The same model with some classes renamed in its config.json (a real, loadable folder)."""
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["id2label"] = {k: renames.get(v, v) for k, v in config["id2label"].items()}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (target / "config.json").write_text(json.dumps(config))
    return target


def router(model_dir: Path, threshold: float, **router_fields: object) -> DecisionRouter:
    return DecisionRouter(EXPERTS, RouterConfig(confidence_threshold=threshold, **router_fields), model_dir)


def test_a_confident_class_routes_by_classification(model_dir: Path) -> None:
    decision = router(model_dir, 0.0).route([BANKING_TEXT])
    assert (decision.label, decision.expert_id, decision.method) == ("banking", 1, "classification")
    assert set(decision.scores) == {"general", "banking", "travel", "kitchen"}
    assert decision.score == decision.scores["banking"] == max(decision.scores.values())
    assert sum(decision.scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert decision.context_used is None


def test_below_the_threshold_keywords_decide_and_without_them_the_fallback(model_dir: Path) -> None:
    strict = router(model_dir, 0.99)
    assert strict.probabilities([TRAVEL_TEXT]).max() < 0.99
    keyword = strict.route([TRAVEL_TEXT])
    assert (keyword.label, keyword.method) == ("travel", "keyword")
    fallback = strict.route(["Help me with volcano facts"])
    assert (fallback.label, fallback.expert_id, fallback.method) == ("general", 0, "fallback")
    # The fallback decision explains itself with the model's probabilities.
    assert fallback.score == fallback.scores["general"]
    assert set(fallback.scores) == {"general", "banking", "travel", "kitchen"}


def test_keyword_fallback_off_leaves_only_the_fallback_expert(model_dir: Path) -> None:
    decision = router(model_dir, 0.99, keyword_fallback=False).route([TRAVEL_TEXT])
    assert (decision.label, decision.method) == ("general", "fallback")


def test_out_of_scope_classes_are_the_fallback_experts_probability(model_dir: Path) -> None:
    plain = router(model_dir, 0.0)
    probs = plain.probabilities([TRAVEL_TEXT])[0]
    labels = list(plain.expert_labels)
    # "travel" renamed to a label no expert has: its probability joins "oos" on the fallback.
    renamed = DecisionRouter(
        EXPERTS, RouterConfig(confidence_threshold=0.0),
        relabelled_copy(model_dir, model_dir.parent / "renamed", {"travel": "holidays"}),
    )
    moved = renamed.probabilities([TRAVEL_TEXT])[0]
    assert moved[labels.index("general")] == pytest.approx(probs[labels.index("general")] + probs[labels.index("travel")], abs=1e-5)
    assert moved[labels.index("travel")] == 0.0
    decision = renamed.route([TRAVEL_TEXT])
    assert (decision.label, decision.method) == ("general", "fallback")
    assert decision.score == pytest.approx(moved[labels.index("general")])


def test_confident_out_of_scope_skips_the_cascade_and_keywords(model_dir: Path) -> None:
    renamed = DecisionRouter(
        EXPERTS, RouterConfig(confidence_threshold=0.0),
        relabelled_copy(model_dir, model_dir.parent / "renamed-2", {"travel": "holidays"}),
    )
    # The earlier banking turn would win the cascade and "flight"/"hotel" are travel keywords,
    # but the model is sure the new question is none of the specialists'.
    decision = renamed.route([BANKING_TEXT, TRAVEL_TEXT])
    assert (decision.label, decision.method, decision.context_used) == ("general", "fallback", None)


def test_the_cascade_reads_the_recent_messages_when_the_last_is_unsure(model_dir: Path) -> None:
    plain = router(model_dir, 0.0)
    last = "And what else?"
    joined = f"{BANKING_TEXT}\n{last}"
    last_best = float(plain.probabilities([last]).max())
    joined_probs = plain.probabilities([joined])[0]
    joined_best = float(joined_probs.max())
    assert plain.expert_labels[int(np.argmax(joined_probs))] == "banking"
    assert last_best < joined_best, "the model should be surer with the banking turn in view"
    # A threshold between the two: the last message alone fails, the joined context passes.
    decision = router(model_dir, (last_best + joined_best) / 2).route([BANKING_TEXT, last])
    assert (decision.label, decision.method, decision.context_used) == ("banking", "cascade", joined)
    assert decision.score == pytest.approx(joined_best, abs=1e-5)


def test_the_cascade_keeps_the_newest_characters(model_dir: Path) -> None:
    decision = router(model_dir, 0.999, context_max_chars=30, keyword_fallback=False).route(
        ["The oven temperature for bread", BANKING_TEXT, "And what else?"]
    )
    assert decision.method == "fallback"
    assert decision.context_used is not None and decision.context_used.endswith("And what else?")
    assert len(decision.context_used) <= 30 and "oven" not in decision.context_used


def test_an_empty_last_message_goes_to_the_fallback_expert(model_dir: Path) -> None:
    decision = router(model_dir, 0.0).route(["   "])
    assert (decision.label, decision.method) == ("general", "fallback")
    assert router(model_dir, 0.0).route([]).label == "general"


def test_long_messages_are_cut_to_the_model_length(model_dir: Path) -> None:
    # 5,000 words: BERT position embeddings stop at 512 tokens, so an uncut text would fail.
    long_text = "Please read this. " + "lorem ipsum dolor " * 1700 + BANKING_TEXT
    decision = router(model_dir, 0.0).route([long_text])
    assert decision.method == "classification"
    assert decision.label in {"banking", "travel", "kitchen"}


def test_a_model_without_any_expert_label_is_refused(model_dir: Path, tmp_path: Path) -> None:
    alien = relabelled_copy(
        model_dir, tmp_path / "alien", {"banking": "alpha", "travel": "beta", "kitchen": "gamma"}
    )
    with pytest.raises(ValueError, match="names a configured expert"):
        DecisionRouter(EXPERTS, RouterConfig(), alien)


def test_a_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        DecisionRouter(EXPERTS, RouterConfig(), tmp_path / "nothing-here")


def test_an_expert_without_a_class_is_reported(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    experts = (*EXPERTS, make_expert(4, "legal", ["contract"]))
    with caplog.at_level(logging.INFO, logger="lemoe.router"):
        routed = DecisionRouter(experts, RouterConfig(confidence_threshold=0.99), model_dir)
    assert "legal" in caplog.text and "oos" in caplog.text
    # Reachable by keywords only.
    assert routed.route(["Review this contract clause"]).label == "legal"


def test_the_onnx_export_and_the_torch_model_agree(model_dir: Path) -> None:
    served = router(model_dir, 0.4)
    reference = DecisionRouter(EXPERTS, RouterConfig(), model_dir, runtime="torch")
    assert (served.runtime, reference.runtime) == ("onnx", "torch")
    texts = [BANKING_TEXT, TRAVEL_TEXT, "Help me with grilling fish", "Tell me about jazz history"]
    onnx_probs = np.concatenate([served.probabilities([t]) for t in texts])
    torch_probs = np.concatenate([reference.probabilities([t]) for t in texts])
    # int8 weights move probabilities a little, never the winner on such clear texts.
    assert np.abs(onnx_probs - torch_probs).max() < 0.05
    assert onnx_probs.argmax(axis=1).tolist() == torch_probs.argmax(axis=1).tolist()


def test_a_folder_without_the_onnx_export_runs_on_torch(model_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / ONNX_MODEL_FILE).unlink()
    hf_only = DecisionRouter(EXPERTS, RouterConfig(confidence_threshold=0.0), plain)
    assert hf_only.runtime == "torch"
    assert hf_only.route([BANKING_TEXT]).label == "banking"
    with pytest.raises(ValueError, match=ONNX_MODEL_FILE):
        DecisionRouter(EXPERTS, RouterConfig(), plain, runtime="onnx")


def test_serving_the_onnx_export_needs_no_torch(model_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from modules.config_manager import RouterConfig; "
        "from modules.decision_router import DecisionRouter; "
        "from tests.unit.test_decision_router import EXPERTS, BANKING_TEXT; "
        f"r = DecisionRouter(EXPERTS, RouterConfig(confidence_threshold=0.0), Path({str(model_dir)!r})); "
        "print(r.route([BANKING_TEXT]).label, any(m in sys.modules for m in ('torch', 'transformers')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert result.stdout.split() == ["banking", "False"]


def test_padded_batches_mask_the_padding() -> None:
    ids, mask = padded_batch([[101, 5, 102], [101, 102]], pad_id=0)
    assert ids.tolist() == [[101, 5, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids.dtype == mask.dtype == np.int64


def test_the_module_imports_without_torch() -> None:
    # The default configuration (embedding router) must not need torch or transformers.
    code = (
        "import sys, modules.decision_router, modules.classifier_training; "
        "print(any(m in sys.modules for m in ('torch', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_classes_map_to_experts_by_name() -> None:
    assert experts_for_classes(["banking", "oos", "general", "travel"], EXPERTS) == [
        "banking", "general", "general", "travel",
    ]
    with pytest.raises(ValueError, match="names a configured expert"):
        experts_for_classes(["general", "oos"], EXPERTS)


def test_class_probabilities_sum_into_expert_columns() -> None:
    matrix = class_to_expert_matrix(["banking", "general", "general"], ["general", "banking"])
    probs = np.array([[0.5, 0.3, 0.2]], dtype=np.float32) @ matrix
    assert probs[0].tolist() == pytest.approx([0.5, 0.5])


def test_head_tail_ids_keep_both_ends() -> None:
    ids = list(range(10))
    assert head_tail_ids(ids, 20) == ids
    assert head_tail_ids(ids, 4) == [0, 1, 8, 9]
    assert head_tail_ids(ids, 5) == [0, 1, 7, 8, 9]


def test_class_labels_come_from_config_json_in_id_order(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"1": "b", "0": "a", "2": "c"}}))
    assert class_labels_from_model_dir(tmp_path) == ["a", "b", "c"]
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "a", "2": "c"}}))
    with pytest.raises(ValueError, match="ids"):
        class_labels_from_model_dir(tmp_path)
