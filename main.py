"""LeMoE on the command line.

    python main.py                      chat on stdin: each line is routed and answered; prints the expert
    python main.py route "text"         print the routing decision with every expert's score
    python main.py eval DATA.jsonl      measure the router on labelled rows (--json, --plot)
    python main.py calibrate DATA.jsonl --out NEW_CONFIG.json   tune the confidence on labelled rows
    python main.py train DATA.jsonl --out models/NAME [--fast]  train a classifier router
    python main.py --config FILE        use another config.json (any subcommand; before or after it)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _progress(done: int, total: int) -> None:
    """A one-line progress bar on stderr, redrawn about 50 times a run."""
    if total >= 200 and (done == total or done % max(1, total // 50) == 0):
        filled = round(30 * done / total)
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end="\n" if done == total else "",
              file=sys.stderr, flush=True)


def _eval(config: AppConfig, data: str, json_out: str | None, plot_out: str | None, limit: int | None) -> int:
    from modules.generic_router import KeywordRouter
    from modules.route_eval import eval_report, read_rows, route_rows
    from modules.router_factory import build_router

    rows = read_rows(Path(data))[:limit]
    experts = [e.label for e in config.experts if e.id != 0]
    fallback = config.fallback_expert.label
    labels = [*experts, fallback]
    routed = route_rows(rows, build_router(config).route, experts, fallback, _progress)
    keyword_only = route_rows(rows, KeywordRouter(config.experts, config.router).route, experts, fallback)
    report = eval_report(routed, labels, fallback, keyword_only)
    print(format_report(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    if plot_out:
        _plot_confusion(report, Path(plot_out))
    return 0


def format_report(report: dict) -> str:
    """The eval report as the text table `main.py eval` prints."""
    lines = [
        f"rows {report['n']}   accuracy {report['accuracy']:.1%}   macro-F1 {report['macro_f1']:.3f}   "
        f"fallback P {report['fallback']['precision']:.2f} R {report['fallback']['recall']:.2f}",
        f"decision latency p50 {report['latency_ms']['p50']:.2f} ms   p99 {report['latency_ms']['p99']:.2f} ms",
        "baselines: " + "   ".join(f"{k} {v:.1%}" if "f1" not in k else f"{k} {v:.3f}"
                                   for k, v in report["baselines"].items()),
        "methods: " + ", ".join(f"{k} {v}" for k, v in report["methods"].items()),
        "",
        f"{'expert':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}",
    ]
    for label, m in report["per_expert"].items():
        lines.append(f"{label:<20} {m['precision']:>9.2f} {m['recall']:>7.2f} {m['f1']:>6.2f} {m['support']:>8}")
    lines += ["", "confusion (rows: expected, columns: routed to)"]
    labels = report["labels"]
    width = max(6, *(len(label[:10]) for label in labels))
    lines.append(" " * 20 + "".join(f"{label[:10]:>{width + 1}}" for label in labels))
    for label, row in zip(labels, report["confusion"]):
        lines.append(f"{label:<20}" + "".join(f"{n:>{width + 1}}" for n in row))
    if report["worst_misroutes"]:
        lines += ["", "worst misroutes (most confident first):"]
        for m in report["worst_misroutes"]:
            lines.append(f"  {m['expected']} -> {m['got']} ({m['method']} {m['score']:.2f}): {m['text'][:90]!r}")
    return "\n".join(lines)


def _plot_confusion(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = report["labels"], report["confusion"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.5 * len(labels)))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("expected")
    ax.set_title(f"accuracy {report['accuracy']:.1%}, fallback recall {report['fallback']['recall']:.0%}")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if n > peak / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _calibrate(config: AppConfig, data: str, out: str, recall: float) -> int:
    from modules.calibration import calibrate, calibrated_config, calibration_json, calibration_report
    from modules.embedding_router import EmbeddingRouter
    from modules.route_eval import read_rows
    from modules.router_factory import build_router

    router = build_router(config)
    if not isinstance(router, EmbeddingRouter):
        print("calibrate needs the embedding router (router.model_path set, mode generic)", file=sys.stderr)
        return 2
    out_path = Path(out).resolve()
    readout = out_path.with_suffix(".calibration.json")
    try:
        readout_rel = str(readout.relative_to(config.project_dir))
    except ValueError:
        print(f"--out must be inside the project folder {config.project_dir}", file=sys.stderr)
        return 2
    calibration = calibrate(router, read_rows(Path(data)), target_fallback_recall=recall)
    print(calibration_report(calibration))
    if not calibration.accepted:
        return 1
    _write_atomically(readout, json.dumps(calibration_json(calibration)))
    raw = json.loads(config.config_path.read_text(encoding="utf-8"))
    raw.setdefault("router", {})["categories_file"] = str(config.experts_path.relative_to(config.project_dir))
    _write_atomically(out_path, json.dumps(calibrated_config(raw, readout_rel), indent=4))
    print(f"wrote {out_path} and {readout}")
    return 0


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _train(args: argparse.Namespace) -> int:
    from modules.classifier_training import DEFAULT_TRAIN_LAYERS, train_classifier

    layers = 0 if args.fast else DEFAULT_TRAIN_LAYERS if args.train_layers is None else args.train_layers
    try:
        summary = train_classifier(
            Path(args.data), Path(args.out), base_model=args.base, train_layers=layers,
            epochs=args.epochs, held_out_share=args.held_out, fallback_labels=args.fallback_labels.split(","),
            accuracy_budget=args.accuracy_budget, limit=args.limit,
        )
    except ValueError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    held_out = summary.get("held_out")
    # The full threshold table is in the model folder's summary file; the terminal gets its gist.
    shown = {**summary, "held_out": {k: v for k, v in held_out.items() if k != "thresholds"}} if held_out else summary
    print(json.dumps(shown, indent=2, default=str))
    if held_out:
        print(format_threshold_table(held_out), file=sys.stderr)
    return 0


def format_threshold_table(held_out: dict) -> str:
    """The held-out threshold table `main.py train` prints, with the proposed threshold marked."""
    chosen = held_out["chosen"]["threshold"]
    lines = [f"held-out rows ({held_out['rows']}, not trained on), first routing step only:",
             f"  {'threshold':>9} {'accuracy':>9} {'fallback P':>11} {'fallback R':>11}"]
    for row in held_out["thresholds"]:
        recall = "-" if row["fallback_recall"] is None else f"{row['fallback_recall']:.2f}"
        mark = "  <- proposed" if row["threshold"] == chosen else ""
        lines.append(f"  {row['threshold']:>9.2f} {row['accuracy']:>9.1%} {row['fallback_precision']:>11.2f} "
                     f"{recall:>11}{mark}")
    lines.append(f"proposed confidence_threshold {chosen}: the highest within {held_out['accuracy_budget']:.0%} "
                 "of the best held-out accuracy")
    return "\n".join(lines)


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
    config_help = "config.json to use (default: $LEMOE_CONFIG or config/config.json)"
    parser = argparse.ArgumentParser(prog="main.py", description="LeMoE command line")
    parser.add_argument("--config", help=config_help)
    # `--config` is also taken after the subcommand. SUPPRESS keeps a subcommand that was not given
    # it from overwriting the value read before the subcommand with its own default.
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command")
    route = sub.add_parser("route", help="show the routing decision for a text", parents=[with_config])
    route.add_argument("texts", nargs="+", help="user messages, oldest first (the last one is the new one)")
    route.add_argument("--json", action="store_true", help="print the decision as JSON")
    ev = sub.add_parser("eval", help="measure the router on labelled JSONL rows {text, label, context?}",
                        parents=[with_config])
    ev.add_argument("data")
    ev.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    ev.add_argument("--plot", dest="plot_out", help="also draw the confusion matrix as a PNG here")
    ev.add_argument("--limit", type=int, help="only the first N rows")
    cal = sub.add_parser("calibrate", help="tune the embedding router's confidence on labelled rows",
                         parents=[with_config])
    cal.add_argument("data")
    cal.add_argument("--out", required=True, help="new config.json to write (inside the project)")
    cal.add_argument("--fallback-recall", type=float, default=0.6, help="fallback recall to aim for")
    tr = sub.add_parser("train", help="fine-tune a classifier router on labelled rows {text, label}",
                        parents=[with_config])
    tr.add_argument("data")
    tr.add_argument("--out", required=True, help="model folder to write, e.g. models/my-router")
    tr.add_argument("--base", help="base model (HF id or folder; default: packaged all-MiniLM-L6-v2)")
    tr.add_argument("--train-layers", type=int, help="top encoder layers to train, the rest stay frozen (default 2)")
    tr.add_argument("--fast", action="store_true",
                    help="frozen encoder and a linear read-out of its mean vector (--train-layers 0): about a minute")
    tr.add_argument("--epochs", type=int, default=3, help="at most this many epochs (stops early on held-out rows)")
    tr.add_argument("--held-out", type=float, default=0.2,
                    help="share of each label's rows kept out of training, to stop early and choose the threshold")
    tr.add_argument("--fallback-labels", default="oos",
                    help="comma-separated labels that mean 'no specialist' (for the held-out threshold table)")
    tr.add_argument("--accuracy-budget", type=float, default=0.02,
                    help="held-out accuracy the proposed threshold may give up to catch out-of-scope questions")
    tr.add_argument("--limit", type=int, help="only N rows, drawn at random")
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "route":
        return _route(config, args.texts, args.json)
    if args.command == "eval":
        return _eval(config, args.data, args.json_out, args.plot_out, args.limit)
    if args.command == "calibrate":
        return _calibrate(config, args.data, args.out, args.fallback_recall)
    return _chat_loop(config)


if __name__ == "__main__":
    sys.exit(main())
