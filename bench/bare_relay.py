"""The baseline: a bare Flask relay that forwards every request to one upstream, nothing else.

    RELAY_UPSTREAM=http://127.0.0.1:PORT gunicorn -k gevent --worker-connections 32 'bench.bare_relay:create_app()'
"""

from __future__ import annotations

import os

import requests
from flask import Flask, Response, request, stream_with_context


def create_app() -> Flask:
    app = Flask(__name__)
    upstream = os.environ["RELAY_UPSTREAM"].rstrip("/")
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))

    @app.post("/<path:path>")
    def relay(path: str) -> Response:
        answer = session.post(f"{upstream}/{path}", data=request.get_data(), stream=True,
                              headers={"Content-Type": "application/json"}, timeout=(5, 120))
        pieces = stream_with_context(answer.iter_content(chunk_size=None))
        return Response(pieces, status=answer.status_code, content_type=answer.headers.get("Content-Type"))

    return app
