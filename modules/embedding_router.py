"""The hybrid embedding router: four similarity signals, a confidence, a cascade, then keywords.

Per expert, at start-up: one vector per keyword, their L2-normalised mean (centroid) and a
description vector. Per query, one vectorised pass computes the reference's four signals for
every expert (`max_keyword`, `description`, `mean_keyword`, `top3_vote`) and weighs them with
`scoring_weights` into a raw hybrid score.

How the raw scores become a confidence is where this router differs from the reference
(`scoring: "reference"` keeps the reference's softmax for comparison):

- `scoring: "standardized"` (default). Raw cosine scores live on an encoder-specific scale (USE,
  MiniLM and e5 put unrelated texts at different cosines), and a plain softmax over N experts is
  flat for large N. So the raw scores are first standardised against the scores the experts give
  a fixed set of generic, off-topic sentences (`BACKGROUND_TEXTS`): a score of 3 means "three
  standard deviations above what an unrelated question gets", whatever the encoder. A constant
  competitor, "none of these experts", enters the softmax at `oos_score`; it takes the
  probability mass when no expert stands out, which is what sends off-topic and injection text to
  the fallback expert, and since unrelated experts sit near 0 they add little mass, so the top
  probability barely depends on how many experts there are.
- Before that, half of a query's mean score over the experts is taken off each expert's score
  (`expert_centering`), and a description is scored by its sentence closest to the query
  (`description_scoring`): a Spanish or a long query, less similar to every keyword, is judged
  by how far its best expert stands out, and a two-language description matches either language.
  Both were chosen leave-one-dataset-out (bench/routing_lodo.py), like the constants.
- A calibration file (`calibration_file`, written by `main.py calibrate`, see calibration.py)
  learns on top of those probabilities, never instead of them: a residual read-out over the
  query vector, for the experts that had labelled rows only. It is tied to the experts and the
  encoder it was fitted on and is ignored (with a warning) when they change.

The chain is the reference's: the last user message ("embedding"), then the last
`context_messages` messages joined ("cascade"), then the keyword + fuzzy stage of
generic_router ("keyword"), then the fallback expert (id 0).
"""

from __future__ import annotations

import hashlib
import re
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np

from modules.calibration import Readout, apply_readout, readout_from_json, softmax
from modules.chat_types import RouteDecision, RouteMethod
from modules.config_manager import AppConfig, ExpertConfig, RouterConfig
from modules.encoding.encoders import Encoder, build_encoder, cached_vectors
from modules.generic_router import (
    FALLBACK_EXPERT_ID,
    KeywordRouter,
    join_recent_user_texts,
    normalize_text,
)

logger = logging.getLogger("lemoe.router")

SIGNALS = ("max_keyword", "description", "mean_keyword", "top3_vote")
# The reference counts a top-3 keyword as a vote when its cosine exceeds this.
TOP3_VOTE_COSINE = 0.40
# Generic questions no specialist of a typical gateway covers, in the two languages the
# product is used in. Their scores are the "unrelated question" baseline the standardised
# scores are measured against. Chit-chat and assistant-related questions are left out on
# purpose: those are domains people do configure experts for.
BACKGROUND_TEXTS = (
    "What is the capital of Australia?",
    "Who painted the Mona Lisa?",
    "Explain how photosynthesis works.",
    "Why is the sky blue?",
    "Tell me about the history of the Roman Empire.",
    "Who won the football world cup in 2010?",
    "What are black holes made of?",
    "Recommend a good science fiction novel.",
    "How tall is Mount Everest?",
    "What is the meaning of life?",
    "Summarize the plot of Hamlet.",
    "How do vaccines train the immune system?",
    "What caused the First World War?",
    "Which planet has the most moons?",
    "Describe the life cycle of a butterfly.",
    "What is the difference between a virus and a bacterium?",
    "Who was Napoleon Bonaparte?",
    "How do airplanes stay in the air?",
    "What are the rules of chess?",
    "Give me some tips for growing tomatoes.",
    "What is quantum entanglement?",
    "How many bones are in the human body?",
    "What language is spoken in Brazil?",
    "Explain the theory of evolution.",
    "What is the best way to learn to play the guitar?",
    "Who invented the telephone?",
    "Why do cats purr?",
    "What is the tallest building in the world?",
    "How does the stock market work?",
    "What is democracy?",
    "¿Cuál es la capital de Australia?",
    "¿Quién pintó la Mona Lisa?",
    "Explícame cómo funciona la fotosíntesis.",
    "¿Por qué el cielo es azul?",
    "Háblame de la historia del Imperio romano.",
    "¿Quién ganó el mundial de fútbol de 2010?",
    "¿Qué es un agujero negro?",
    "Recomiéndame una buena novela de ciencia ficción.",
    "¿Cuánto mide el monte Everest?",
    "¿Cuál es el sentido de la vida?",
    "Resume el argumento de Hamlet.",
    "¿Cómo funcionan las vacunas?",
    "¿Qué causó la Primera Guerra Mundial?",
    "¿Qué planeta tiene más lunas?",
    "Describe el ciclo de vida de una mariposa.",
    "¿Quién fue Napoleón Bonaparte?",
    "¿Cómo vuelan los aviones?",
    "¿Cuáles son las reglas del ajedrez?",
    "Dame consejos para cultivar tomates.",
    "¿Qué es la democracia?",
)
# BACKGROUND_TEXTS holds this many English questions, then their Spanish counterparts.
ENGLISH_BACKGROUND_TEXTS = 30
# Under the project's data/ folder (kept out of git).
EMBEDDING_CACHE_DIR = "embedding_cache"

