"""(c) How many streams LeMoE holds open at once, to the end, with no error.

All streams are started together against a stand-in upstream that paces its 20 pieces
(200 ms apart, so each stream lasts about 4 s); half use Ollama's /api/chat (NDJSON), half
OpenAI's /v1/chat/completions (SSE). A stream counts as held when it is answered 200 and
arrives whole (last piece and end marker). "Peak open" is the most streams that were between
their first and last byte at the same moment, as seen by the client.

    venv/bin/python -m bench.bench_streams [--streams 256] [--threads 32 --threads 256] [--upstream fast|werkzeug]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.bench_overhead import OLLAMA_QUERY, OPENAI_QUERY, chat_body, expected_pieces
from bench.footprint import tree_rss_mib
from bench.load import percentile
from bench.servers import UPSTREAMS, start_lemoe, start_upstream, write_lemoe_project

TOKENS = 20
PIECE_DELAY = 0.2
# A stream that has not ended after this long counts as an error.
STREAM_TIMEOUT = 60.0


@dataclass
class StreamRecord:
    first_byte: float = 0.0
    ended: float = 0.0
    error: str = ""


def read_stream(base_url: str, path: str, body: bytes, expect: tuple[bytes, ...], start: threading.Barrier,
                record: StreamRecord) -> None:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=STREAM_TIMEOUT)
    try:
        start.wait()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = bytearray()
        while True:
            piece = response.read1(65536)
            if not piece:
                break
            if not data:
                record.first_byte = time.perf_counter()
            data += piece
        record.ended = time.perf_counter()
        if response.status != 200:
            record.error = f"HTTP {response.status}"
        elif not all(p in data for p in expect):
            record.error = "incomplete stream"
    except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def peak_overlap(records: list[StreamRecord]) -> int:
    """The most streams between their first and last byte at one moment."""
    events = sorted([(r.first_byte, 1) for r in records if r.first_byte and r.ended]
                    + [(r.ended, -1) for r in records if r.first_byte and r.ended])
    current = peak = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def hold_streams(base_url: str, count: int) -> tuple[list[StreamRecord], float, float]:
    """Start `count` streams at once; returns their records, the start time and the seconds taken."""
    start = threading.Barrier(count + 1)
    records = [StreamRecord() for _ in range(count)]
    threads = []
    for i, record in enumerate(records):
        path, query = ("/api/chat", OLLAMA_QUERY) if i % 2 == 0 else ("/v1/chat/completions", OPENAI_QUERY)
        # Each stream its own text, so each one is routed.
        body = chat_body("lemoe", f"{query} ({i})", True)
        args = (base_url, path, body, expected_pieces(path, True), start, record)
        threads.append(threading.Thread(target=read_stream, args=args, daemon=True))
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join(STREAM_TIMEOUT + 10)
    return records, began, time.perf_counter() - began


def run(count: int = 256, thread_settings: tuple[int, ...] = (32, 256), *, upstream_kind: str = "fast",
        keyword_router: bool = False) -> list[dict[str, Any]]:
    upstream = start_upstream(TOKENS, PIECE_DELAY, kind=upstream_kind)
    rows = []
    try:
        for threads in thread_settings:
            project = Path(tempfile.mkdtemp(prefix="lemoe-streams-"))
            config = write_lemoe_project(project, upstream.url, threads=threads, workers=1,
                                         keyword_router=keyword_router)
            server = start_lemoe(config, project)
            try:
                records, began, elapsed = hold_streams(server.url, count)
                rss = tree_rss_mib(server.process.pid)
            finally:
                server.stop()
            errors = [r.error for r in records if r.error]
            waits = [r.first_byte - began for r in records if r.first_byte]
            rows.append({
                "threads": threads, "streams": count, "held": count - len(errors), "errors": len(errors),
                "first_error": errors[0] if errors else "", "peak_open": peak_overlap(records),
                "seconds": round(elapsed, 2), "rss_mib_after": round(rss, 1),
                "first_byte_p99_s": round(percentile(waits, 99), 2),
            })
    finally:
        upstream.stop()
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"(c) concurrent streams ({TOKENS} pieces, {PIECE_DELAY * 1000:.0f} ms apart)")
    for row in rows:
        print(f"server.threads={row['threads']:<4} streams={row['streams']} held={row['held']} errors={row['errors']} "
              f"peak open at once={row['peak_open']} first byte p99={row['first_byte_p99_s']} s "
              f"all done in {row['seconds']} s, RSS {row['rss_mib_after']} MiB {row['first_error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--threads", type=int, action="append", help="server.threads to try (repeatable)")
    parser.add_argument("--upstream", choices=sorted(UPSTREAMS), default="fast",
                        help="stand-in upstream: fast (bench/fast_upstream.py) or werkzeug (bench/upstream.py)")
    parser.add_argument("--keyword-router", action="store_true", help="LeMoE routes on keywords only")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    rows = run(args.streams, tuple(args.threads or (32, 256)), upstream_kind=args.upstream,
               keyword_router=args.keyword_router)
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
