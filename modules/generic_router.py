"""Keyword + fuzzy routing (rapidfuzz), and the cascade over recent user messages.

Where the hybrid router is: the reference names this file as its home. Here the hybrid
embedding router (four signals, softmax, cascade) is `modules/embedding_router.py`, and
`build_router` in `modules/router_factory.py` builds it; this file keeps the keyword stage that
both the embedding and the classifier router end their chains with, and the keyword-only router.

This is the last stage of the reference fallback chain: a route is accepted when its keyword
score reaches `confidence_threshold * 0.5`, otherwise the request goes to the fallback expert
(id 0). The scoring is a pure function over a precomputed `KeywordIndex`, so the hybrid
embedding router can end its own chain with the same stage instead of re-implementing it.

Keywords in experts.json are written without accents ("codigo", "traduccion") while users type
accents, inflections and English; both sides are therefore normalised the same way and
near-misses are caught by fuzzy matching.
"""

from __future__ import annotations

import math
import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rapidfuzz import fuzz, process

from modules.chat_types import RouteDecision, RouteMethod, clip_message
from modules.config_manager import ExpertConfig, RouterConfig

FALLBACK_EXPERT_ID = 0
# The reference accepts a keyword route at half the model confidence threshold: keyword scores
# are coarser evidence than a calibrated probability, so they get a lower bar.
KEYWORD_ACCEPT_FACTOR = 0.5
# fuzz.ratio (0-100) a query word needs to count as a keyword. 80 is the lowest value that still
# joins common Spanish inflections ("programando"/"programar" is exactly 80, "traduce"/"traducir"
# 80, "scripts"/"script" 92); going lower starts pairing unrelated words. Known cost at 80:
# a few look-alikes also pass ("modelo"/"modulo" 83, "clave"/"clase" 80).
FUZZY_CUTOFF = 80.0
# Three letters or fewer ("api", "css", "red", "ssh") are exact-only: one edit on such a word
# is a different word ("red"/"read", "css"/"cs"), so fuzzy similarity there is noise.
SHORT_KEYWORD_LEN = 3
# How much one fully matching keyword contributes in the noisy-OR. 0.5 lets a single exact
# match reach 0.5, which passes `threshold * 0.5` for every threshold in [0, 1], and a single
# fuzzy match (>= 0.8 similarity -> >= 0.4) passes at the default threshold 0.4. Keeping it
# below 1.0 stops one match from saturating the score, so an expert with more distinct
# matches still outranks one with a single match (1, 2, 3 exact matches: 0.5, 0.75, 0.875).
MATCH_WEIGHT = 0.5
# Step 1 scores one message whatever its size; a pasted 1 MB document must not cost seconds of
# fuzzy matching. Head and tail are kept because the instruction is usually at one end
# ("Translate this: ..." or "... what does this code do?").
MAX_SCORED_MESSAGE_CHARS = 8000

# Underscore counts as a separator too: "snake_case" should read as two words.
_SEPARATORS_RE = re.compile(r"[\W_]+")
_WHITESPACE_RE = re.compile(r"\s")


def normalize_text(text: str) -> str:
    """Lower-case, accent-free, punctuation-free text with single spaces between words."""
    decomposed = unicodedata.normalize("NFKD", text)
    # NFKD splits "ó" into "o" + a combining accent; dropping the combining marks leaves the
    # unaccented letter, which is how the keywords are written.
    unaccented = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _SEPARATORS_RE.sub(" ", unaccented.casefold()).strip()


@dataclass(frozen=True)
class _FuzzyChoices:
    """Keywords of one word count, laid out for one rapidfuzz call per query unit."""

    # Sorted by length: fuzz.ratio = 2 * common / (len(a) + len(b)) can only reach the cut-off
    # for lengths within a fixed factor of each other, so a query unit is compared with one
    # contiguous slice found by bisection instead of every keyword.
    keywords: tuple[str, ...]
    lengths: tuple[int, ...]
    # For each keyword, the positions (in KeywordIndex.labels) of the experts that list it.
    owners: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class KeywordIndex:
    """Every expert's normalised keywords, precomputed once so that scoring a query is cheap."""

    # Labels of the experts that can win by keywords (the fallback expert is never among them).
    labels: tuple[str, ...]
    # Normalised keyword (words joined by one space) -> positions of the experts that list it.
    exact_owners: Mapping[str, tuple[int, ...]]
    # Word count -> keywords long enough to be matched fuzzily.
    fuzzy_choices: Mapping[int, _FuzzyChoices]
    # The word counts that occur among keywords: the n-gram sizes a query is cut into.
    word_counts: tuple[int, ...]