# Words by which a message points back at the conversation ("make IT shorter", "your previous
# answer", "¿y si ...?", "ahora en Python"). A message that the experts rule out joins the
# cascade only with one of these: otherwise it is a new, unrelated question and goes to the
# fallback expert instead of sticking to the earlier turns' expert. Normalised like keywords
# (lower case, no accents).
FOLLOW_UP_CUES = frozenset(
    {
        "previous",
        "above",
        "earlier",
        "your",
        "you said",
        "you wrote",
        "you just",
        "it",
        "that",
        "this",
        "them",
        "those",
        "these",
        "again",
        "instead",
        "continue",
        "same",
        "now",
        "rewrite",
        "rephrase",
        "shorter",
        "longer",
        "simpler",
        "more",
        "similar",
        "example",
        "examples",
        "what about",
        "how about",
        "what if",
        "and if",
        "anterior",
        "tu",
        "tus",
        "su",
        "sus",
        "dijiste",
        "escribiste",
        "lo",
        "la",
        "los",
        "las",
        "eso",
        "esto",
        "esta",
        "este",
        "estos",
        "ese",
        "esa",
        "otra vez",
        "de nuevo",
        "en lugar",
        "en vez",
        "continua",
        "mismo",
        "misma",
        "ahora",
        "reescribe",
        "reformula",
        "mas",
        "ejemplo",
        "ejemplos",
        "y si",
        "y que",
    }
)


def is_follow_up(text: str) -> bool:
    """Whether `text` reads as a continuation of the conversation (see FOLLOW_UP_CUES)."""
    words = normalize_text(text).split()
    return any(w in FOLLOW_UP_CUES for w in words) or any(
        f"{a} {b}" in FOLLOW_UP_CUES for a, b in pairwise(words)
    )




def unrelated_pair_cosine(background: np.ndarray) -> float:
    """Mean cosine between two unrelated questions of one language (the background texts).

    A new turn closer than this to the earlier turns continues their topic. Measured on the
    encoder in use, so it holds for any encoder; pairs across the English and Spanish halves
    are left out because many of those are translations of each other.
    """
    n = len(background)
    language = np.arange(n) >= ENGLISH_BACKGROUND_TEXTS
    same = (language[:, None] == language[None, :]) & ~np.eye(n, dtype=bool)
    return float((background @ background.T)[same].mean())


Scoring = Literal["standardized", "reference"]


