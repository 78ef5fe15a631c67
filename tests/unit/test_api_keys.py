"""Where API keys come from, and how an Authorization header is judged."""

from __future__ import annotations

from pathlib import Path

import pytest

from modules.guards.api_keys import key_problem, load_api_keys
from modules.config_manager import AuthConfig
from modules.errors import ConfigError

ACCEPTED = [b"key-one", b"key-two"]


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("# comment\nfile-key  # trailing comment\n\n  other-file-key \n")
    auth = AuthConfig(api_keys_env="MY_KEYS", api_keys_file="keys.txt")
    keys = load_api_keys(auth, tmp_path, {"MY_KEYS": " a , b,, "})
    assert keys == {"a", "b", "file-key", "other-file-key"}


def test_no_keys_means_auth_off(tmp_path: Path) -> None:
    assert load_api_keys(AuthConfig(), tmp_path, {}) == frozenset()
    assert load_api_keys(AuthConfig(), tmp_path, {"LEMOE_API_KEYS": " , "}) == frozenset()


@pytest.mark.parametrize("name,reason", [("../keys.txt", "is outside"), ("/etc/passwd", "is outside"),
                                         ("missing.txt", "cannot read it (FileNotFoundError)")])
def test_key_file_must_be_a_readable_file_in_the_project(tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_api_keys(AuthConfig(api_keys_file=name), tmp_path, {})


@pytest.mark.parametrize("header,problem", [
    (None, "missing API key: send 'Authorization: Bearer <key>'"),
    ("", "missing API key: send 'Authorization: Bearer <key>'"),
    ("Bearer key-one", None),
    ("bearer   key-two ", None),
    ("BEARER key-one", None),
    ("Bearer key-on", "invalid API key"),
    ("Bearer key-one2", "invalid API key"),
    ("Bearer KEY-ONE", "invalid API key"),
    ("Bearer \u00e9\u00e9", "invalid API key"),
    ("Basic key-one", "malformed Authorization header: expected 'Bearer <key>'"),
    ("key-one", "malformed Authorization header: expected 'Bearer <key>'"),
    ("Bearer", "malformed Authorization header: expected 'Bearer <key>'"),
])
def test_authorization_header_is_judged(header: str | None, problem: str | None) -> None:
    assert key_problem(header, ACCEPTED) == problem
