"""Keyword + fuzzy scoring, and the keyword router's cascade over recent user messages."""

from __future__ import annotations

import pytest

from modules.config_manager import ExpertConfig, RouterConfig
from modules.generic_router import (
    KeywordIndex,
    KeywordRouter,
    join_recent_user_texts,
    keyword_index_from_experts,
    keyword_scores,
    normalize_text,
    pick_winner,
)

ACCEPT_AT_DEFAULT = 0.4 * 0.5


def make_expert(expert_id: int, label: str, keywords: list[str] | None = None) -> ExpertConfig:
    return ExpertConfig(
        id=expert_id,
        label=label,
        keywords=keywords or [],
        type="ollama",
        url="http://127.0.0.1:11434",
        model_name="qwen2.5:7b",
    )


EXPERTS = (
    make_expert(0, "fallback"),
    make_expert(
        1,
        "programador",
        (
            "codigo programar python javascript funcion script error bug html css clase objeto modulo "
            "api refactorizar code function class compile debug"
        ).split(),
    ),
    make_expert(
        2,
        "sysadmin",
        (
            "linux bash terminal comando servidor docker kubernetes nginx ssh permisos systemd red "
            "firewall disco proceso shell server network container cron"
        ).split(),
    ),
    make_expert(
        3,
        "traductor",
        (
            "traducir traduccion traduce ingles espanol frances aleman idioma translate translation "
            "english spanish french german language"
        ).split(),
    ),
    make_expert(4, "datos", ["base de datos", "machine learning", "sql", "consulta", "tabla"]),
)
LABELS = {"programador", "sysadmin", "traductor", "datos"}


@pytest.fixture(scope="module")
def index() -> KeywordIndex:
    return keyword_index_from_experts(EXPERTS)


def make_router(**router_fields: object) -> KeywordRouter:
    return KeywordRouter(EXPERTS, RouterConfig(**router_fields))


def top_label(scores: dict[str, float]) -> str:
    return max(scores, key=lambda label: scores[label])


# --- normalisation -------------------------------------------------------------------------


def test_normalize_strips_accents_case_and_punctuation() -> None:
    assert normalize_text("¿Cómo FUNCIONA esta Función?!") == "como funciona esta funcion"
    assert normalize_text("Traducción al ESPAÑOL, por favor.") == "traduccion al espanol por favor"
    assert normalize_text("snake_case--and   spaces\n\tnewline") == "snake case and spaces newline"


# --- scoring -------------------------------------------------------------------------------


def test_spanish_with_accents_matches_unaccented_keywords(index: KeywordIndex) -> None:
    scores = keyword_scores("¿Puedes revisar este código y la función?", index)
    assert top_label(scores) == "programador"
    assert scores["programador"] == pytest.approx(0.75)  # two exact matches: codigo, funcion
    assert scores["sysadmin"] == 0.0


def test_translation_request_with_accents_and_inflection(index: KeywordIndex) -> None:
    scores = keyword_scores("¿Me traduces esto al inglés?", index)
    assert top_label(scores) == "traductor"
    assert scores["traductor"] >= ACCEPT_AT_DEFAULT


def test_spanish_inflections_match_fuzzily(index: KeywordIndex) -> None:
    programando = keyword_scores("programando", index)["programador"]
    scripts = keyword_scores("scripts", index)["programador"]
    servidores = keyword_scores("servidores", index)["sysadmin"]
    assert 0.0 < programando < 0.5  # fuzzy, weaker than an exact match
    assert ACCEPT_AT_DEFAULT <= programando
    assert 0.4 < scripts < 0.5
    assert servidores >= ACCEPT_AT_DEFAULT


def test_english_case_and_punctuation(index: KeywordIndex) -> None:
    scores = keyword_scores("PYTHON!!! Why does my Function crash?", index)
    assert top_label(scores) == "programador"
    assert scores["programador"] == pytest.approx(0.75)
    network = keyword_scores("My SERVER can't reach the network...", index)
    assert top_label(network) == "sysadmin"


def test_multi_word_keyword_matches_as_a_phrase(index: KeywordIndex) -> None:
    assert keyword_scores("Necesito diseñar una Base-de-Datos", index)["datos"] == pytest.approx(0.5)
    assert keyword_scores("I study machine learning", index)["datos"] == pytest.approx(0.5)
    # The phrase's words apart, or in another order, are not the phrase.
    assert keyword_scores("la base tiene datos", index)["datos"] == 0.0
    assert keyword_scores("learning about machine tools", index)["datos"] == 0.0
    # An inflected phrase still matches fuzzily.
    assert keyword_scores("tengo dos bases de datos", index)["datos"] >= ACCEPT_AT_DEFAULT


