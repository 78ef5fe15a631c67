"""Run docker/nginx.conf for real, in front of two LeMoE replicas, all on 127.0.0.1.

No Docker engine is needed: the replicas are `api_server.py` processes on free ports (experts on
the loopback stand-in upstream), and nginx is the machine's own (Debian: `apt-get install
nginx-light`). Only the `server lemoe:11435` line, the `listen` port and the pid file are
rewritten for loopback; every proxy directive runs as shipped. Checks that streams arrive piece
by piece, that both replicas serve, that the replicas share one rate limit through Redis (the
machine's `redis-server`, as compose.yaml does) keyed on the address nginx saw, not on a forged
X-Forwarded-For, and that nginx's own 413 and 503 answers are JSON in the client's protocol.
Prints what it saw and exits non-zero on the first failed check.

    venv/bin/python docker/check_nginx.py
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.servers import (
    Server,
    free_port,
    start_lemoe,
    start_upstream,
    stop_process,
    write_lemoe_project,
)

PIECES = 20
# Small enough to reach quickly; the stream checks spend STREAM_CHECKS of it first.
PER_MINUTE = 10
STREAM_CHECKS = 4


def loopback_nginx_conf(replicas: list[Server], port: int, workdir: Path) -> Path:
    text = (REPO / "docker" / "nginx.conf").read_text()
    servers = "\n".join(f"        server {r.url.removeprefix('http://')};" for r in replicas)
    for old, new in (("        server lemoe:11435;", servers), ("listen 11435;", f"listen 127.0.0.1:{port};"),
                     ("pid /tmp/nginx.pid;", f"pid {workdir}/nginx.pid;")):
        if old not in text:
            raise SystemExit(f"docker/nginx.conf no longer contains {old!r}; update this script")
        text = text.replace(old, new)
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


def post(port: int, path: str, body: bytes) -> tuple[int, dict[str, str], list[tuple[float, bytes]]]:
    """Status, headers, and each piece of the answer with the seconds it took to arrive."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    pieces = []
    while piece := response.read1(65536):
        pieces.append((time.perf_counter() - started, piece))
    conn.close()
    return response.status, dict(response.getheaders()), pieces


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def check(ok: bool, what: str) -> None:
    print(f"[{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        raise SystemExit(1)


def check_streams(port: int) -> None:
    body = json.dumps({"model": "lemoe", "stream": True,
                       "messages": [{"role": "user", "content": "write a python function"}]}).encode()
    status, _, pieces = post(port, "/api/chat", body)
    whole = b"".join(p for _, p in pieces)
    check(status == 200 and b'"done":true' in whole, f"stream through nginx answered {status}, complete")
    first, last = pieces[0][0], pieces[-1][0]
    # The stand-in sends a piece every 100 ms: unbuffered, the first one arrives long before the end.
    check(len(pieces) >= PIECES // 2 and first < last / 4,
          f"pieces arrive as sent: {len(pieces)} reads, first after {first:.2f} s, last after {last:.2f} s")


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    stop_process(process)
    raise SystemExit("redis-server did not start")


def replica_config(project: Path, upstream_url: str, redis_port: int) -> Path:
    """The bench project, with compose.yaml's rate-limit settings pointed at the local Redis."""
    path = write_lemoe_project(project, upstream_url, threads=32, workers=1)
    config = json.loads(path.read_text())
    config["rate_limit"] = {"per_minute": PER_MINUTE, "storage_uri": f"redis://127.0.0.1:{redis_port}",
                            "trusted_proxies": 1}
    path.write_text(json.dumps(config))
    return path


def served_counts(workdir: Path) -> list[int]:
    """Requests each replica has routed so far (its log has one `route` line per request)."""
    return [(workdir / f"replica{i}" / "logs" / "lemoe.log").read_text().count("route expert=") for i in range(2)]


def check_shared_rate_limit(port: int, workdir: Path) -> None:
    """Requests alternate between replicas; the limit still counts them all, whatever XFF says."""
    before = served_counts(workdir)
    body = json.dumps({"model": "lemoe", "stream": False,
                       "messages": [{"role": "user", "content": "write a python function"}]}).encode()
    statuses = []
    for i in range(PER_MINUTE - STREAM_CHECKS + 1):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/api/chat", body=body,
                     headers={"Content-Type": "application/json", "X-Forwarded-For": f"203.0.113.{i}"})
        response = conn.getresponse()
        answer = response.read()
        statuses.append(response.status)
        conn.close()
    allowed = PER_MINUTE - STREAM_CHECKS
    share = [after - was for after, was in zip(served_counts(workdir), before)]
    # With one replica serving them all, a 429 would prove nothing about sharing.
    check(all(share), f"both replicas answered some of them: {share}")
    check(statuses == [200] * allowed + [429],
          f"{PER_MINUTE}/minute shared by both replicas, forged X-Forwarded-For ignored: {statuses}")
    check(isinstance(json.loads(answer)["error"], str) and response.getheader("Retry-After") is not None,
          f"429 in Ollama's format with Retry-After {response.getheader('Retry-After')}")


def check_error_bodies(port: int) -> None:
    big = b"x" * (2 * 1024 * 1024)
    status, _, pieces = post(port, "/api/chat", big)
    body = json.loads(b"".join(p for _, p in pieces))
    check(status == 413 and isinstance(body["error"], str), f"2 MB body on /api/chat: {status} {body}")
    status, _, pieces = post(port, "/v1/chat/completions", big)
    body = json.loads(b"".join(p for _, p in pieces))
    check(status == 413 and body["error"]["type"] == "invalid_request_error", f"2 MB body on /v1: {status} {body}")


def check_replicas_down(port: int) -> None:
    for path in ("/api/tags", "/v1/models"):
        status, headers, raw = get(port, path)
        body = json.loads(raw)
        check(status == 503 and headers.get("Retry-After") == "5" and "error" in body,
              f"all replicas down, GET {path}: {status}, Retry-After {headers.get('Retry-After')}, {body}")


def main() -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        print("nginx is not installed (Debian: apt-get install nginx-light)")
        return 2
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="lemoe-nginx-"))
    upstream = start_upstream(PIECES, 0.1)
    redis, redis_port = start_redis(workdir)
    replicas: list[Server] = []
    proxy: subprocess.Popen[bytes] | None = None
    try:
        for i in range(2):
            project = workdir / f"replica{i}"
            replicas.append(start_lemoe(replica_config(project, upstream.url, redis_port), project))
        port = free_port()
        conf = loopback_nginx_conf(replicas, port, workdir)
        tested = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(workdir)], capture_output=True, text=True,
                                check=False)
        check(tested.returncode == 0, "nginx -t on the loopback copy")
        proxy = subprocess.Popen([nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        for _ in range(STREAM_CHECKS):
            check_streams(port)
        served = served_counts(workdir)
        check(all(served), f"requests per replica: {served}")
        check_shared_rate_limit(port, workdir)
        check_error_bodies(port)
        for replica in replicas:
            replica.stop()
        check_replicas_down(port)
    finally:
        if proxy is not None:
            stop_process(proxy)
        for replica in replicas:
            replica.stop()
        stop_process(redis)
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
