"""Routers, protocol converters and backends never import Flask: they see plain values, never
HTTP, so they can be tested, benchmarked and reused (the CLI, the evaluation) without a web app.

Checked twice: statically, every import statement of those modules and of the project modules
they reach (function bodies and TYPE_CHECKING blocks included, where a lazy import hides); and
for real, importing them in a fresh interpreter. The modules are found by name anywhere under
modules/, so moving one into a package keeps it checked.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

from tests.contract.conftest import REPO

WEB = ("flask", "werkzeug", "flask_limiter")
# Module file names (any folder under modules/) of each layer that must stay free of HTTP.
LAYERS = {
    "routers": ("*router*", "router_factory", "decision_cache", "encoders", "encode_batching", "use_onnx",
                "calibration", "classifier_*", "route_input", "capabilities", "paged_table"),
    "protocol": ("*_protocol", "openai_upstream", "chat_types", "errors"),
    "backends": ("*backend*", "ai_engine", "onnx_runner", "expert_runner", "expert_health", "model_pool",
                 "model_stats"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_modules(patterns: tuple[str, ...]) -> list[str]:
    return sorted(module_name(p) for p in (REPO / "modules").rglob("*.py")
                  if any(fnmatch.fnmatch(p.stem, pattern) for pattern in patterns))


def imported_names(path: Path, package: str | None = None) -> set[str]:
    """Every module an import statement in the file names, wherever the statement is."""
    names: set[str] = set()
    if package is None:
        package = module_name(path).rsplit(".", 1)[0] if path.stem != "__init__" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            # `from modules import x` imports the module modules.x.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def web_import_chain(start: str) -> list[str] | None:
    """The project modules from `start` to one that imports a web module, or None."""
    seen = {start}
    queue: list[list[str]] = [[start]]
    while queue:
        chain = queue.pop(0)
        path = project_file(chain[-1])
        if path is None:
            continue
        for name in sorted(imported_names(path)):
            if name.split(".")[0] in WEB:
                return [*chain, name]
            if (name.startswith("modules") or name == "api_server") and name not in seen and project_file(name):
                seen.add(name)
                queue.append([*chain, name])
    return None


def test_every_layer_is_found() -> None:
    for layer, patterns in LAYERS.items():
        assert len(layer_modules(patterns)) >= 4, (layer, layer_modules(patterns))


def test_no_router_protocol_or_backend_module_imports_flask_anywhere_in_its_code() -> None:
    chains = {}
    for patterns in LAYERS.values():
        for name in layer_modules(patterns):
            chain = web_import_chain(name)
            if chain is not None:
                chains[name] = " -> ".join(chain)
    assert chains == {}


IMPORTING_CHILD = r"""
import importlib, sys
web = ("flask", "werkzeug", "flask_limiter")
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded = [m for m in web if m in sys.modules]
    if loaded:
        print(f"{name} loaded {loaded}")
        sys.exit(1)
print("ok")
"""


def test_importing_them_loads_no_web_module() -> None:
    names = [name for patterns in LAYERS.values() for name in layer_modules(patterns)]
    done = subprocess.run([sys.executable, "-c", IMPORTING_CHILD, *names], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr[-3000:]


def test_the_check_sees_imports_in_function_bodies_and_through_other_modules(tmp_path: Path) -> None:
    # Else the tests above could pass vacuously.
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def view():\n    from flask import request\n    return request\n")
    assert "flask" in imported_names(lazy, package="modules")
    assert web_import_chain("modules.ops.health") == ["modules.ops.health", "flask"]
    assert web_import_chain("api_server") is not None


# The README's module list, as layers from the bottom up: a module may import from its own layer
# or one below, never from one above (function bodies and TYPE_CHECKING blocks included).
STACK = (
    ("core", ("chat_types", "generation_options", "embeddings", "errors", "logger", "config_manager", "capabilities", "blocking",
              "progress", "think_tags", "model_stats", "expert_health")),
    ("protocol", ("protocol.*",)),
    ("encoding", ("encoding.*",)),
    ("routing", ("generic_router", "embedding_router", "decision_router", "calibration", "decision_cache",
                 "route_input", "router_factory", "classifier_*", "held_out", "route_eval")),
    ("backends", ("backend", "backend_registry", "http_backends", "litellm_backend", "ai_engine", "onnx_runner",
                  "model_pool", "local_backend")),
    ("runners", ("expert_runner", "embedding_runner", "model_catalog")),
    ("app", ("services", "guards.*", "http_views", "ops.*")),
)


def stack_level(module: str) -> int | None:
    relative = module.removeprefix("modules.")
    return next((i for i, (_, patterns) in enumerate(STACK)
                 if any(fnmatch.fnmatch(relative, p) for p in patterns)), None)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (REPO / "modules").rglob("*.py") if p.stem != "__init__"}


def test_every_module_has_a_layer() -> None:
    assert [m for m in project_modules() if stack_level(m) is None] == []


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    modules = project_modules()
    upward = [(m, d) for m, path in modules.items() for d in imported_names(path)
              if d in modules and (stack_level(d) or 0) > (stack_level(m) or 0)]
    assert upward == []


def top_level_imports(path: Path) -> set[str]:
    """What importing the file imports at once: module-level statements outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    body = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_there_is_no_import_cycle() -> None:
    modules = project_modules()
    graph = {m: {d for d in top_level_imports(p) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*trail[trail.index(d):], d] if d in trail else [m, d])
            elif d not in state:
                visit(d, [*trail, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
