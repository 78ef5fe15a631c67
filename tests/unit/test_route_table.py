"""Every URL in api_server's route table is in the README's API table, with its methods."""

from __future__ import annotations

import re
from pathlib import Path

from flask import Flask

from api_server import register_routes

README = Path(__file__).resolve().parents[2] / "README.md"


def api_table() -> dict[str, set[str]]:
    """README path -> the methods its row lists."""
    section = README.read_text(encoding="utf-8").split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 3 and line.startswith("|"):
            for path in re.findall(r"`([^`]+)`", cells[1]):
                rows[path] = {m.strip() for m in cells[0].split(",")}
    return rows


def test_every_route_is_documented_with_its_methods() -> None:
    app = Flask(__name__, static_folder=None)
    register_routes(app)
    table = api_table()
    for rule in app.url_map.iter_rules():
        # The README writes a path parameter as <id>.
        path = re.sub(r"<(?:\w+:)?\w+>", "<id>", rule.rule)
        assert path in table, f"{rule.rule} is missing from the README's API table"
        assert set(rule.methods or ()) - {"OPTIONS", "HEAD"} <= table[path], rule.rule