def test_short_keywords_match_only_exactly(index: KeywordIndex) -> None:
    assert keyword_scores("problema de red en casa", index)["sysadmin"] == pytest.approx(0.5)
    assert keyword_scores("my CSS is broken", index)["programador"] == pytest.approx(0.5)
    for near_miss in ("read the docs", "reds", "apis", "cssx", "ssh2", "bugs"):
        scores = keyword_scores(near_miss, index)
        assert scores["sysadmin"] == 0.0, near_miss
        assert scores["programador"] == 0.0, near_miss


def test_unrelated_words_do_not_match(index: KeywordIndex) -> None:
    for text in ("hola, ¿qué tal el día?", "What is the weather like tomorrow?", "Make it shorter"):
        assert all(s == 0.0 for s in keyword_scores(text, index).values()), text


def test_scores_have_every_non_fallback_label_in_unit_range(index: KeywordIndex) -> None:
    text = "python docker traducir base de datos " * 20
    scores = keyword_scores(text, index)
    assert set(scores) == LABELS
    assert all(0.0 <= s < 1.0 for s in scores.values())
    assert set(keyword_scores("", index)) == LABELS


def test_noisy_or_more_matches_never_lower_the_score(index: KeywordIndex) -> None:
    steps = [
        "python",
        "python codigo",
        "python codigo programando",
        "python codigo programando bug",
        "python codigo programando bug docker nginx",
        "python codigo programando bug html css api",
    ]
    scores = [keyword_scores(text, index)["programador"] for text in steps]
    assert scores == sorted(scores)
    assert scores[1] > scores[0]  # a second distinct keyword raises the score
    assert scores[-1] > scores[-2]


def test_a_repeated_keyword_counts_once(index: KeywordIndex) -> None:
    once = keyword_scores("python", index)["programador"]
    assert keyword_scores("python Python PYTHON python", index)["programador"] == once


def test_one_word_backs_one_keyword_per_expert(index: KeywordIndex) -> None:
    # "traduce" is a keyword itself; it must not also count as a near-miss of "traducir".
    assert keyword_scores("traduce", index)["traductor"] == pytest.approx(0.5)


def test_fallback_expert_never_scores() -> None:
    experts = (make_expert(0, "fallback", ["hola", "python"]), make_expert(1, "programador", ["codigo"]))
    scores = keyword_scores("hola python", keyword_index_from_experts(experts))
    assert scores == {"programador": 0.0}


def test_keyword_listed_twice_counts_once() -> None:
    experts = (make_expert(0, "fallback"), make_expert(1, "programador", ["código", "codigo", "CODIGO"]))
    assert keyword_scores("codigo", keyword_index_from_experts(experts))["programador"] == pytest.approx(0.5)


def test_keyword_is_found_after_long_filler(index: KeywordIndex) -> None:
    filler = "lorem ipsum dolor sit amet " * 50
    scores = keyword_scores(filler + "docker", index)
    assert top_label(scores) == "sysadmin"


# --- winner picking ------------------------------------------------------------------------


def test_pick_winner_requires_threshold_and_a_unique_top() -> None:
    assert pick_winner({"a": 0.5, "b": 0.2}, 0.2) == "a"
    assert pick_winner({"a": 0.5, "b": 0.5}, 0.2) is None
    assert pick_winner({"a": 0.19, "b": 0.0}, 0.2) is None
    assert pick_winner({"a": 0.0, "b": 0.0}, 0.0) is None
    assert pick_winner({}, 0.2) is None


# --- router --------------------------------------------------------------------------------


def test_last_message_decides_by_keyword() -> None:
    decision = make_router().route(["Escribe un script en Python para listar archivos"])
    assert decision.method == "keyword"
    assert (decision.expert_id, decision.label) == (1, "programador")
    assert decision.score == decision.scores["programador"]
    assert decision.context_used is None
    assert set(decision.scores) == LABELS


def test_last_message_wins_over_older_context() -> None:
    decision = make_router().route(["docker nginx systemd firewall", "python"])
    assert (decision.label, decision.method) == ("programador", "keyword")


def test_cascade_uses_earlier_messages_for_an_ambiguous_follow_up() -> None:
    texts = ["Write a Python function that sorts a list", "Make it shorter"]
    decision = make_router().route(texts)
    assert (decision.expert_id, decision.label, decision.method) == (1, "programador", "cascade")
    assert decision.context_used == "Write a Python function that sorts a list\nMake it shorter"
    assert decision.score == decision.scores["programador"] >= ACCEPT_AT_DEFAULT
    assert set(decision.scores) == LABELS


def test_cascade_breaks_a_tie_in_the_last_message() -> None:
    decision = make_router().route(["tengo un bug en mi codigo", "python y docker"])
    assert (decision.label, decision.method) == ("programador", "cascade")


