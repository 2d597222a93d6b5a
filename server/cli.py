"""eptwatch-server command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from eptwatch.server import __version__

if TYPE_CHECKING:
    from eptwatch.server.app import ServerConfig

# The rest is imported in main(), after the arguments are parsed: `--help`, `--version` and
# `hash-token` need neither gRPC nor the store (issue 12: start-up imports only what it uses).

PROG = "eptwatch-server"

# The cyclic collector's thresholds while serving. Ingest allocates a few dozen short-lived objects per
# report (protobuf wrappers, tuples, futures) and a backlog keeps thousands of reports queued until their
# commit: at CPython's default (700, 10, 10) the collector ran about once per 50-report message and
# rescanned the queued ones each time (9% of the event loop's samples in backlog-50). At these values
# the aggregator did about a third more reports per core-second in hot-50 and backlog-50 (medians of three
# interleaved pairs) and the same in the paced fleet (docs/benchmarks.md); cyclic garbage, which ingest
# hardly makes, waits a little longer.
GC_THRESHOLDS = (50_000, 20, 100)

# Also taken from EPTWATCH_<KEY> (a mounted Secret): state_dir may be a postgresql:// URL with a password.
SECRET_PATHS = ("tokens_file", "tls_cert", "tls_key", "tls_client_ca", "state_dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="eptwatch aggregator: ingest agent reports, serve the fleet view.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see docs/configuration.md)")
    p.add_argument("--listen", metavar="HOST:PORT", help="gRPC ingest address (default 127.0.0.1:9861)")
    p.add_argument("--http", metavar="HOST:PORT", help="HTTP address for /metrics, the API and the fleet page (default 127.0.0.1:9862)")
    p.add_argument("--state", dest="state_dir", metavar="DIR|URL",
                   help="state: a directory (SQLite, WAL; the default) or a postgresql:// URL shared by several aggregators")
    p.add_argument("--tokens-file", metavar="FILE", help="agent tokens (SHA-256 digests scoped to host patterns)")
    p.add_argument("--tls-cert", metavar="FILE")
    p.add_argument("--tls-key", metavar="FILE")
    p.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--insecure-plaintext", action="store_const", const=True, help="serve gRPC without TLS (loopback --listen only, "
                   "unless --insecure-allow-non-loopback)")
    p.add_argument("--insecure-no-auth", action="store_const", const=True, help="accept agents without tokens (loopback --listen "
                   "only, unless --insecure-allow-non-loopback)")
    p.add_argument("--insecure-allow-non-loopback", action="store_const", const=True,
                   help="allow the insecure flags with a --listen address other than loopback (a trusted network, e.g. behind a NetworkPolicy)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = p.add_subparsers(dest="command")
    sub.add_parser("hash-token", help="read a token on stdin and print its SHA-256 for the tokens file")
    return p


FLAG_KEYS = ("listen", "http", "state_dir", "tokens_file", "tls_cert", "tls_key", "tls_client_ca", "insecure_plaintext", "insecure_no_auth",
             "insecure_allow_non_loopback")


def preflight(cfg: ServerConfig) -> None:
    """What can be checked before anything binds or opens: each failure is a ConfigError naming its file."""
    from eptwatch.common.config import check_state_dir, check_tls_files
    from eptwatch.server.store.base import is_postgres_url

    if not is_postgres_url(cfg.state_dir):  # a shared store is checked by connecting to it (Aggregator)
        check_state_dir(cfg.state_dir, "state_dir")
    if cfg.tls_cert and cfg.tls_key:
        check_tls_files(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, server=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from eptwatch.common.config import error_line

    if args.command == "hash-token":
        from eptwatch.server.ingest.auth import hash_token

        token = sys.stdin.readline().strip()
        if not token:
            print(error_line(f"{PROG} hash-token", "no token on stdin"), file=sys.stderr)
            return 2
        print(hash_token(token))
        return 0
    import asyncio
    import logging
    import sqlite3

    from eptwatch.common.config import ConfigError, environ, load_config
    from eptwatch.server.app import Aggregator, ServerConfig

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(ServerConfig, Path(args.config) if args.config else None, env=environ(),
                          flags={k: getattr(args, k) for k in FLAG_KEYS}, secret_paths=SECRET_PATHS)
        preflight(cfg)
        agg = Aggregator(cfg)
    except (ConfigError, RuntimeError) as exc:  # ConfigError: also what auth.py raises
        print(error_line(PROG, exc), file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # a file in the state directory that is not our database
        print(error_line(PROG, f"state_dir: {cfg.state_dir}: cannot open the database: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:
        print(error_line(PROG, f"state_dir: {cfg.state_dir}: {exc.strerror or exc}"), file=sys.stderr)
        return 2
    import gc

    gc.set_threshold(*GC_THRESHOLDS)
    try:
        asyncio.run(agg.serve_forever())
    except ConfigError as exc:  # an address that cannot be bound
        print(error_line(PROG, exc), file=sys.stderr)
        return 2
    except OSError as exc:
        print(error_line(PROG, exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