def keyword_index_from_experts(experts: Sequence[ExpertConfig]) -> KeywordIndex:
    """Build the index; the fallback expert is left out so it can never win by keywords."""
    ranked = [e for e in experts if e.id != FALLBACK_EXPERT_ID]
    owners: dict[str, list[int]] = {}
    for position, expert in enumerate(ranked):
        # A keyword listed twice, or twice after normalising ("código", "codigo"), is one.
        for keyword in dict.fromkeys(normalize_text(raw) for raw in expert.keywords):
            if keyword:
                owners.setdefault(keyword, []).append(position)
    by_count: dict[int, list[str]] = {}
    for keyword in owners:
        if len(keyword) > SHORT_KEYWORD_LEN:
            by_count.setdefault(keyword.count(" ") + 1, []).append(keyword)
    return KeywordIndex(
        labels=tuple(e.label for e in ranked),
        exact_owners={k: tuple(v) for k, v in owners.items()},
        fuzzy_choices={n: _fuzzy_choices_from_keywords(kws, owners) for n, kws in by_count.items()},
        word_counts=tuple(sorted({k.count(" ") + 1 for k in owners})),
    )


def _fuzzy_choices_from_keywords(keywords: list[str], owners: Mapping[str, list[int]]) -> _FuzzyChoices:
    ordered = sorted(keywords, key=lambda k: (len(k), k))
    return _FuzzyChoices(
        keywords=tuple(ordered),
        lengths=tuple(len(k) for k in ordered),
        owners=tuple(tuple(owners[k]) for k in ordered),
    )


def keyword_scores(text: str, index: KeywordIndex) -> dict[str, float]:
    """Score every non-fallback expert in [0, 1] by how many of its keywords `text` contains.

    Per keyword the evidence is 1.0 for an exact word or phrase match, else the best fuzzy
    similarity (fuzz.ratio / 100, at least FUZZY_CUTOFF) with a query word or phrase. An
    expert's score is the noisy-OR of its keywords' evidence, 1 - prod(1 - MATCH_WEIGHT * s):
    each further distinct keyword raises the score and none can lower it, a keyword repeated
    in the text counts once, and the score stays below 1.
    """
    words = normalize_text(text).split()
    evidence: list[dict[str, float]] = [{} for _ in index.labels]
    for n in index.word_counts:
        fuzzy = index.fuzzy_choices.get(n)
        for unit in _ngrams(words, n):
            owners = index.exact_owners.get(unit)
            if owners is not None:
                for position in owners:
                    evidence[position][unit] = 1.0
            elif fuzzy is not None and len(unit) > SHORT_KEYWORD_LEN:
                # Only words that are no keyword themselves are read as a near-miss: a user who
                # typed "traduce" literally should not also be credited with "traducir".
                _add_fuzzy_evidence(unit, fuzzy, evidence)
    return {label: _noisy_or(ev.values()) for label, ev in zip(index.labels, evidence, strict=True)}


