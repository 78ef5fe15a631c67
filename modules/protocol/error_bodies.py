"""Which protocol's error shape a request path gets: Anthropic's on /v1/messages, OpenAI's on
the rest of /v1/ (the Responses API included), Ollama's everywhere else.

One function, so the Flask error handlers and the gevent worker (which answers requests too
malformed for Flask to see) can never disagree about a path.
"""

from __future__ import annotations

from typing import Any

from modules.errors import RequestError


def error_body_for_path(path: str, err: RequestError) -> tuple[dict[str, Any], int]:
    """The error body and HTTP status for `err` on a request to `path`."""
    from modules.protocol.anthropic_protocol import anthropic_error_body, is_anthropic_path
    from modules.protocol.ollama_protocol import ollama_error_body
    from modules.protocol.openai_protocol import is_openai_path, openai_error_body

    if is_anthropic_path(path):
        return anthropic_error_body(err)
    if is_openai_path(path):
        return openai_error_body(err)
    return ollama_error_body(err)
