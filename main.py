"""LeMoE on the command line.

    python main.py                 chat on stdin: each line is routed and answered; prints the expert
    python main.py route "text"    print the routing decision with every expert's score
    python main.py --config FILE   use another config.json (any subcommand)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from modules.chat_types import ChatRequest, Message, TextDelta
from modules.config_manager import AppConfig, load_config
from modules.errors import ConfigError, LeMoEError


def _route(config: AppConfig, texts: Sequence[str], as_json: bool) -> int:
    from modules.router_factory import build_router

    decision = build_router(config).route(list(texts))
    if as_json:
        print(json.dumps({
            "expert": decision.label, "expert_id": decision.expert_id, "method": decision.method,
            "score": decision.score, "scores": decision.scores, "context_used": decision.context_used,
        }, ensure_ascii=False, indent=2))
        return 0
    print(f"expert: {decision.label} (id {decision.expert_id})")
    print(f"method: {decision.method}")
    print(f"score:  {decision.score:.4f}")
    if decision.context_used:
        print(f"context used: {decision.context_used!r}")
    print("scores:")
    for label, score in sorted(decision.scores.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<24} {score:.4f} {'#' * round(score * 40)}")
    return 0


def _chat_loop(config: AppConfig) -> int:
    """Read user lines from stdin, answer each with the routed expert, keep the conversation."""
    from api_server import build_services
    from modules.logger import setup_logging

    setup_logging(config.server.model_copy(update={"log_level": "WARNING"}), config.project_dir)
    svc = build_services(config)
    history: list[Message] = []
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            history.append(Message(role="user", content=text))
            request = ChatRequest(model=None, messages=list(history), stream=True)
            decision = svc.router.route(request.user_texts())
            expert = next(e for e in config.experts if e.id == decision.expert_id)
            run = svc.runner.start(expert, request)
            print(f"[{run.expert.label}] ", end="", flush=True)
            answer = []
            for event in run.events:
                if isinstance(event, TextDelta):
                    answer.append(event.text)
                    print(event.text, end="", flush=True)
            print(flush=True)
            history.append(Message(role="assistant", content="".join(answer)))
    except KeyboardInterrupt:
        print()
    except LeMoEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        svc.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="main.py", description="LeMoE command line")
    parser.add_argument("--config", help="config.json to use (default: $LEMOE_CONFIG or config/config.json)")
    sub = parser.add_subparsers(dest="command")
    route = sub.add_parser("route", help="show the routing decision for a text")
    route.add_argument("texts", nargs="+", help="user messages, oldest first (the last one is the new one)")
    route.add_argument("--json", action="store_true", help="print the decision as JSON")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "route":
        return _route(config, args.texts, args.json)
    return _chat_loop(config)


if __name__ == "__main__":
    sys.exit(main())
