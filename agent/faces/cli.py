"""eptwatch-agent command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from eptwatch.agent import __version__

# The sampler, its collectors, the model and the wire code are imported by the command that runs
# them: `--help` and `--version` load none of them (issue 12: start-up imports only what it uses).
if TYPE_CHECKING:
    from eptwatch.agent.model.predicate import EraOverride
    from eptwatch.agent.sources.hostroot import HostRoot


def _add_root_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="DIR", help="a whole host tree shaped like / (fixtures, or a host mounted elsewhere)")
    p.add_argument("--path.procfs", dest="procfs", metavar="DIR", help="procfs mount point (default /proc, or DIR/proc with --root)")
    p.add_argument("--path.sysfs", dest="sysfs", metavar="DIR", help="sysfs mount point (default /sys)")
    p.add_argument("--path.debugfs", dest="debugfs", metavar="DIR", help="debugfs mount point (default /sys/kernel/debug)")


def host_root_from_args(args: argparse.Namespace) -> HostRoot:
    from eptwatch.agent.sources.hostroot import HostRoot

    return HostRoot.from_paths(args.root, args.procfs, args.sysfs, args.debugfs)


def _overrides(path: str | None) -> tuple[EraOverride, ...]:
    from eptwatch.agent.faces.config import error_line, read_era_overrides  # the same loader `run` uses

    try:
        return read_era_overrides(path or "")
    except ValueError as exc:  # ParseError included
        raise SystemExit(error_line("eptwatch-agent", exc)) from None


def cmd_sample(args: argparse.Namespace) -> int:
    from eptwatch.agent.faces.table import render_table
    from eptwatch.agent.model.sampler import Sampler, SamplerConfig
    from eptwatch.agent.report.host_report import host_report, report_to_json

    root = host_root_from_args(args)
    if not root.procfs.is_dir():
        print(f"eptwatch-agent: error: procfs {root.procfs} is not a directory", file=sys.stderr)
        return 2
    config = SamplerConfig(
        smaps_mode=args.smaps_mode,
        host_id=args.host_id,
        era_overrides=_overrides(args.era_overrides),
        use_qmp=not args.no_qmp,
    )
    sample = Sampler(root, config).sample()
    if args.format == "json":
        print(report_to_json(host_report(sample)))
    else:
        sys.stdout.write(render_table(sample))
    return 0


NO_QMP_HELP = "never connect to QEMU's QMP monitor sockets for query-stats (the counters' last resort without debugfs)"
AGENT_SECRET_PATHS = ("token_file", "tls_ca", "tls_cert", "tls_key")
RUN_FLAGS = {
    "server": ("--server", "HOST:PORT", "the aggregator"),
    "interval_seconds": ("--interval", "SECONDS", "sampling interval (default 30, jittered)"),
    "metrics_listen": ("--metrics-listen", "HOST:PORT", "local Prometheus endpoint (default 127.0.0.1:9860; '' disables)"),
    "spool_path": ("--spool", "FILE", "durable spool (SQLite)"),
    "host_id": ("--host-id", "ID", "host identity (default: hostname)"),
    "labels_file": ("--labels-file", "FILE", "host labels, key=\"value\" per line (Kubernetes downward API format)"),
    "token_file": ("--token-file", "FILE", "bearer token for the aggregator"),
    "tls_ca": ("--tls-ca", "FILE", "CA that signed the aggregator's certificate (checked at start)"),
    "tls_cert": ("--tls-cert", "FILE", "client certificate (mutual TLS)"),
    "tls_key": ("--tls-key", "FILE", "client key (mutual TLS)"),
    "tls_server_name": ("--tls-server-name", "NAME", "expected name in the aggregator's certificate"),
    "era_overrides_file": ("--era-overrides", "FILE", "YAML table: kernel release pattern -> predicate era"),
}


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from eptwatch.agent.faces.config import (
        ConfigError,
        check_file_parent,
        check_tls_files,
        environ,
        error_line,
        load_config,
    )
    from eptwatch.agent.faces.daemon import AgentConfig, AgentDaemon

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {k: getattr(args, k) for k in RUN_FLAGS}
    flags.update(root=args.root, procfs=args.procfs, sysfs=args.sysfs, debugfs=args.debugfs, insecure_plaintext=args.insecure_plaintext,
                 use_qmp=args.use_qmp)
    try:
        cfg = load_config(AgentConfig, Path(args.config) if args.config else None, env=environ(), flags=flags,
                          secret_paths=AGENT_SECRET_PATHS, flag_names={k: v[0] for k, v in RUN_FLAGS.items()})
        # Checked here, once: a CA that cannot be loaded would otherwise fail every handshake, forever.
        check_tls_files(cfg.tls_cert or None, cfg.tls_key or None, cfg.tls_ca or None, server=False)
        check_file_parent(cfg.spool_path, "spool_path")
        daemon = AgentDaemon(cfg)
    except (ConfigError, ValueError, OSError) as exc:
        print(error_line("eptwatch-agent", exc), file=sys.stderr)
        return 2
    return asyncio.run(daemon.run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eptwatch-agent", description="Estimate lost EPT/NPT huge mappings on this KVM host.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="take one sample of this host and print it")
    _add_root_flags(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--smaps-mode", choices=("auto", "full", "rollup"), default="auto")
    p.add_argument("--era-overrides", metavar="FILE", help="YAML table: kernel release pattern -> predicate era")
    p.add_argument("--host-id", help="host identity to report (default: the host's hostname)")
    p.add_argument("--no-qmp", action="store_true", help=NO_QMP_HELP)
    p.set_defaults(func=cmd_sample)

    r = sub.add_parser("run", help="sample every interval and stream reports to the aggregator")
    _add_root_flags(r)
    r.add_argument("--config", metavar="FILE", help="YAML configuration (see docs/configuration.md)")
    for key, (flag, metavar, help_text) in RUN_FLAGS.items():
        # A number given as a flag is checked by argparse (exit 2 with a message, not a traceback).
        r.add_argument(flag, dest=key, metavar=metavar, help=help_text, type=float if key == "interval_seconds" else str)
    r.add_argument("--insecure-plaintext", action="store_const", const=True, help="no TLS to the aggregator "
                   "(demos, tests, or a network you trust: the reports and the token travel in clear)")
    # Only when given: otherwise use_qmp comes from --config (default true).
    r.add_argument("--no-qmp", dest="use_qmp", action="store_const", const=False, help=NO_QMP_HELP)
    r.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    r.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
