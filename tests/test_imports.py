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
        "from eptwatch.server.ingest import auth, servicer, validate\n"
        "from eptwatch.server.store import base, sqlite\n"
        "from eptwatch.server.fleet import state, follow\n"
        "from eptwatch.server.faces import hostpage, http, metrics, page, query\n"
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
    assert not {"grpc", "eptwatch.server.app", "eptwatch.server.store.sqlite", "sqlite3"} & set(names)


def test_agent_sample_help_loads_no_sampler_collectors_or_grpc() -> None:
    names = _imported_by_console_script("eptwatch-agent", "sample", "--help")
    assert "eptwatch.agent.faces.cli" in names
    # Only the CLI and its package: no sampler, collector, model, report or wire code.
    assert sorted(n for n in names if n.startswith("eptwatch")) == ["eptwatch", "eptwatch.agent", "eptwatch.agent.faces", "eptwatch.agent.faces.cli", "eptwatch.common"]
    assert not {n for n in names if n.split(".")[0] in ("grpc", "google", "yaml", "importlib_metadata")} | \
        ({"importlib.metadata"} & set(names))


def test_agent_sample_still_runs_what_help_leaves_out(fixtures_dir: Path) -> None:
    # The lazy imports are real imports: the command that needs them finds them.
    names = _modules_after("import sys\nfrom eptwatch.agent.faces.cli import main\nmain(['sample', '--root', sys.argv[1], '--format', 'json'])",
                           str(fixtures_dir / "linux-6.6-pages2m"))
    assert {"eptwatch.agent.model.sampler", "eptwatch.agent.report.host_report", "eptwatch.common.wire"} <= set(names)


# ---------------------------------------------------------------------------------------------------
# In the source


def _module_files() -> dict[str, Path]:
    """Every first-party module: dotted name -> file (pyproject.toml's package-dir; not the generated code)."""
    found: dict[str, Path] = {}
    for package, directory in PACKAGE_DIRS.items():
        if package == "eptwatch.v1":
            continue
        for f in sorted((REPO / directory).rglob("*.py")):
            dotted = ".".join((package, *f.relative_to(REPO / directory).with_suffix("").parts))
            found[dotted.removesuffix(".__init__")] = f
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
    assert {"eptwatch.server.faces.http", "eptwatch.server.faces.metrics", "eptwatch.common.config"} <= _imports("eptwatch.server.app", load_time_only=True)
    assert "eptwatch.agent.model.sampler" not in _imports("eptwatch.agent.faces.cli", load_time_only=True)
    assert "eptwatch.agent.model.sampler" in _imports("eptwatch.agent.faces.cli", load_time_only=False)


@pytest.mark.parametrize("package", ["eptwatch.server", "eptwatch.common", "eptwatch.agent"])
def test_no_import_cycle_at_load_time(package: str) -> None:
    graph = {m: {d for d in _imports(m, load_time_only=True) if d.startswith(package)} for m in MODULES if m.startswith(package)}
    assert _cycles(graph) == []


def test_app_http_and_metrics_do_not_import_each_other_back() -> None:
    for module in ("eptwatch.server.faces.http", "eptwatch.server.faces.metrics"):
        assert "eptwatch.server.app" not in _imports(module, load_time_only=False)
    assert "eptwatch.server.faces.metrics" not in _imports("eptwatch.server.faces.http", load_time_only=False)


def test_aggregator_source_imports_nothing_from_the_agent() -> None:
    # Lazy imports included: a server module reaching into the agent at run time is as bad as at load.
    offenders = {m: sorted(d for d in _imports(m, load_time_only=False) if d.startswith("eptwatch.agent"))
                 for m in MODULES if m.startswith("eptwatch.server") and m not in SERVER_USES_AGENT}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_shared_package_imports_neither_program() -> None:
    for m in MODULES:
        if m.startswith("eptwatch.common"):
            assert not {d for d in _imports(m, load_time_only=False) if d.startswith(("eptwatch.agent", "eptwatch.server"))}, m


# The folders show the flow: a module may use its own layer and the layers before it, never a later one
# (the agent's sources know nothing of the model, the model nothing of the wire, and so on).
AGENT_LAYERS = ("sources", "model", "report", "uplink", "faces")
# The server's flow is ingest -> store -> fleet -> faces, but its layers lean on each other's data types
# (the store keeps the fleet's summaries, the fleet view judges reports with ingest's checks), so the rule
# is what must never happen: the durable state and the fleet view depend on the gRPC front door or on
# the read side, or a layer below the faces reaches into them; and only the assembly (app) and the
# follower of a shared store name a particular store.
SERVER_FORBIDDEN = {
    "store": ("eptwatch.server.ingest.servicer", "eptwatch.server.ingest.auth", "eptwatch.server.faces"),
    "fleet": ("eptwatch.server.ingest.servicer", "eptwatch.server.ingest.auth", "eptwatch.server.faces"),
    "ingest": ("eptwatch.server.faces", "eptwatch.server.store.sqlite", "eptwatch.server.store.postgres"),
    # The read side and ingest see a store only through its interface (store.base, store.commit).
    "faces": ("eptwatch.server.ingest.auth", "eptwatch.server.store.sqlite", "eptwatch.server.store.postgres"),
}


def _layer(module: str, program: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[1] == program else None


def test_agent_layers_import_only_earlier_layers() -> None:
    assert {_layer(m, "agent") for m in MODULES if m.startswith("eptwatch.agent.")} - {None} == set(AGENT_LAYERS)
    offenders = []
    for m in MODULES:
        layer = _layer(m, "agent")
        if layer is None:
            continue
        for d in _imports(m, load_time_only=False):
            other = _layer(d, "agent")
            if other is not None and AGENT_LAYERS.index(other) > AGENT_LAYERS.index(layer):
                offenders.append(f"{m} -> {d}")
    assert offenders == []


def test_server_layers_keep_to_their_side() -> None:
    assert {_layer(m, "server") for m in MODULES if m.startswith("eptwatch.server.")} - {None} == {"ingest", "store", "fleet", "faces"}
    offenders = []
    for m in MODULES:
        forbidden = SERVER_FORBIDDEN.get(_layer(m, "server") or "", ())
        offenders += [f"{m} -> {d}" for d in _imports(m, load_time_only=False) if d.startswith(forbidden)]
    assert offenders == []


def test_layer_rule_sees_a_violation() -> None:
    # The rules above are only as good as _layer and the graph: a known edge must be classified.
    assert _layer("eptwatch.agent.sources.collectors.smaps", "agent") == "sources"
    assert _layer("eptwatch.agent.faces", "agent") is None
    assert "eptwatch.agent.sources.smaps" in _imports("eptwatch.agent.sources.collectors.smaps", load_time_only=False)
