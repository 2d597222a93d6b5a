"""eptwatch-server command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from eptwatch.agent.config import ConfigError, environ, load_config

from .app import Aggregator, ServerConfig
from .auth import ConfigError as AuthConfigError
from .auth import hash_token

# Also taken from EPTWATCH_<KEY> (a mounted Secret): state_dir may be a postgresql:// URL with a password.
SECRET_PATHS = ("tokens_file", "tls_cert", "tls_key", "tls_client_ca", "state_dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eptwatch-server", description="eptwatch aggregator: ingest agent reports, serve the fleet view.")
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see docs/configuration.md)")
    p.add_argument("--listen", metavar="HOST:PORT", help="gRPC ingest address (default 127.0.0.1:9861)")
    p.add_argument("--http", metavar="HOST:PORT", help="HTTP address for /metrics, the API and the fleet page (default 127.0.0.1:9862)")
    p.add_argument("--state", dest="state_dir", metavar="DIR|URL",
                   help="state: a directory (SQLite, WAL; the default) or a postgresql:// URL shared by several aggregators")
    p.add_argument("--tokens-file", metavar="FILE", help="agent tokens (SHA-256 digests scoped to host patterns)")
    p.add_argument("--tls-cert", metavar="FILE")
    p.add_argument("--tls-key", metavar="FILE")
    p.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--insecure-plaintext", action="store_const", const=True, help="serve gRPC without TLS (loopback only)")
    p.add_argument("--insecure-no-auth", action="store_const", const=True, help="accept agents without tokens (loopback only)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = p.add_subparsers(dest="command")
    sub.add_parser("hash-token", help="read a token on stdin and print its SHA-256 for the tokens file")
    return p


FLAG_KEYS = ("listen", "http", "state_dir", "tokens_file", "tls_cert", "tls_key", "tls_client_ca", "insecure_plaintext", "insecure_no_auth")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "hash-token":
        token = sys.stdin.readline().strip()
        if not token:
            print("eptwatch-server hash-token: no token on stdin", file=sys.stderr)
            return 2
        print(hash_token(token))
        return 0
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(ServerConfig, Path(args.config) if args.config else None, env=environ(),
                          flags={k: getattr(args, k) for k in FLAG_KEYS}, secret_paths=SECRET_PATHS)
        agg = Aggregator(cfg)
    except (ConfigError, AuthConfigError, RuntimeError) as exc:
        print(f"eptwatch-server: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(agg.serve_forever())
    except OSError as exc:
        print(f"eptwatch-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