@dataclass(frozen=True)
class EmbeddingSettings:
    """Router settings that the reference config does not have (documented in the README).

    Read from RouterConfig when it has these fields, else these defaults apply.
    """

    # "standardized": z-scores against BACKGROUND_TEXTS plus a "none" competitor;
    # "reference": the reference's softmax over raw hybrid scores.
    scoring: Scoring = "standardized"
    # Standardised score of the "none of these experts" competitor: a query whose best expert
    # does not clearly beat it goes down the chain and, failing that, to the fallback expert.
    oos_score: float = 2.0
    # Softmax temperature over standardised scores (softmax_temperature keeps its reference
    # meaning, raw-score units, for scoring "reference").
    standardized_temperature: float = 0.25
    # JSON file (inside the project) with a read-out learned by `calibrate`; "" = none.
    calibration_file: str = ""
    # With a calibration: when the standardised scoring gives "none" at least this share, the
    # query goes down the chain whatever the read-out says. The read-out only learned the kind
    # of off-topic text its labelled rows had; long jailbreak prompts look like none of it.
    calibrated_oos_gate: float = 0.7
    # Share of the mean score over all experts taken off each expert's score (queries and
    # background alike) before standardising. A Spanish or a long question is less similar to
    # every keyword than a short English one; measured against the other experts, its best
    # expert stands out as much as in English.
    expert_centering: float = 0.5
    # "sentences": a description is scored by its closest sentence, so a description that says
    # the same in English and Spanish is matched in either language as well as a one-language
    # one; "whole": as one text (the reference).
    description_scoring: Literal["whole", "sentences"] = "sentences"
    # A new turn that the last message alone routes with at least this probability to another
    # expert than the conversation's is "confidently about something else" and switches; below
    # it, a follow-up keeps the conversation's expert (bench/routing_lodo.py measures it on
    # follow-ups it was not chosen on).
    switch_confidence: float = 0.4
    # The same for a new turn that points back at the conversation ("make it shorter", "your
    # previous answer", FOLLOW_UP_CUES): it more likely refines the conversation's request than
    # starts another one.
    switch_confidence_follow_up: float = 0.9


def settings_from_router_config(config: RouterConfig) -> EmbeddingSettings:
    """The embedding router's own settings, read from the validated router config."""
    return EmbeddingSettings(
        scoring=config.scoring,
        oos_score=config.oos_score,
        standardized_temperature=config.standardized_temperature,
        calibration_file=config.calibration_file,
        calibrated_oos_gate=config.calibrated_oos_gate,
        expert_centering=config.expert_centering,
        description_scoring=config.description_scoring,
        switch_confidence=config.switch_confidence,
        switch_confidence_follow_up=config.switch_confidence_follow_up,
    )


@dataclass(frozen=True)
class ExpertAnchors:
    """Every non-fallback expert's vectors, laid out for one matrix product per query."""

    labels: tuple[str, ...]
    # All keyword vectors, expert after expert (nk x d), and which expert owns each row.
    keyword_vectors: np.ndarray
    keyword_owner: np.ndarray
    # (E x max_keywords) row indices into keyword_vectors, padded with -1.
    keyword_slots: np.ndarray
    centroids: np.ndarray
    # One row per description part (see description_parts), expert after expert, and where
    # each expert's rows start.
    description_vectors: np.ndarray
    description_starts: np.ndarray
    # Identifies the texts and encoder the vectors came from (a calibration must match it).
    fingerprint: str


def routed_experts(experts: Sequence[ExpertConfig]) -> list[ExpertConfig]:
    """The experts that can win a route: all but the fallback, with something to match on."""
    return [
        e
        for e in experts
        if e.id != FALLBACK_EXPERT_ID and (e.keywords or e.description.strip())
    ]


def description_parts(description: str, split: bool) -> list[str]:
    """The texts an expert's description is scored by: the whole, or each sentence of it."""
    if not split:
        return [description]
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", description) if p.strip()]
    return parts or [description]


def build_anchors(
    experts: Sequence[ExpertConfig],
    encoder: Encoder,
    cache_dir: Path | None,
    split_descriptions: bool = False,
) -> ExpertAnchors:
    """Encode every keyword and description once (or read them from the cache)."""
    ranked = routed_experts(experts)
    if not ranked:
        raise ValueError("no expert besides the fallback has keywords or a description")
    keywords = [kw for e in ranked for kw in (e.keywords or [e.description])]
    owner = np.array(
        [i for i, e in enumerate(ranked) for _ in (e.keywords or [e.description])],
        dtype=np.int64,
    )
    # An expert without a description is described by its keywords.
    parts_of = [
        description_parts(e.description.strip() or ", ".join(e.keywords), split_descriptions)
        for e in ranked
    ]
    descriptions = [part for parts in parts_of for part in parts]
    vectors = cached_vectors(encoder, keywords + descriptions, cache_dir)
    keyword_vectors, description_vectors = (
        vectors[: len(keywords)],
        vectors[len(keywords) :],
    )
    counts = np.bincount(owner, minlength=len(ranked))
    slots = np.full((len(ranked), int(counts.max())), -1, dtype=np.int64)
    for i in range(len(ranked)):
        rows = np.flatnonzero(owner == i)
        slots[i, : len(rows)] = rows
    centroids = np.stack(
        [keyword_vectors[owner == i].mean(axis=0) for i in range(len(ranked))]
    )
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    digest = hashlib.sha256(
        json.dumps(
            [encoder.name, [e.label for e in ranked], keywords, descriptions]
        ).encode()
    )
    return ExpertAnchors(
        labels=tuple(e.label for e in ranked),
        keyword_vectors=keyword_vectors,
        keyword_owner=owner,
        keyword_slots=slots,
        centroids=centroids.astype(np.float32),
        description_vectors=description_vectors,
        description_starts=np.cumsum([0] + [len(p) for p in parts_of[:-1]]).astype(np.int64),
        fingerprint=digest.hexdigest()[:32],
    )