def test_tie_without_more_context_goes_to_fallback() -> None:
    decision = make_router().route(["python y docker"])
    assert (decision.expert_id, decision.label, decision.method) == (0, "fallback", "fallback")
    assert decision.context_used is None  # nothing earlier to cascade over
    assert decision.scores["programador"] == decision.scores["sysadmin"] == pytest.approx(0.5)
    assert decision.score == pytest.approx(0.5)


def test_unrelated_text_goes_to_fallback() -> None:
    decision = make_router().route(["Hola", "¿Qué tiempo hará mañana?"])
    assert (decision.expert_id, decision.method) == (0, "fallback")
    assert decision.score == 0.0
    assert set(decision.scores) == LABELS
    assert decision.context_used == "Hola\n¿Qué tiempo hará mañana?"


def test_fallback_score_is_the_best_score_seen() -> None:
    router = make_router(confidence_threshold=1.0)  # accept only at >= 0.5
    decision = router.route(["programando"])
    assert decision.method == "fallback"
    assert 0.0 < decision.score < 0.5
    assert decision.score == decision.scores["programador"]


def test_threshold_scales_the_keyword_bar() -> None:
    strict = make_router(confidence_threshold=1.0)
    assert strict.route(["programando"]).method == "fallback"  # one fuzzy match, 0.4 < 0.5
    assert strict.route(["python"]).method == "keyword"  # one exact match, 0.5 >= 0.5


def test_empty_input_goes_to_fallback() -> None:
    router = make_router()
    for texts in ([], [""], ["   \n "], ["", ""]):
        decision = router.route(texts)
        assert (decision.expert_id, decision.method, decision.score) == (0, "fallback", 0.0), texts


def test_blank_last_message_falls_back_to_the_cascade() -> None:
    decision = make_router().route(["configura nginx en el servidor", ""])
    assert (decision.label, decision.method) == ("sysadmin", "cascade")
    assert decision.context_used == "configura nginx en el servidor"


def test_cascade_looks_only_at_the_last_context_messages() -> None:
    texts = ["python codigo funcion", "and then?", "ok", "more please"]
    assert make_router(context_messages=3).route(texts).method == "fallback"
    assert make_router(context_messages=1).route(["python", "and then?"]).method == "fallback"
    decision = make_router(context_messages=4).route(texts)
    assert (decision.label, decision.method) == ("programador", "cascade")


def test_context_cap_keeps_the_newest_text() -> None:
    texts = ["python codigo funcion script bug", "docker", "and now?"]
    assert make_router().route(texts).label == "programador"  # uncapped: 5 matches beat 1
    decision = make_router(context_max_chars=16).route(texts)
    assert (decision.label, decision.method) == ("sysadmin", "cascade")
    assert decision.context_used is not None
    assert decision.context_used.endswith("and now?")
    assert "python" not in decision.context_used
    assert len(decision.context_used) <= 16


def test_join_recent_user_texts_drops_a_word_cut_in_half() -> None:
    texts = ["first message", "pythonic code", "tail"]
    assert join_recent_user_texts(texts, 2, 100) == "pythonic code\ntail"
    # The cut at 12 characters falls inside "pythonic"; its remains must not be scored.
    assert join_recent_user_texts(texts, 3, 12) == "code\ntail"
    # A cut exactly at a word boundary keeps the whole word.
    assert join_recent_user_texts(texts, 3, 9) == "code\ntail"
    assert join_recent_user_texts(["", "  ", "x"], 3, 100) == "x"


def test_keyword_fallback_off_sends_everything_to_fallback() -> None:
    router = make_router(keyword_fallback=False)
    for texts in (["Write Python code"], ["python", "docker"], []):
        decision = router.route(texts)
        assert (decision.expert_id, decision.label, decision.method) == (0, "fallback", "fallback")
        assert decision.scores == {}


def test_fallback_expert_never_wins_by_keywords() -> None:
    experts = (make_expert(0, "fallback", ["hola", "general"]), make_expert(1, "programador", ["python"]))
    decision = KeywordRouter(experts, RouterConfig()).route(["hola, una pregunta general"])
    assert decision.method == "fallback"
    assert decision.scores == {"programador": 0.0}


def test_missing_fallback_expert_is_refused() -> None:
    with pytest.raises(ValueError, match="fallback"):
        KeywordRouter((make_expert(1, "programador", ["python"]),), RouterConfig())


def test_huge_last_message_still_routes_on_its_head() -> None:
    text = "Traduce al inglés:\n" + "la casa es grande y bonita " * 2000
    decision = make_router().route([text])
    assert (decision.label, decision.method) == ("traductor", "keyword")
