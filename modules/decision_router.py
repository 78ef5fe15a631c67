"""The classifier router (`router.mode: "model"` or `router.router_type: "classification"`).

A fine-tuned Hugging Face sequence-classification model reads the last user message and gives a
probability per class. Its classes are matched to experts by name (`id2label` against expert
labels); a class that names no configured expert (CLINC's `oos`, say) stands for "none of the
specialists" and its probability goes to the fallback expert, as does that of a class named like
the fallback expert itself. A model none of whose classes names a specialist is refused when the
router is built.

The chain is the reference's, with the embedding router's guard against off-topic questions:
1. the last message: a specialist whose probability reaches `confidence_threshold` wins
   ("classification");
2. the last `context_messages` user messages joined (newest kept, `context_max_chars`) scored the
   same way ("cascade");
3. the keyword + fuzzy stage of generic_router, accepted at half the threshold ("keyword");
4. the fallback expert ("fallback").
When the model itself is sure that no specialist fits (the out-of-scope classes reach the
threshold), steps 2 and 3 are skipped: earlier turns and a stray keyword must not pull a new,
unrelated question to a specialist. A message that reads as a follow-up ("make it shorter")
still gets the cascade.

Two runtimes. `python main.py train` (modules/classifier_training.py) saves, next to the Hugging
Face weights, an int8 ONNX export of the same model (`ONNX_MODEL_FILE`): when it is there the
router runs it on onnxruntime with the `tokenizers` library, several times faster and without
torch. Any other model folder with the right labels runs on transformers + torch, imported only
then. Nothing is downloaded: the folder must be complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from modules.chat_types import RouteDecision, RouteMethod, clip_message
from modules.classifier_heads import classification_logits
from modules.config_manager import ExpertConfig, RouterConfig
from modules.embedding_router import is_follow_up, softmax
from modules.generic_router import (
    FALLBACK_EXPERT_ID,
    KeywordRouter,
    join_recent_user_texts,
)

logger = logging.getLogger("lemoe.router")

# Tokens the model reads per text; a longer text keeps its first and last MAX_TOKENS / 2 tokens,
# where the instruction of a long message is ("Translate this: ..." / "... what does this do?").
# Cost grows with length: the int8 MiniLM-L6 export on one core takes about 1.6 ms for a short
# query and, for a 1,200-character message, 7 ms at 64 tokens, 11 ms at 96 and 15 ms at 128.
# Typed requests are far shorter than 64 tokens (CLINC150: 33 at most, 11 typical), so 64 costs
# no accuracy there and keeps long messages within a 10 ms budget.
MAX_TOKENS = 64
# Threads for one forward pass (onnxruntime or torch). A routing decision is one small pass,
# where splitting the work between cores costs more than it saves (on this 2-core VM two threads
# made a 1,200-character query 1.2-2x slower and p99 several times worse), and the server runs
# many requests side by side.
INFERENCE_THREADS = 1
# Characters kept before tokenising: bounds tokenizer cost for a pasted megabyte while leaving
# far more than MAX_TOKENS tokens at each end.
MAX_TOKENIZED_CHARS = 4000
# Written by train_classifier next to the weights: the same model exported to ONNX with int8
# weights. onnxruntime runs it several times faster than transformers on one core (about 1.5 ms
# against 8 ms for a short query), and serving it needs neither torch nor transformers.
ONNX_MODEL_FILE = "model.int8.onnx"
# "auto": the ONNX export when the folder has one, else transformers + torch.
Runtime = Literal["auto", "onnx", "torch"]


def class_labels_from_model_dir(model_dir: Path) -> list[str]:
    """The model's class names by class id, read from its config.json (without loading it)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"router model folder {model_dir} has no config.json (expected a Hugging Face model folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        id2label = {int(k): str(v) for k, v in config["id2label"].items()}
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"router model {config_path}: no readable id2label ({type(exc).__name__})") from exc
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"router model {config_path}: id2label ids are not 0..{len(id2label) - 1}")
    return [id2label[i] for i in range(len(id2label))]