def _ngrams(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _add_fuzzy_evidence(unit: str, choices: _FuzzyChoices, evidence: list[dict[str, float]]) -> None:
    # One query word backs at most one keyword per expert (its closest): otherwise a single
    # word near several spellings of one idea ("traducir", "traduccion", "traduce") would
    # count as several distinct matches. The choice depends only on the word, so adding
    # words to a query can still only add evidence (the score stays monotonic).
    # ratio <= 2 * min(u, k) / (u + k), so reaching cut-off c needs u * c / (2 - c) <= k
    # <= u * (2 - c) / c; lengths outside that band cannot match.
    cutoff = FUZZY_CUTOFF / 100.0
    lo = bisect_left(choices.lengths, math.floor(len(unit) * cutoff / (2.0 - cutoff)))
    hi = bisect_right(choices.lengths, math.ceil(len(unit) * (2.0 - cutoff) / cutoff))
    if lo >= hi:
        return
    closest: dict[int, tuple[float, str]] = {}
    candidates = choices.keywords[lo:hi]
    matches = process.extract(unit, candidates, scorer=fuzz.ratio, score_cutoff=FUZZY_CUTOFF, limit=None)
    for keyword, similarity, i in matches:
        if " " in keyword and not _words_align(unit, keyword):
            continue
        for position in choices.owners[lo + i]:
            if position not in closest or similarity > closest[position][0]:
                closest[position] = (similarity, keyword)
    for position, (similarity, keyword) in closest.items():
        strength = similarity / 100.0
        if strength > evidence[position].get(keyword, 0.0):
            evidence[position][keyword] = strength


def _words_align(unit: str, phrase: str) -> bool:
    # A whole-string ratio lets one wrong word hide in a long phrase ("base tiene datos" is 83
    # against "base de datos"), so each word must match its counterpart on its own: short words
    # exactly, longer ones at the cut-off. The whole-string ratio is at least the lowest word
    # ratio, so the rapidfuzz pass before this loses no phrase that aligns.
    for word, keyword_word in zip(unit.split(" "), phrase.split(" "), strict=True):
        if len(keyword_word) <= SHORT_KEYWORD_LEN or len(word) <= SHORT_KEYWORD_LEN:
            if word != keyword_word:
                return False
        elif fuzz.ratio(word, keyword_word, score_cutoff=FUZZY_CUTOFF) == 0.0:
            return False
    return True


def _noisy_or(strengths: Iterable[float]) -> float:
    miss = 1.0
    for strength in strengths:
        miss *= 1.0 - MATCH_WEIGHT * strength
    return 1.0 - miss


def join_recent_user_texts(user_texts: Sequence[str], count: int, max_chars: int) -> str:
    """The cascade text: the last `count` user messages joined by newlines, newest kept.

    When the joined text is longer than `max_chars` its oldest part is cut, and a word split by
    the cut is dropped too, so that "python" cut to "thon" cannot match something else.
    """
    joined = "\n".join(t for t in user_texts[-count:] if t.strip())
    if len(joined) <= max_chars:
        return joined
    kept = joined[-max_chars:]
    if not joined[-max_chars - 1].isspace():
        boundary = _WHITESPACE_RE.search(kept)
        if boundary is not None:
            kept = kept[boundary.end() :]
    return kept.strip()


def pick_winner(scores: Mapping[str, float], accept_at: float) -> str | None:
    """The top label if it reaches `accept_at` and no other expert has the same score."""
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
    if not ranked or ranked[0][1] < accept_at or ranked[0][1] <= 0.0:
        return None
    # A tie means the text fits two experts equally: let the next step (more context, or the
    # fallback expert) decide rather than picking by configuration order.
    if len(ranked) > 1 and math.isclose(ranked[0][1], ranked[1][1], rel_tol=0.0, abs_tol=1e-9):
        return None
    return ranked[0][0]


class KeywordRouter:
    """Routes by keywords: the last user message first, then the recent ones, then fallback."""

    def __init__(self, experts: Sequence[ExpertConfig], router_config: RouterConfig) -> None:
        fallback = next((e for e in experts if e.id == FALLBACK_EXPERT_ID), None)
        if fallback is None:
            raise ValueError("the fallback expert (id 0) is missing")
        self._fallback = fallback
        self._ids = {e.label: e.id for e in experts}
        self._index = keyword_index_from_experts(experts)
        self._config = router_config
        self._accept_at = router_config.confidence_threshold * KEYWORD_ACCEPT_FACTOR

    def route_or_fall_back(
        self, user_texts: Sequence[str], allowed: bool, fallback_score: float,
        scores: dict[str, float], context: str | None,
    ) -> RouteDecision:
        """The tail that model-based routers share: the keyword stage (when `allowed` and
        `keyword_fallback` is on), and when it picks no specialist, the fallback expert with the
        deciding step's `scores` and `context` so the decision stays explainable."""
        if allowed and self._config.keyword_fallback:
            decision = self.route(user_texts)
            if decision.expert_id != self._fallback.id:
                return decision
        return RouteDecision(self._fallback.id, self._fallback.label, fallback_score, "fallback", scores, context)

    def route(self, user_texts: Sequence[str]) -> RouteDecision:
        """Choose an expert for the conversation whose user turns are `user_texts`."""
        # With keyword_fallback off and no router model this is keyword-only mode switched
        # off: the reference has nothing left to route with and sends everything to the
        # fallback expert. No step ran, so there are no scores to report.
        if not self._config.keyword_fallback:
            return self._fallback_decision(0.0, {}, None)
        last = clip_message(user_texts[-1], MAX_SCORED_MESSAGE_CHARS) if user_texts else ""
        scores = keyword_scores(last, self._index)
        winner = pick_winner(scores, self._accept_at)
        if winner is not None:
            return self._decision(winner, scores, "keyword", None)
        best_seen = max(scores.values(), default=0.0)
        count = self._config.context_messages
        # Without an earlier message in the window the cascade would only re-read (part of)
        # the last one, which has just failed: go straight to the fallback expert.
        if not any(t.strip() for t in user_texts[-count:-1]):
            return self._fallback_decision(best_seen, scores, None)
        context = join_recent_user_texts(user_texts, count, self._config.context_max_chars)
        scores = keyword_scores(context, self._index)
        winner = pick_winner(scores, self._accept_at)
        if winner is not None:
            return self._decision(winner, scores, "cascade", context)
        return self._fallback_decision(max(best_seen, *scores.values(), 0.0), scores, context)

    def _decision(
        self, label: str, scores: dict[str, float], method: RouteMethod, context: str | None
    ) -> RouteDecision:
        return RouteDecision(self._ids[label], label, scores[label], method, scores, context)

    def _fallback_decision(self, score: float, scores: dict[str, float], context: str | None) -> RouteDecision:
        # context_used is kept when the cascade ran, so a fallback can be explained too.
        return RouteDecision(self._fallback.id, self._fallback.label, score, "fallback", scores, context)