def hybrid_signals(
    anchors: ExpertAnchors, query_vectors: np.ndarray
) -> dict[str, np.ndarray]:
    """The four reference signals for every query (rows) and expert (columns)."""
    sims = query_vectors @ anchors.keyword_vectors.T  # n x nk
    valid = anchors.keyword_slots >= 0  # E x K
    per_slot = sims[:, np.where(valid, anchors.keyword_slots, 0)]  # n x E x K
    counts = valid.sum(axis=1)
    max_keyword = np.where(valid, per_slot, -np.inf).max(axis=2)
    mean_keyword = np.where(valid, per_slot, 0.0).sum(axis=2) / counts
    # Padding sorts first (-inf), so the last three are the real top three when there are
    # three; with fewer keywords the vote is the share of those that pass.
    top3 = np.sort(np.where(valid, per_slot, -np.inf), axis=2)[:, :, -3:]
    votes = (top3 > TOP3_VOTE_COSINE).sum(axis=2) / np.minimum(counts, 3)
    description = np.maximum.reduceat(
        query_vectors @ anchors.description_vectors.T, anchors.description_starts, axis=1
    )
    return {
        "max_keyword": max_keyword,
        "description": description,
        "mean_keyword": mean_keyword,
        "top3_vote": votes.astype(np.float32),
    }


def hybrid_scores(
    signals: Mapping[str, np.ndarray], weights: Mapping[str, float]
) -> np.ndarray:
    """The weighted sum of the signals (n x E)."""
    return sum(
        (float(weights[name]) * signals[name] for name in SIGNALS),
        np.zeros_like(signals["description"]),
    )


def reference_probabilities(raw: np.ndarray, temperature: float) -> np.ndarray:
    """The reference's confidence: softmax(raw / T) over the experts, with a zero "none" column."""
    probs = softmax(raw / temperature)
    return np.concatenate([probs, np.zeros((raw.shape[0], 1))], axis=1)


def standardized_probabilities(
    raw: np.ndarray,
    background: tuple[float, float],
    oos_score: float,
    temperature: float,
) -> np.ndarray:
    """Softmax over standardised scores plus the "none" competitor (last column)."""
    mean, std = background
    z = (raw - mean) / std
    logits = (
        np.concatenate([z, np.full((raw.shape[0], 1), oos_score)], axis=1) / temperature
    )
    return softmax(logits)


def center_scores(raw: np.ndarray, share: float) -> np.ndarray:
    """Each row's scores less `share` of that row's mean over the experts (see expert_centering).

    With one expert there is nothing to measure it against: its scores stay as they are."""
    if raw.shape[1] < 2 or not share:
        return raw
    return raw - share * raw.mean(axis=1, keepdims=True)


def background_stats(raw_background: np.ndarray) -> tuple[float, float]:
    """Mean and spread of the scores unrelated text gets, pooled over all experts.

    (Each expert measured against its own background scores was tried: worse on every public
    set, bench/routing_lodo.py.)"""
    return float(raw_background.mean()), max(float(raw_background.std()), 1e-6)


