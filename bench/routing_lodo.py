"""Routing quality on public labelled sets, leave one dataset out.

Every constant a router has (the reference's threshold; LeMoE's oos_score, temperature and
threshold) is chosen on the OTHER datasets and reported on the one left out, next to the
trivial baselines and to LeMoE as shipped. Expert sets are written from the label names only
(config/examples/, bench/data/arena_hard_label_map.json); rows are never copied into keywords.

    venv/bin/python -m bench.routing_lodo [--data ../shared/data] [--json OUT]

Datasets (workplace copies of public sets; see their README for provenance):
- CLINC150 val: 10 domains + out-of-scope, `clinc150_experts.json`.
- MT-Bench-X, English and Spanish: the assistants set (writing, math, coding; the other five
  categories belong to the fallback), and an 8-expert set, one expert per category.
- Arena-Hard v0.1: clusters mapped onto the assistants set by cluster name.
- Giskard prompt injections: all belong to the fallback.
Plus: calibrated on CLINC150 val, measured on CLINC150 train (rows calibrate never saw), and
follow-ups (MT-Bench-X turn 2 after turn 1; CLINC out-of-scope questions after a first turn).

Scores come from `modules.route_eval` (what `main.py eval` prints) on the real router; only the
encoder's vectors are memoised between the many configurations tried.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.servers import REPO
from modules.calibration import calibrate
from modules.config_manager import AppConfig, load_config
from modules.embedding_router import EmbeddingRouter, EmbeddingSettings, settings_from_router_config
from modules.encoding.encoders import build_encoder
from modules.generic_router import KeywordRouter
from modules.route_eval import accuracy_report, read_rows, route_rows

CONFIGS = {
    "clinc": "config/examples/clinc150_config.json",
    "assistants": "config/examples/assistants_config.json",
    "mtbench": "config/examples/mtbench_config.json",
}
# MT-Bench-X categories the assistants set has an expert for; the others go to the fallback.
MT_BENCH_ON_ASSISTANTS = {"writing": "writing", "math": "math", "coding": "coding"}
# Held-out dataset -> its parts (each part: expert set, rows). A dataset's parts are left out
# together, so MT-Bench-X never helps choose a constant it is then reported with.
Part = tuple[str, list[dict[str, Any]]]
LEMOE_GRID = {
    "oos_score": (1.0, 1.5, 2.0, 2.5, 3.0),
    "standardized_temperature": (0.25, 0.5, 1.0),
    "confidence_threshold": (0.2, 0.3, 0.4, 0.5),
    "expert_centering": (0.0, 0.5, 1.0),
    "description_scoring": ("whole", "sentences"),
}
REFERENCE_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.0, 0.951, 0.025), 3))


class MemoEncoder:
    """The real encoder, each text encoded once for the whole run."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.name = encoder.name
        self._vectors: dict[str, np.ndarray] = {}

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        for i in range(0, len(missing), 64):
            chunk = missing[i : i + 64]
            self._vectors.update(zip(chunk, self._encoder.encode_queries(chunk)))
        return np.stack([self._vectors[t] for t in texts]).astype(np.float32)

    encode_passages = encode_queries


def _rows(data: Path, name: str) -> list[dict[str, Any]]:
    return read_rows(data / name)


def _arena_label(label: str, mapping: dict[str, list[str]]) -> str | None:
    return next((expert for expert, names in mapping.items() if expert != "about" and label in names), None)


def datasets(data: Path) -> dict[str, list[Part]]:
    clinc = [{"text": r["text"], "label": r["label"]} for r in _rows(data, "clinc150_domains_val.jsonl")]
    mt = _rows(data, "mtbench_x_en_es.jsonl")
    mapping = json.loads((REPO / "bench" / "data" / "arena_hard_label_map.json").read_text(encoding="utf-8"))
    arena = [
        {"text": r["text"], "label": label}
        for r in _rows(data, "arena_hard_v01_clusters.jsonl")
        if (label := _arena_label(r["label"], mapping)) is not None
    ]
    injections = [{"text": r["text"], "label": "adversarial"} for r in _rows(data, "prompt_injections_giskard.jsonl")]

    def mt_rows(lang: str, on_assistants: bool) -> list[dict[str, Any]]:
        return [
            {"text": r["text"], "label": MT_BENCH_ON_ASSISTANTS.get(r["label"], "other") if on_assistants else r["label"]}
            for r in mt
            if r["lang"] == lang
        ]

    return {
        "CLINC150": [("clinc", clinc)],
        "MT-Bench-X": [
            ("assistants", mt_rows("en", True)),
            ("assistants", mt_rows("es", True)),
            ("mtbench", mt_rows("en", False)),
            ("mtbench", mt_rows("es", False)),
        ],
        "Arena-Hard": [("assistants", arena)],
        "Injections": [("assistants", injections)],
    }