def experts_for_classes(class_labels: Sequence[str], experts: Sequence[ExpertConfig]) -> list[str]:
    """The expert label each class routes to: its namesake, else the fallback expert.

    Raises ValueError when no class names a specialist: such a model could only ever answer
    "fallback", which is a configuration mistake (a model trained for other experts).
    """
    fallback = next(e.label for e in experts if e.id == FALLBACK_EXPERT_ID)
    specialists = {e.label for e in experts if e.id != FALLBACK_EXPERT_ID}
    mapped = [label if label in specialists else fallback for label in class_labels]
    if all(label == fallback for label in mapped):
        raise ValueError(
            f"none of the router model's labels ({', '.join(class_labels)}) names a configured expert "
            f"({', '.join(sorted(specialists))})"
        )
    return mapped


def class_to_expert_matrix(class_experts: Sequence[str], expert_labels: Sequence[str]) -> np.ndarray:
    """A (classes x experts) 0/1 matrix: class probabilities @ it = expert probabilities."""
    matrix = np.zeros((len(class_experts), len(expert_labels)), dtype=np.float32)
    for i, label in enumerate(class_experts):
        matrix[i, expert_labels.index(label)] = 1.0
    return matrix


def head_tail_ids(ids: Sequence[int], max_tokens: int) -> list[int]:
    """At most `max_tokens` token ids: the first and last halves of a longer sequence.

    The special tokens a tokenizer puts at both ends ([CLS] ... [SEP]) survive the cut.
    """
    if len(ids) <= max_tokens:
        return list(ids)
    head = max_tokens // 2
    return [*ids[:head], *ids[len(ids) - (max_tokens - head) :]]


@dataclass(frozen=True)
class _Step:
    """One scored text: the best expert, its probability, every expert's probability."""

    label: str
    probability: float
    scores: dict[str, float]


class DecisionRouter:
    """Routes with a fine-tuned sequence-classification model, then the reference's chain."""

    def __init__(
        self,
        experts: Sequence[ExpertConfig],
        router_config: RouterConfig,
        model_dir: Path,
        *,
        threads: int = INFERENCE_THREADS,
        max_tokens: int = MAX_TOKENS,
        runtime: Runtime = "auto",
    ) -> None:
        fallback = next((e for e in experts if e.id == FALLBACK_EXPERT_ID), None)
        if fallback is None:
            raise ValueError("the fallback expert (id 0) is missing")
        model_dir = Path(model_dir)
        # Labels are checked before any model library is imported: a wrong folder fails fast.
        class_labels = class_labels_from_model_dir(model_dir)
        class_experts = experts_for_classes(class_labels, experts)
        self._fallback = fallback
        self._ids = {e.label: e.id for e in experts}
        self._config = router_config
        self._max_tokens = max_tokens
        self.expert_labels: tuple[str, ...] = tuple(e.label for e in experts)
        self._to_experts = class_to_expert_matrix(class_experts, self.expert_labels)
        self._keywords = KeywordRouter(experts, router_config)
        self._pad_id = pad_token_id(model_dir)
        self.runtime = chosen_runtime(model_dir, runtime)
        self._model: _OnnxModel | _TorchModel = (
            _OnnxModel(model_dir, threads) if self.runtime == "onnx" else _TorchModel(model_dir, threads)
        )
        if self._model.num_labels != len(class_labels):
            raise ValueError(f"router model {model_dir}: config.json and the model disagree on the number of labels")
        _warn_about_label_mismatches(class_labels, experts, fallback.label)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """Each expert's probability (columns in `expert_labels` order) for a batch of texts."""
        encoded = self._model.token_ids([clip_message(t, MAX_TOKENIZED_CHARS) for t in texts])
        ids, mask = padded_batch([head_tail_ids(row, self._max_tokens) for row in encoded], self._pad_id)
        expert_probs: np.ndarray = self._model.class_probabilities(ids, mask) @ self._to_experts
        return expert_probs

    def route(self, user_texts: Sequence[str]) -> RouteDecision:
        """Choose an expert for the conversation whose user turns are `user_texts`."""
        last = user_texts[-1] if user_texts else ""
        if not last.strip():
            # Nothing for the model to read: the keyword router has the same rule for this.
            return self._keywords.route(user_texts)
        threshold = self._config.confidence_threshold
        step = self._score(last)
        if step.label != self._fallback.label and step.probability >= threshold:
            return self._decision(step, "classification", None)
        out_of_scope = step.label == self._fallback.label and step.probability >= threshold
        count = self._config.context_messages
        context = None
        # Without an earlier message in the window the cascade would re-read the last message.
        if any(t.strip() for t in user_texts[-count:-1]) and (not out_of_scope or is_follow_up(last)):
            context = join_recent_user_texts(user_texts, count, self._config.context_max_chars)
            context_step = self._score(context)
            if context_step.label != self._fallback.label and context_step.probability >= threshold:
                return self._decision(context_step, "cascade", context)
        return self._keywords.route_or_fall_back(
            user_texts, not out_of_scope, step.scores[self._fallback.label], step.scores, context)

    def _score(self, text: str) -> _Step:
        probs = self.probabilities([text])[0]
        best = int(np.argmax(probs))
        scores = {label: float(p) for label, p in zip(self.expert_labels, probs)}
        return _Step(self.expert_labels[best], float(probs[best]), scores)

    def _decision(self, step: _Step, method: RouteMethod, context: str | None) -> RouteDecision:
        return RouteDecision(self._ids[step.label], step.label, step.probability, method, step.scores, context)