def load_readout(path: Path, anchors: ExpertAnchors) -> Readout | None:
    """Read a calibration file; a stale or unreadable one is ignored with a warning."""
    try:
        readout = readout_from_json(
            json.loads(path.read_text(encoding="utf-8")),
            anchors.labels,
            anchors.fingerprint,
            anchors.keyword_vectors.shape[1],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning(
            "calibration file %s ignored: cannot read it (%s)", path, type(exc).__name__
        )
        return None
    if readout is None:
        logger.warning(
            "calibration file %s ignored: it was fitted on other experts or another encoder, or by an older LeMoE; re-run calibrate",
            path,
        )
    return readout


@dataclass
class _Step:
    probs: np.ndarray  # (E + 1,), last = "none"
    scores: dict[str, float] = field(default_factory=dict)
    # The bar the winner must reach: the calibration's for decisions its read-out made.
    threshold: float = 0.0
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


class EmbeddingRouter:
    """The reference chain with standardised (or calibrated) confidence.

    `route` costs one encoder call for the last message, and one more only when the cascade
    runs. Decisions carry every expert's probability (the fallback's is the "none" share).
    """

    def __init__(
        self,
        experts: Sequence[ExpertConfig],
        config: RouterConfig,
        encoder: Encoder,
        cache_dir: Path | None = None,
        settings: EmbeddingSettings | None = None,
        project_dir: Path | None = None,
    ) -> None:
        fallback = next((e for e in experts if e.id == FALLBACK_EXPERT_ID), None)
        if fallback is None:
            raise ValueError("the fallback expert (id 0) is missing")
        self._fallback = fallback
        self._ids = {e.label: e.id for e in experts}
        self._config = config
        self._settings = settings or settings_from_router_config(config)
        self._encoder = encoder
        self.anchors = build_anchors(
            experts,
            encoder,
            cache_dir,
            # The reference scores a description as one text.
            self._settings.scoring != "reference" and self._settings.description_scoring == "sentences",
        )
        self._weights = config.scoring_weights.model_dump()
        background = cached_vectors(
            encoder, list(BACKGROUND_TEXTS), cache_dir, kind="query"
        )
        self._background = background_stats(
            self._centered(hybrid_scores(hybrid_signals(self.anchors, background), self._weights)),
        )
        self._topic_cosine = unrelated_pair_cosine(background)
        self._keywords = KeywordRouter(experts, config)
        self.readout: Readout | None = None
        if self._settings.calibration_file:
            path = Path(self._settings.calibration_file)
            if not path.is_absolute():
                path = (project_dir or Path.cwd()) / path
            self.readout = load_readout(path, self.anchors)

    def _centered(self, raw: np.ndarray) -> np.ndarray:
        return center_scores(raw, self._settings.expert_centering)

    @property
    def settings(self) -> EmbeddingSettings:
        return self._settings

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encoder.encode_queries(list(texts))

    def standardized_probabilities(self, query_vectors: np.ndarray) -> np.ndarray:
        """The configuration-only probabilities (reference or standardised), ignoring any read-out."""
        raw = hybrid_scores(hybrid_signals(self.anchors, query_vectors), self._weights)
        if self._settings.scoring == "reference":
            return reference_probabilities(raw, self._config.softmax_temperature)
        return standardized_probabilities(
            self._centered(raw),
            self._background,
            self._settings.oos_score,
            self._settings.standardized_temperature,
        )

    @property
    def config_threshold(self) -> float:
        return self._config.confidence_threshold

    def probabilities(self, query_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expert probabilities plus "none" (last column) for a batch of query vectors, and
        each row's confidence threshold."""
        base = self.standardized_probabilities(query_vectors)
        thresholds = np.full(len(base), self._config.confidence_threshold)
        if self.readout is None:
            return base, thresholds
        probs, tuned = apply_readout(
            base, query_vectors, self.readout, self._settings.calibrated_oos_gate
        )
        return probs, np.where(tuned, self.readout.threshold, thresholds)

    def route(self, user_texts: Sequence[str]) -> RouteDecision:
        """Choose an expert for the conversation whose user turns are `user_texts`."""
        last = user_texts[-1] if user_texts else ""
        if not last.strip():
            return self._keywords.route(user_texts)
        if self._settings.scoring == "reference":
            return self._route_as_reference(user_texts)
        step = self._score(last)
        decision = self._accept(step, "embedding", None)
        earlier = [t for t in user_texts[:-1] if t.strip()]
        if not earlier:
            return decision or self._keywords_or_fallback(user_texts, step, None)
        if decision is not None and decision.score >= max(
            self._settings.switch_confidence, self._settings.switch_confidence_follow_up
        ):
            # Confidently about one expert: whatever came before, this turn switches to it
            # (or stays), so the earlier turns need no encoder pass.
            return decision
        return self._route_follow_up(user_texts, earlier, step, decision)

    def _route_follow_up(
        self,
        user_texts: Sequence[str],
        earlier: Sequence[str],
        step: _Step,
        decision: RouteDecision | None,
    ) -> RouteDecision:
        # Stateless stickiness: the earlier turns (joined, newest kept) decide the
        # conversation's expert, and a new turn keeps it unless the turn is confidently about
        # something else, or is a new question the experts rule out that neither points back
        # ("make it shorter") nor continues the earlier topic.
        context = join_recent_user_texts(
            earlier, max(self._config.context_messages - 1, 1), self._config.context_max_chars
        )
        context_step = self._score(context)
        # The conversation's expert is what the earlier turns alone would get, down the chain.
        conversation = self._accept(context_step, "cascade", context) or self._keywords_or_fallback(
            earlier, context_step, context
        )
        points_back = is_follow_up(user_texts[-1])
        bar = self._settings.switch_confidence_follow_up if points_back else self._settings.switch_confidence
        if decision is not None and (decision.label == conversation.label or decision.score >= bar):
            return decision
        continues = points_back or float(step.vector @ context_step.vector) >= self._topic_cosine
        if step.probs[-1] >= 0.5 and not continues:
            return self._keywords_or_fallback(user_texts, step, context)
        return conversation

    def _keywords_or_fallback(
        self, user_texts: Sequence[str], step: _Step, context: str | None
    ) -> RouteDecision:
        # Keywords may only settle what the embedding left open between experts: when "none
        # of these experts" won, a few fuzzy word matches (long jailbreak prompts hit many) are
        # weaker evidence than the whole-text similarity that ruled the experts out.
        none_won = step.probs[-1] >= step.probs[:-1].max()
        return self._keywords.route_or_fall_back(
            user_texts, not none_won, step.scores[self._fallback.label], step.scores, context)

    def _route_as_reference(self, user_texts: Sequence[str]) -> RouteDecision:
        # The reference chain as its README describes it, kept for comparison: the last
        # message, the joined recent messages, keywords, the fallback expert.
        step = self._score(user_texts[-1])
        decision = self._accept(step, "embedding", None)
        if decision is not None:
            return decision
        context = join_recent_user_texts(
            user_texts, self._config.context_messages, self._config.context_max_chars
        )
        if len(user_texts) > 1 and context.strip():
            step = self._score(context)
            decision = self._accept(step, "cascade", context)
            if decision is not None:
                return decision
        if self._config.keyword_fallback:
            keyword_decision = self._keywords.route(user_texts)
            if keyword_decision.expert_id != self._fallback.id:
                return keyword_decision
        best = max(step.scores.values())
        return RouteDecision(
            self._fallback.id,
            self._fallback.label,
            best,
            "fallback",
            step.scores,
            context if len(user_texts) > 1 else None,
        )

    def _score(self, text: str) -> _Step:
        vectors = self._encoder.encode_queries([text])
        probs, thresholds = self.probabilities(vectors)
        scores = {label: float(p) for label, p in zip(self.anchors.labels, probs[0, :-1])}
        # The fallback expert's score is the share of "none of these experts".
        scores[self._fallback.label] = float(probs[0, -1])
        return _Step(probs[0], scores, float(thresholds[0]), vectors[0])

    def _accept(
        self, step: _Step, method: RouteMethod, context: str | None
    ) -> RouteDecision | None:
        best = int(np.argmax(step.probs[:-1]))
        confidence = float(step.probs[best])
        if confidence < step.threshold or confidence <= float(step.probs[-1]):
            return None
        label = self.anchors.labels[best]
        return RouteDecision(
            self._ids[label], label, confidence, method, step.scores, context
        )


def build_embedding_router(
    config: AppConfig, cache_dir: Path | None = None
) -> EmbeddingRouter | KeywordRouter:
    """The router `config.router.model_path` asks for: embedding, or keyword-only for "".

    Keyword and description vectors are cached under `<project>/data/embedding_cache` unless
    `cache_dir` says otherwise.
    """
    if not routed_experts(config.experts):
        # A first setup with one model: nothing to choose between, every request goes to the
        # fallback expert, and there is no reason to load an encoder for that.
        logger.info("no expert besides the fallback has keywords or a description: every request goes to the fallback")
        return KeywordRouter(config.experts, config.router)
    encoder = build_encoder(config.router.model_path)
    if encoder is None:
        return KeywordRouter(config.experts, config.router)
    return EmbeddingRouter(
        config.experts,
        config.router,
        encoder,
        cache_dir=cache_dir or config.project_dir / "data" / EMBEDDING_CACHE_DIR,
        project_dir=config.project_dir,
    )
