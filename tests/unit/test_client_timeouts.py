"""$LEMOE_CLIENT_TIMEOUT parsing (the behaviour is tested on a live server in tests/hardening)."""

from __future__ import annotations

import pytest

from modules.client_timeouts import DEFAULT_CLIENT_TIMEOUT, client_timeout_from_environment


@pytest.mark.parametrize("raw,expected", [("", DEFAULT_CLIENT_TIMEOUT), ("2.5", 2.5), ("0", DEFAULT_CLIENT_TIMEOUT),
                                          ("-1", DEFAULT_CLIENT_TIMEOUT), ("soon", DEFAULT_CLIENT_TIMEOUT),
                                          ("nan", DEFAULT_CLIENT_TIMEOUT), ("1e9", DEFAULT_CLIENT_TIMEOUT)])
def test_client_timeout_from_environment(raw: str, expected: float) -> None:
    assert client_timeout_from_environment({"LEMOE_CLIENT_TIMEOUT": raw}) == expected


def test_default_when_unset() -> None:
    assert client_timeout_from_environment({}) == DEFAULT_CLIENT_TIMEOUT
