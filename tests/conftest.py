"""Fixtures shared by every test: a fake remote LLM server and a clean environment."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.fakes.fake_upstream import FakeUpstream, reserve_closed_port


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    """One loopback Ollama + OpenAI stand-in for the whole run (knobs reset before each test)."""
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake_upstream(request: pytest.FixtureRequest) -> None:
    # Only tests that use the fake (directly or through another fixture) pay for a reset.
    if "fake_upstream" in request.fixturenames:
        request.getfixturevalue("fake_upstream").reset()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a real API key from the developer's shell (or leaks one into a request)."""
    for name in list(os.environ):
        if name.endswith("_API_KEY"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def closed_url() -> Iterator[str]:
    """A base URL where nothing listens, for the whole run (the live servers' broken experts)."""
    with reserve_closed_port() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    """A base URL where nothing listens: connections to it are refused."""
    with reserve_closed_port() as port:
        yield f"http://127.0.0.1:{port}"