RouterMaker = Callable[[AppConfig], Any]


def score(make: RouterMaker, parts: Sequence[Part], configs: dict[str, AppConfig]) -> dict[str, float]:
    """Mean accuracy and fallback recall over a dataset's parts."""
    accuracies, recalls = [], []
    for config_name, rows in parts:
        config = configs[config_name]
        experts = [e.label for e in config.experts if e.id != 0]
        fallback = config.fallback_expert.label
        routed = route_rows(rows, make(config).route, experts, fallback)
        report = accuracy_report([r.expected for r in routed], [r.decision.label for r in routed],
                                 [*experts, fallback], fallback)
        accuracies.append(report["accuracy"])
        if report["per_expert"][fallback]["support"]:
            recalls.append(report["fallback"]["recall"])
    return {"accuracy": float(np.mean(accuracies)), "fallback_recall": float(np.mean(recalls)) if recalls else float("nan"),
            "parts": [round(float(a), 4) for a in accuracies]}


def lemoe(encoder: MemoEncoder, **constants: Any) -> RouterMaker:
    """LeMoE's embedding router with the example config's settings, `constants` overriding them
    (`confidence_threshold` or any EmbeddingSettings field)."""
    def make(config: AppConfig) -> EmbeddingRouter:
        settings = {**vars(settings_from_router_config(config.router)), **constants}
        threshold = settings.pop("confidence_threshold", config.router.confidence_threshold)
        router_config = config.router.model_copy(update={"confidence_threshold": threshold})
        return EmbeddingRouter(config.experts, router_config, encoder, settings=EmbeddingSettings(**settings))
    return make


def reference(encoder: MemoEncoder, threshold: float) -> RouterMaker:
    def make(config: AppConfig) -> EmbeddingRouter:
        router_config = config.router.model_copy(update={"confidence_threshold": threshold})
        return EmbeddingRouter(config.experts, router_config, encoder, settings=EmbeddingSettings(scoring="reference"))
    return make


def score_all(
    candidates: dict[Any, RouterMaker], sets: dict[str, list[Part]], configs: dict[str, AppConfig]
) -> dict[Any, dict[str, dict[str, Any]]]:
    """Every candidate's score on every dataset."""
    return {key: {name: score(make, parts, configs) for name, parts in sets.items()} for key, make in candidates.items()}