def chosen_runtime(model_dir: Path, runtime: Runtime) -> Literal["onnx", "torch"]:
    """onnxruntime when the folder has LeMoE's ONNX export (and "torch" was not asked for)."""
    has_onnx = (model_dir / ONNX_MODEL_FILE).is_file() and (model_dir / "tokenizer.json").is_file()
    if runtime == "onnx" and not has_onnx:
        raise ValueError(f"router model {model_dir} has no {ONNX_MODEL_FILE} and tokenizer.json")
    if runtime == "torch" or not has_onnx:
        return "torch"
    return "onnx"


def pad_token_id(model_dir: Path) -> int:
    """The padding token id from config.json (padded positions are masked, so 0 is a safe default)."""
    try:
        value = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("pad_token_id")
    except (OSError, ValueError):
        return 0
    return value if isinstance(value, int) else 0


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as int64 arrays, rows padded on the right to the longest."""
    width = max((len(row) for row in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


class _OnnxModel:
    """The int8 ONNX export that train_classifier writes, on onnxruntime: no torch at all."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import onnxruntime  # type: ignore[import-untyped]
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The router cuts long inputs itself (head and tail) and pads batches itself.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(model_dir / ONNX_MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.num_labels = int(self._session.get_outputs()[0].shape[-1])

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def class_probabilities(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        logits = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return softmax(np.asarray(logits, dtype=np.float32))


class _TorchModel:
    """Any Hugging Face sequence-classification folder, on transformers + torch.

    A `--fast` folder's read-out (mean token vector, modules/classifier_heads.py) is honoured.
    """

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        # The head/tail cut happens after tokenising, so its "longer than 512 tokens" warning is moot.
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        # Process-wide, like the USE encoder's single BLAS thread (see INFERENCE_THREADS).
        torch.set_num_threads(threads)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self._model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
        except OSError as exc:
            raise ValueError(f"router model {model_dir} could not be loaded: {exc}") from exc
        self._model.eval()
        self.num_labels = int(self._model.config.num_labels)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        ids: list[list[int]] = self._tokenizer(list(texts))["input_ids"]
        return ids

    def class_probabilities(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = classification_logits(self._model, torch.from_numpy(ids), torch.from_numpy(mask))
            probs: np.ndarray = torch.softmax(logits.float(), dim=-1).numpy()
        return probs


def _warn_about_label_mismatches(class_labels: Sequence[str], experts: Sequence[ExpertConfig], fallback: str) -> None:
    # Both are legitimate (an "oos" class; an expert reached by keywords only) but worth a line
    # at start-up, since a typo in a label silently turns a class into "fallback".
    known = set(class_labels)
    to_fallback = [label for label in class_labels if label != fallback and label not in {e.label for e in experts}]
    if to_fallback:
        logger.info("router model classes routed to the fallback expert: %s", ", ".join(to_fallback))
    unreachable = [e.label for e in experts if e.id != FALLBACK_EXPERT_ID and e.label not in known]
    if unreachable:
        logger.warning("experts the router model has no class for (reachable by keywords only): %s", ", ".join(unreachable))
