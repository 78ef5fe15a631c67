"""Run docker/nginx.conf for real, in front of two LeMoE replicas, all on 127.0.0.1.

No Docker engine is needed: the replicas are `api_server.py` processes on free ports (experts on
the loopback stand-in upstream), and nginx is the machine's own (Debian: `apt-get install
nginx-light`). Only the `server lemoe:11435` line, the `listen` port and the pid file are
rewritten for loopback; every proxy directive runs as shipped. Checks that streams arrive piece
by piece, that both replicas serve, and that nginx's own 413 and 503 answers are JSON in the
client's protocol. Prints what it saw and exits non-zero on the first failed check.

    venv/bin/python docker/check_nginx.py
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.servers import Server, free_port, start_lemoe, start_upstream, stop_process, write_lemoe_project  # noqa: E402

PIECES = 20


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


def check_error_bodies(port: int) -> None:
    big = b"x" * (2 * 1024 * 1024)
    status, headers, pieces = post(port, "/api/chat", big)
    body = json.loads(b"".join(p for _, p in pieces))
    check(status == 413 and isinstance(body["error"], str), f"2 MB body on /api/chat: {status} {body}")
    status, headers, pieces = post(port, "/v1/chat/completions", big)
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
    workdir = Path(tempfile.mkdtemp(prefix="lemoe-nginx-"))
    upstream = start_upstream(PIECES, 0.1)
    replicas: list[Server] = []
    proxy: subprocess.Popen[bytes] | None = None
    try:
        for i in range(2):
            project = workdir / f"replica{i}"
            replicas.append(start_lemoe(write_lemoe_project(project, upstream.url, threads=32, workers=1), project))
        port = free_port()
        conf = loopback_nginx_conf(replicas, port, workdir)
        tested = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(workdir)], capture_output=True, text=True)
        check(tested.returncode == 0, "nginx -t on the loopback copy")
        proxy = subprocess.Popen([nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        for _ in range(4):
            check_streams(port)
        served = [(workdir / f"replica{i}" / "logs" / "lemoe.log").read_text().count("route expert=") for i in range(2)]
        check(all(served), f"requests per replica: {served}")
        check_error_bodies(port)
        for replica in replicas:
            replica.stop()
        check_replicas_down(port)
    finally:
        if proxy is not None:
            stop_process(proxy)
        for replica in replicas:
            replica.stop()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