def choose_elsewhere(scores: dict[Any, dict[str, dict[str, Any]]]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """For each dataset: the candidate with the best mean accuracy over the OTHER datasets, and
    its score on the dataset itself."""
    chosen = {}
    for held_out in next(iter(scores.values())):
        best = max(scores, key=lambda key: np.mean([s["accuracy"] for n, s in scores[key].items() if n != held_out]))
        chosen[held_out] = (best, scores[best][held_out])
    return chosen


def choose_on_all(scores: dict[Any, dict[str, dict[str, Any]]]) -> Any:
    """The same rule with every dataset: how the shipped defaults are chosen."""
    return max(scores, key=lambda key: np.mean([s["accuracy"] for s in scores[key].values()]))


# (switch_confidence, switch_confidence_follow_up). Never above 1: a turn that points back must
# still be able to switch when it is confidently about something else ("translate this into
# French" in a coding chat); MT-Bench-X's second turns almost never do, so they would reward it.
SWITCH_GRID = tuple(
    (plain, follow_up)
    for plain in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    for follow_up in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    if follow_up >= plain
)
# MT-Bench-X lists ten questions per category: seven apart is another category.
SWITCH_OFFSET = 7


def follow_up_rates(router: EmbeddingRouter, firsts: Sequence[dict[str, Any]], unrelated: Sequence[str]) -> dict[str, float]:
    """Share of real second turns that keep the first turn's expert (per language), and of
    unrelated questions asked after a first turn that reach the fallback."""
    out = {}
    for lang in ("en", "es"):
        turns = [r for r in firsts if r["lang"] == lang]
        out[lang] = float(np.mean([router.route([r["text"], r["turn2"]]).label == router.route([r["text"]]).label for r in turns]))
    english = [r for r in firsts if r["lang"] == "en"]
    out["unrelated"] = float(np.mean(
        [router.route([english[i % len(english)]["text"], text]).label == "fallback" for i, text in enumerate(unrelated)]))
    # A new, self-contained question for another specialist after a first turn: it should
    # reach the expert it gets on its own. Pairs are the questions SWITCH_OFFSET apart in one
    # language, counted where that question alone reaches a specialist the first turn did not.
    switched = []
    for lang in ("en", "es"):
        turns = [r for r in firsts if r["lang"] == lang]
        for i, first in enumerate(turns):
            second = turns[(i + SWITCH_OFFSET) % len(turns)]["text"]
            alone = router.route([second]).label
            if alone != "fallback" and alone != router.route([first["text"]]).label:
                switched.append(router.route([first["text"], second]).label == alone)
    out["switch"] = float(np.mean(switched)) if switched else float("nan")
    return out


# The targets for conversations: follow-ups keep their expert at least this often (in
# each language) while unrelated questions still reach the fallback at least this often.
FOLLOW_UP_TARGET = 0.9
UNRELATED_TARGET = 0.7


def follow_up_merit(rates: dict[str, float]) -> tuple[bool, float, float]:
    """What the switch confidences are chosen by: among the settings that meet the targets, the
    one that lets the most new questions switch; when none does, the closest to the targets
    (the most new questions switching among equally close ones)."""
    keep = min(rates["en"], rates["es"])
    meets = keep >= FOLLOW_UP_TARGET and rates["unrelated"] >= UNRELATED_TARGET
    closeness = min(keep / FOLLOW_UP_TARGET, rates["unrelated"] / UNRELATED_TARGET, 1.0)
    return (meets, round(closeness, 6), rates["switch"])


def follow_ups(encoder: MemoEncoder, data: Path, configs: dict[str, AppConfig]) -> dict[str, float]:
    """MT-Bench-X second turns after their first (assistants set), and CLINC out-of-scope
    questions after an MT-Bench-X first turn, with the switch confidence chosen out of fold.

    The questions are split in two halves (question number odd / even, the out-of-scope rows
    alternately); the two switch confidences are chosen on one half by follow_up_merit and
    measured on the other; the figures add up both halves. The shipped values' own figures on
    all rows come alongside, and every setting's rates on all rows (for the README's table)."""
    mt = _rows(data, "mtbench_x_en_es.jsonl")
    oos = [r["text"] for r in _rows(data, "clinc150_domains_val.jsonl") if r["label"] == "oos"]
    half = {k: ([r for r in mt if int(r["question_id"].split("_")[0]) % 2 == k], oos[k::2]) for k in (0, 1)}
    routers = {t: lemoe(encoder, switch_confidence=t[0], switch_confidence_follow_up=t[1])(configs["assistants"])
               for t in SWITCH_GRID}
    rates = {(t, k): follow_up_rates(routers[t], *half[k]) for t in SWITCH_GRID for k in (0, 1)}
    out_of_fold: dict[str, list[float]] = {"en": [], "es": [], "unrelated": [], "switch": []}
    chosen = []
    for k in (0, 1):
        best = max(SWITCH_GRID, key=lambda t, other=1 - k: follow_up_merit(rates[(t, other)]))
        chosen.append(best)
        for key in out_of_fold:
            out_of_fold[key].append(rates[(best, k)][key])
    on_all = max(SWITCH_GRID, key=lambda t: follow_up_merit(
        {key: float(np.mean([rates[(t, k)][key] for k in (0, 1)])) for key in ("en", "es", "unrelated", "switch")}))
    shipped = follow_up_rates(lemoe(encoder)(configs["assistants"]), mt, oos)
    return {
        "follow-ups keep their expert, out of fold (en)": float(np.mean(out_of_fold["en"])),
        "follow-ups keep their expert, out of fold (es)": float(np.mean(out_of_fold["es"])),
        "unrelated question after a first turn -> fallback, out of fold": float(np.mean(out_of_fold["unrelated"])),
        "new question for another specialist switches, out of fold": float(np.mean(out_of_fold["switch"])),
        "switch confidence chosen per half": chosen,  # type: ignore[dict-item]
        "switch confidence the rule picks on all rows": on_all,
        "shipped: follow-ups keep (en)": shipped["en"],
        "shipped: follow-ups keep (es)": shipped["es"],
        "shipped: unrelated -> fallback": shipped["unrelated"],
        "shipped: new question switches": shipped["switch"],
        "every setting on all rows": {  # type: ignore[dict-item]
            str(t): {key: round(float(np.mean([rates[(t, k)][key] for k in (0, 1)])), 3) for key in rates[(t, 0)]}
            for t in SWITCH_GRID},
    }


def calibrated_clinc(encoder: MemoEncoder, data: Path, configs: dict[str, AppConfig]) -> dict[str, float]:
    """Calibrated on CLINC150 val, measured on CLINC150 train (15,100 rows it never saw)."""
    config = configs["clinc"]
    router = lemoe(encoder)(config)
    calibration = calibrate(router, _rows(data, "clinc150_domains_val.jsonl"))
    router.readout = calibration.readout
    rows = _rows(data, "clinc150_domains_train.jsonl")
    experts = [e.label for e in config.experts if e.id != 0]
    fallback = config.fallback_expert.label
    routed = route_rows(rows, router.route, experts, fallback)
    report = accuracy_report([r.expected for r in routed], [r.decision.label for r in routed], [*experts, fallback], fallback)
    return {"accuracy": report["accuracy"], "fallback_recall": report["fallback"]["recall"],
            "cv_accuracy": calibration.oof_accuracy, "uncalibrated_cv_accuracy": calibration.base_accuracy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--skip-calibration", action="store_true", help="leave out the CLINC150 calibration run")
    args = parser.parse_args(argv)
    encoder = MemoEncoder(build_encoder("use-multilingual"))
    configs = {name: load_config(REPO / path) for name, path in CONFIGS.items()}
    sets = datasets(args.data)
    print("scoring baselines ...", file=sys.stderr)
    table: dict[str, dict[str, Any]] = {name: {} for name in sets}
    for name, parts in sets.items():
        table[name]["always fallback"] = score(lambda c: _Always(c), parts, configs)
        table[name]["keyword only"] = score(lambda c: KeywordRouter(c.experts, c.router), parts, configs)
        table[name]["reference, argmax (threshold 0)"] = score(reference(encoder, 0.0), parts, configs)
        table[name]["LeMoE as shipped"] = score(lemoe(encoder), parts, configs)
    print("choosing the reference threshold elsewhere ...", file=sys.stderr)
    for name, (threshold, result) in choose_elsewhere(
        score_all({t: reference(encoder, t) for t in REFERENCE_THRESHOLDS}, sets, configs)
    ).items():
        table[name]["reference, threshold chosen elsewhere"] = {**result, "chosen": threshold}
    print("choosing LeMoE's constants elsewhere ...", file=sys.stderr)
    grid = {combo: lemoe(encoder, **dict(zip(LEMOE_GRID, combo))) for combo in itertools.product(*LEMOE_GRID.values())}
    grid_scores = score_all(grid, sets, configs)
    for name, (combo, result) in choose_elsewhere(grid_scores).items():
        table[name]["LeMoE, constants chosen elsewhere"] = {**result, "chosen": dict(zip(LEMOE_GRID, combo))}
    on_all = choose_on_all(grid_scores)
    extra: dict[str, Any] = {
        "the rule on every dataset (shipped defaults)": {
            **dict(zip(LEMOE_GRID, on_all)), **{name: s["accuracy"] for name, s in grid_scores[on_all].items()}},
        "follow_ups": follow_ups(encoder, args.data, configs),
    }
    if not args.skip_calibration:
        print("calibrating on CLINC150 val, measuring on train ...", file=sys.stderr)
        extra["clinc_calibrated_on_val_measured_on_train"] = calibrated_clinc(encoder, args.data, configs)
    print_table(table, extra)
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, **extra}, indent=2, default=str))
    return 0


