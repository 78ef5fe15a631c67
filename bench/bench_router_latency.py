"""Routing decision latency of each router, next to the reference algorithm in the same run.

Routers, each built in-process from a configuration made here in code (no config.json is read):
- keyword:    generic_router.KeywordRouter (keywords + fuzzy matching only);
- embedding:  the hybrid embedding router with the default packaged multilingual USE encoder;
- reference:  the same router with `scoring: "reference"` (the reference's softmax and chain);
- classifier: decision_router.DecisionRouter on a fine-tuned model folder (`--classifier DIR`),
              only with the expert sets whose labels the model knows; on its int8 ONNX export
              (what is served) and, for comparison, on transformers + torch.
Queries: a short one (about 40 characters), a short follow-up routed with its earlier turn as
context, and a long one (about 1,200 characters, the request at its end), per expert set.
Each cell is timed over up to `--calls` decisions after 20 warm-up calls; nothing goes over HTTP.

    venv/bin/python -m bench.bench_router_latency [--classifier DIR] [--calls 500] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modules.chat_types import RouteDecision
from modules.config_manager import (
    AppConfig,
    ExpertsFile,
    LocalModelsConfig,
    RouterConfig,
    ServerConfig,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "config" / "examples"
# An unrelated paragraph with the request at its end, as when a user pastes text then asks.
FILLER = (
    "Yesterday we talked about the quarterly plan, the budget for the new office, the schedule of "
    "the team offsite and who should book the rooms for the visitors. "
)


def long_text(tail: str, size: int = 1200) -> str:
    """About `size` characters: filler, then `tail`."""
    body = (FILLER * (size // len(FILLER) + 1))[: size - len(tail) - 1]
    return f"{body} {tail}"


@dataclass(frozen=True)
class ExpertSet:
    """An experts file and conversations (user turns, oldest first) typical of its domain."""

    name: str
    experts_file: Path
    conversations: dict[str, list[str]]


EXPERT_SETS = (
    ExpertSet(
        "assistants",
        EXAMPLES / "assistants_experts.json",
        {
            "short (40 ch)": ["Write a python function to sort a list."],
            "short + 1 earlier turn": ["Write a python function to sort a list.", "Make it shorter, please."],
            "long (1,200 ch)": [long_text("Now translate all of that into French.")],
        },
    ),
    ExpertSet(
        "clinc150",
        EXAMPLES / "clinc150_experts.json",
        {
            "short (40 ch)": ["How much money is in my checking account?"],
            "short + 1 earlier turn": ["How much money is in my checking account?", "And in the other one?"],
            "long (1,200 ch)": [long_text("Can you book me a flight to Boston for Friday?")],
        },
    ),
)


def config_for(expert_set: ExpertSet, **router_fields: Any) -> AppConfig:
    """An AppConfig built in code: the expert set's experts, the router fields given."""
    experts = ExpertsFile.model_validate(json.loads(expert_set.experts_file.read_text(encoding="utf-8")))
    router = RouterConfig.model_validate(
        {"categories_file": str(expert_set.experts_file.relative_to(REPO)), **router_fields}
    )
    return AppConfig(
        server=ServerConfig.model_validate({}),
        router=router,
        local_models=LocalModelsConfig.model_validate({}),
        experts=tuple(experts.experts),
        project_dir=REPO,
        config_path=REPO / "config" / "config.json",
        experts_path=expert_set.experts_file,
    )


RouteFn = Callable[[Sequence[str]], RouteDecision]


def build_routers(
    expert_set: ExpertSet, classifier_dir: Path | None, classifier_threshold: float
) -> dict[str, RouteFn | str]:
    """Each router's route function, or why it was not built."""
    from modules.embedding_router import build_embedding_router
    from modules.generic_router import KeywordRouter

    routers: dict[str, RouteFn | str] = {}
    keyword_config = config_for(expert_set)
    routers["keyword"] = KeywordRouter(keyword_config.experts, keyword_config.router).route
    routers["embedding"] = build_embedding_router(config_for(expert_set, model_path="use-multilingual")).route
    routers["reference"] = build_embedding_router(
        config_for(expert_set, model_path="use-multilingual", scoring="reference")
    ).route
    if classifier_dir is not None:
        from modules.decision_router import DecisionRouter

        config = config_for(
            expert_set,
            mode="model",
            router_type="classification",
            model_path=str(classifier_dir),
            confidence_threshold=classifier_threshold,
        )
        try:
            served = DecisionRouter(config.experts, config.router, classifier_dir)
        except ValueError as exc:
            # A model trained for other experts: nothing to measure on this set.
            routers["classifier"] = f"not built: {exc}"
            return routers
        routers[f"classifier ({served.runtime})"] = served.route
        if served.runtime == "onnx":
            # The same weights on transformers + torch, to show what the ONNX export saves.
            routers["classifier (torch)"] = DecisionRouter(
                config.experts, config.router, classifier_dir, runtime="torch"
            ).route
    return routers


def time_decisions(route: RouteFn, turns: list[str], calls: int, max_seconds: float) -> tuple[list[float], RouteDecision]:
    """Milliseconds per decision, after 20 warm-up calls, and the decision made."""
    decision = route(turns)
    for _ in range(19):
        route(turns)
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(samples) < calls and time.perf_counter() < deadline:
        started = time.perf_counter()
        route(turns)
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples, decision


def run(
    classifier_dir: Path | None, classifier_threshold: float, calls: int, max_seconds: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for expert_set in EXPERT_SETS:
        for router_name, route in build_routers(expert_set, classifier_dir, classifier_threshold).items():
            if isinstance(route, str):
                rows.append({"experts": expert_set.name, "router": router_name, "note": route})
                continue
            for query, turns in expert_set.conversations.items():
                samples, decision = time_decisions(route, turns, calls, max_seconds)
                rows.append({
                    "experts": expert_set.name,
                    "router": router_name,
                    "query": query,
                    "chars": len(turns[-1]),
                    "calls": len(samples),
                    "p50_ms": float(np.percentile(samples, 50)),
                    "p99_ms": float(np.percentile(samples, 99)),
                    "routed_to": decision.label,
                    "method": decision.method,
                })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    header = f"{'experts':<11} {'router':<18} {'query':<23} {'chars':>5} {'calls':>5} {'p50 ms':>8} {'p99 ms':>8}  routed to (method)"
    lines = [header, "-" * len(header)]
    for row in rows:
        if "note" in row:
            lines.append(f"{row['experts']:<11} {row['router']:<18} {row['note'][:100]}")
            continue
        lines.append(
            f"{row['experts']:<11} {row['router']:<18} {row['query']:<23} {row['chars']:>5} {row['calls']:>5} "
            f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}  {row['routed_to']} ({row['method']})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--classifier", type=Path, help="a fine-tuned classifier model folder (main.py train)")
    parser.add_argument(
        "--classifier-threshold",
        type=float,
        default=0.9,
        help="the classifier's confidence_threshold (default 0.9, tuned for CLINC150 on held-out training rows)",
    )
    parser.add_argument("--calls", type=int, default=500, help="timed decisions per cell (default 500)")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="time cap per cell (default 8)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.classifier, args.classifier_threshold, args.calls, args.max_seconds)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
