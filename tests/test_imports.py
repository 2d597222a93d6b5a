"""Who imports whom: the aggregator never loads the agent, the CLIs load only what their command uses,
and no package has an import loop.

The run-time checks start fresh interpreters (this one has long since imported everything); the static
checks read the source with ast, so a lazy import inside a function is seen too.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .procs import BIN

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# The demo runs the real agent beside a simulated fleet (simulate.py samples fixture trees with the
# agent's Sampler): it is the one server module that may use the agent, and the aggregator never loads it.
SERVER_USES_AGENT = {"eptwatch.server.demo", "eptwatch.server.simulate"}


def _modules_after(code: str, *args: str) -> list[str]:
    """Run `code` in a fresh interpreter; the names in sys.modules when it is done."""
    runner = code + "\nimport json, sys\nprint('\\nMODULES ' + json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", runner, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("MODULES ")][-1]
    return json.loads(line.removeprefix("MODULES "))  # type: ignore[no-any-return]


def _imported_by_console_script(*argv: str) -> list[str]:
    """The modules a console script really imports (PYTHONPROFILEIMPORTTIME lists each on stderr)."""
    out = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    names = [l.rsplit("|", 1)[1].strip() for l in out.stderr.splitlines() if l.startswith("import time:") and l.count("|") == 2]
    assert "eptwatch.common" in names, "no import-time lines: PYTHONPROFILEIMPORTTIME was not honoured"
    return names


def _agent_modules(names: list[str]) -> list[str]:
    return [n for n in names if n == "eptwatch.agent" or n.startswith("eptwatch.agent.")]


# ---------------------------------------------------------------------------------------------------
# At run time


def test_a_started_aggregator_has_loaded_nothing_of_the_agent(tmp_path: Path) -> None:
    # The whole start-up path: the CLI module, the config, the app started (gRPC, HTTP, store) and stopped,
    # and every other server module the aggregator has.
    code = (
        "import asyncio, sys, eptwatch.server.cli\n"
        "from eptwatch.server import auth, fleet, http, ingest, metrics, page, query, store, validate\n"
        "from eptwatch.server.app import Aggregator, ServerConfig\n"
        "from eptwatch.common.config import load_config\n"
        "cfg = load_config(ServerConfig, None, flags=dict(state_dir=sys.argv[1], listen='127.0.0.1:0', http='127.0.0.1:0',\n"
        "                  insecure_plaintext=True, insecure_no_auth=True))\n"
        "async def run():\n"
        "    agg = Aggregator(cfg)\n"
        "    await agg.start()\n"
        "    assert agg.ready and agg.grpc_port > 0\n"
        "    await agg.stop()\n"
        "asyncio.run(run())\n"
    )
    names = _modules_after(code, str(tmp_path / "state"))
    assert "eptwatch.server.app" in names and "grpc" in names  # it did start
    assert _agent_modules(names) == []


def test_server_help_loads_neither_the_agent_nor_grpc() -> None:
    names = _imported_by_console_script("eptwatch-server", "--help")
    assert "eptwatch.server.cli" in names
    assert _agent_modules(names) == []
    assert not {"grpc", "eptwatch.server.app", "eptwatch.server.store", "sqlite3"} & set(names)


def test_agent_sample_help_loads_no_sampler_collectors_or_grpc() -> None:
    names = _imported_by_console_script("eptwatch-agent", "sample", "--help")
    assert "eptwatch.agent.cli" in names
    # Only the CLI and its package: no sampler, collector, model, report or wire code.
    assert sorted(n for n in names if n.startswith("eptwatch")) == ["eptwatch", "eptwatch.agent", "eptwatch.agent.cli", "eptwatch.common"]
    assert not {n for n in names if n.split(".")[0] in ("grpc", "google", "yaml", "importlib_metadata")} | \
        ({"importlib.metadata"} & set(names))


def test_agent_sample_still_runs_what_help_leaves_out(fixtures_dir: Path) -> None:
    # The lazy imports are real imports: the command that needs them finds them.
    names = _modules_after("import sys\nfrom eptwatch.agent.cli import main\nmain(['sample', '--root', sys.argv[1], '--format', 'json'])",
                           str(fixtures_dir / "linux-6.6-pages2m"))
    assert {"eptwatch.agent.sampler", "eptwatch.agent.report", "eptwatch.common.wire"} <= set(names)


# ---------------------------------------------------------------------------------------------------
# In the source


def _module_files() -> dict[str, Path]:
    """Every first-party module: dotted name -> file (pyproject.toml's package-dir; not the generated code)."""
    found: dict[str, Path] = {}
    for package, directory in PACKAGE_DIRS.items():
        if package == "eptwatch.v1":
            continue
        for f in sorted((REPO / directory).glob("*.py")):
            found[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return found


MODULES = _module_files()


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """First-party modules an import statement names (relative imports resolved; `from . import x` is
    the submodule x when there is one, else the package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    package = module if MODULES[module].stem == "__init__" else module.rsplit(".", 1)[0]
    if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    out = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    if target in MODULES and len(out) < len(node.names):
        out.append(target)
    return out


def _imports(module: str, *, load_time_only: bool) -> set[str]:
    """First-party modules `module` imports. load_time_only: only what runs (or is type-checked) when the
    module loads: module level, including `if TYPE_CHECKING:` and try blocks, not function bodies."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if load_time_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.update(_resolve(module, child))
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_static_import_graph_sees_the_app_imports() -> None:
    # The checks below are only as good as the graph: it must see relative, TYPE_CHECKING and lazy imports.
    assert {"eptwatch.server.http", "eptwatch.server.metrics", "eptwatch.common.config"} <= _imports("eptwatch.server.app", load_time_only=True)
    assert "eptwatch.agent.sampler" not in _imports("eptwatch.agent.cli", load_time_only=True)
    assert "eptwatch.agent.sampler" in _imports("eptwatch.agent.cli", load_time_only=False)


@pytest.mark.parametrize("package", ["eptwatch.server", "eptwatch.common", "eptwatch.agent"])
def test_no_import_cycle_at_load_time(package: str) -> None:
    graph = {m: {d for d in _imports(m, load_time_only=True) if d.startswith(package)} for m in MODULES if m.startswith(package)}
    assert _cycles(graph) == []


def test_app_http_and_metrics_do_not_import_each_other_back() -> None:
    for module in ("eptwatch.server.http", "eptwatch.server.metrics"):
        assert "eptwatch.server.app" not in _imports(module, load_time_only=False)
    assert "eptwatch.server.metrics" not in _imports("eptwatch.server.http", load_time_only=False)


def test_aggregator_source_imports_nothing_from_the_agent() -> None:
    # Lazy imports included: a server module reaching into the agent at run time is as bad as at load.
    offenders = {m: sorted(d for d in _imports(m, load_time_only=False) if d.startswith("eptwatch.agent"))
                 for m in MODULES if m.startswith("eptwatch.server") and m not in SERVER_USES_AGENT}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_shared_package_imports_neither_program() -> None:
    for m in MODULES:
        if m.startswith("eptwatch.common"):
            assert not {d for d in _imports(m, load_time_only=False) if d.startswith(("eptwatch.agent", "eptwatch.server"))}, m


def test_old_import_paths_still_give_the_moved_objects() -> None:
    # Users' code (and plugins) may import these from the agent: the moved objects are re-exported, not copied.
    import eptwatch.agent.config
    import eptwatch.agent.httpserve
    import eptwatch.agent.report
    import eptwatch.common.config
    import eptwatch.common.httpserve
    import eptwatch.common.wire
    import eptwatch.server.auth

    assert eptwatch.agent.httpserve.HttpServer is eptwatch.common.httpserve.HttpServer
    assert eptwatch.agent.report.message_to_dict is eptwatch.common.wire.message_to_dict
    for name in ("ConfigError", "load_config", "parse_hostport", "check_tls_files", "error_line", "MAX_SECONDS"):
        assert getattr(eptwatch.agent.config, name) is getattr(eptwatch.common.config, name), name
    assert eptwatch.server.auth.ConfigError is eptwatch.common.config.ConfigError