class _Always:
    def __init__(self, config: AppConfig) -> None:
        self._fallback = config.fallback_expert

    def route(self, user_texts: Sequence[str]) -> Any:
        from modules.chat_types import RouteDecision

        return RouteDecision(self._fallback.id, self._fallback.label, 1.0, "fallback")


def print_table(table: dict[str, dict[str, Any]], extra: dict[str, Any]) -> None:
    routers = list(next(iter(table.values())))
    print("accuracy (fallback recall) per held-out dataset; 'chosen elsewhere' = constants picked on the other datasets")
    print(f"{'router':<40}" + "".join(f"{name:>20}" for name in table))
    for router in routers:
        cells = []
        for name in table:
            s = table[name][router]
            recall = "" if np.isnan(s["fallback_recall"]) else f" ({s['fallback_recall']:.2f})"
            cells.append(f"{s['accuracy']:.1%}{recall}")
        print(f"{router:<40}" + "".join(f"{c:>20}" for c in cells))
    for name in table:
        for router in ("reference, threshold chosen elsewhere", "LeMoE, constants chosen elsewhere"):
            print(f"  {name}: {router}: {table[name][router]['chosen']}")
    for key, value in extra.items():
        print(f"{key}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()))
    for name in table:
        parts = table[name]["LeMoE, constants chosen elsewhere"]["parts"]
        if len(parts) > 1:
            print(f"  {name} parts (LeMoE, chosen elsewhere): {parts}")


if __name__ == "__main__":
    sys.exit(main())
