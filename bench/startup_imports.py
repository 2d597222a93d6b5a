"""Start-up cost of the two programs: CPU seconds per process and what they import.

Each case runs as a fresh process `--runs` times (interleaved, so load on a shared machine hits every
case alike); the CPU time (user + system) of each child comes from wait4's rusage, so it counts only
that process, not wall-clock time. One more run per case with PYTHONPROFILEIMPORTTIME=1 lists the
modules it imported: how many in all and how many from `eptwatch.agent`.

    .venv/bin/python bench/startup_imports.py --runs 20 [--json out.json] [--before-pythonpath DIR]

--before-pythonpath DIR runs every case a second time in each round with PYTHONPATH=DIR, where DIR
holds an older tree as `eptwatch/agent`, `eptwatch/server`, `eptwatch/v1` (symlinks to its agent/,
server/, proto/eptwatch/v1): before and after measured in the same rounds, under the same load.

Cases (the same commands work on trees before and after the decoupling, so they can be compared):
- `agent_sample_help`: `eptwatch-agent sample --help`
- `server_help`: `eptwatch-server --help`
- `server_construct`: the aggregator's start-up path up to listening: import `eptwatch.server.cli`
  and `eptwatch.server.app`, load a ServerConfig and construct the `Aggregator` (opens SQLite in a
  temporary directory, binds nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent

CONSTRUCT = (
    "import sys, eptwatch.server.cli\n"
    "from eptwatch.server.app import Aggregator, ServerConfig\n"
    "a = Aggregator(ServerConfig(state_dir=sys.argv[1], insecure_plaintext=True, insecure_no_auth=True))\n"
    "a.departed.close(); a.store.close()\n"
)


def cases(state_dir: str) -> dict[str, list[str]]:
    return {
        "agent_sample_help": [str(BIN / "eptwatch-agent"), "sample", "--help"],
        "server_help": [str(BIN / "eptwatch-server"), "--help"],
        "server_construct": [sys.executable, "-c", CONSTRUCT, state_dir],
    }


def cpu_seconds(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run argv to completion; its own user + system CPU seconds (wait4) and its stderr."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv}: exit {proc.returncode}: {err[-2000:]}")
    return usage.ru_utime + usage.ru_stime, err


def imported_modules(argv: list[str], env: dict[str, str]) -> list[str]:
    _cpu, err = cpu_seconds(argv, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    # "import time: self [us] | cumulative | imported package"; nested imports are indented.
    return [line.rsplit("|", 1)[1].strip() for line in err.splitlines()
            if line.startswith("import time:") and line.count("|") == 2 and not line.endswith("imported package")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--before-pythonpath", metavar="DIR", help="also run each case with PYTHONPATH=DIR (an older tree)")
    args = ap.parse_args()
    envs = {"after": dict(os.environ)}
    if args.before_pythonpath:
        envs = {"before": {**os.environ, "PYTHONPATH": args.before_pythonpath}, **envs}
    with tempfile.TemporaryDirectory() as tmp:
        todo = cases(tmp)
        times: dict[tuple[str, str], list[float]] = {(name, tree): [] for name in todo for tree in envs}
        for _ in range(args.runs):
            for name, argv in todo.items():
                for tree, env in envs.items():
                    times[name, tree].append(cpu_seconds(argv, env)[0])
        modules = {(name, tree): imported_modules(argv, env) for name, argv in todo.items() for tree, env in envs.items()}
    result: dict[str, dict[str, object]] = {}
    for (name, tree), t in times.items():
        agent = [m for m in modules[name, tree] if m == "eptwatch.agent" or m.startswith("eptwatch.agent.")]
        result[f"{name}/{tree}"] = {"cpu_seconds_median": statistics.median(t), "cpu_seconds_min": min(t), "cpu_seconds_max": max(t),
                                    "runs": len(t), "modules": len(modules[name, tree]), "agent_modules": agent,
                                    "grpc_imported": "grpc" in modules[name, tree]}
        print(f"{name:18s} {tree:6s} CPU median {1000 * statistics.median(t):6.1f} ms (min {1000 * min(t):6.1f}, "
              f"max {1000 * max(t):6.1f}; {len(t)} runs)  modules {len(modules[name, tree]):4d}  eptwatch.agent.* {len(agent):2d}  "
              f"grpc {'yes' if 'grpc' in modules[name, tree] else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
