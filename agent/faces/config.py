"""The agent's configuration checks; what both programs share lives in eptwatch.common.config.

The shared names (ConfigError, load_config, the start-up checks) are re-exported here so that imports
of `eptwatch.agent.faces.config` keep working.
"""

from __future__ import annotations

import re
from typing import Any

from eptwatch.agent.model.predicate import EraOverride, load_era_overrides
from eptwatch.common.config import (
    MAX_SECONDS,
    ConfigError,
    check_file_parent,
    check_port_free,
    check_state_dir,
    check_tls_files,
    environ,
    error_line,
    is_loopback_host,
    load_config,
    parse_hostport,
    read_config_file,
)

__all__ = ["MAX_SECONDS", "MIN_GUEST_RAM_MIN_BYTES", "ConfigError", "check_agent_values", "check_file_parent", "check_grpc_target",
           "check_port_free", "check_state_dir", "check_tls_files", "environ", "error_line", "is_loopback_host", "load_config",
           "parse_hostport", "read_config_file", "read_era_overrides"]


def read_era_overrides(path: str) -> tuple[EraOverride, ...]:
    """The era override table at `path` ('' for none). ValueError names an unreadable file,
    ParseError (also a ValueError) a malformed one."""
    if not path:
        return ()
    return load_era_overrides(read_config_file(path, "era override file").decode("utf-8", "replace"), path)


# A guest's RAM is at least one 2 MiB huge page; a smaller threshold would take every small mapping
# (stacks, libraries) for guest RAM.
MIN_GUEST_RAM_MIN_BYTES = 2 * 1024 * 1024


# gRPC name-resolver schemes an agent's `server` may use besides plain HOST:PORT.
_GRPC_SCHEMES = re.compile(r"(?P<scheme>dns|ipv4|ipv6|unix|unix-abstract|vsock):(?P<rest>.+)")


def check_grpc_target(value: str, key: str) -> None:
    """HOST:PORT, [IPV6]:PORT, or a gRPC target (`dns:///svc:9861`, `unix:/path`, `ipv4:...`). A dns
    target's endpoint is checked as HOST[:PORT] too; other schemes are left to gRPC."""
    m = _GRPC_SCHEMES.fullmatch(value)
    if m is None:
        parse_hostport(value, key, allow_port_zero=False, require_host=True)
        return
    if m.group("scheme") == "dns":
        endpoint = m.group("rest").removeprefix("//").partition("/")[2] if m.group("rest").startswith("//") else m.group("rest")
        if not endpoint:
            raise ConfigError(f"{key}: no host in gRPC target {value!r}")
        if ":" in endpoint.replace("[", "").replace("]", "") or endpoint.startswith("["):
            parse_hostport(endpoint, key, allow_port_zero=False, require_host=True)


def check_agent_values(cfg: Any) -> None:
    """Ranges of the agent's settings (AgentConfig.__post_init__ calls this). Raises ConfigError naming the key."""
    check_grpc_target(cfg.server, "server")
    if cfg.metrics_listen:
        parse_hostport(cfg.metrics_listen, "metrics_listen")
    for name in ("interval_seconds", "spool_max_age_seconds", "stream_max_age_seconds", "backoff_initial_seconds",
                 "backoff_max_seconds"):
        if not 0 < getattr(cfg, name) <= MAX_SECONDS:
            raise ConfigError(f"{name}: expected a positive number up to {MAX_SECONDS:.0f}, got {getattr(cfg, name)}")
    for name in ("smaps_budget_seconds", "shutdown_flush_seconds"):
        if not 0 <= getattr(cfg, name) <= MAX_SECONDS:
            raise ConfigError(f"{name}: expected 0 to {MAX_SECONDS:.0f} seconds, got {getattr(cfg, name)}")
    if not MIN_GUEST_RAM_MIN_BYTES <= cfg.guest_ram_min_bytes <= 2**63 - 1:
        raise ConfigError(f"guest_ram_min_bytes: expected at least {MIN_GUEST_RAM_MIN_BYTES} (2 MiB), got {cfg.guest_ram_min_bytes}")
    # gRPC channel arguments are C ints.
    if not 0 < cfg.max_message_bytes <= 2**31 - 1:
        raise ConfigError(f"max_message_bytes: expected 1 to 2147483647, got {cfg.max_message_bytes}")
    for name in ("spool_max_bytes", "batch_max_reports"):
        if not 0 < getattr(cfg, name) <= 2**63 - 1:
            raise ConfigError(f"{name}: expected a positive integer, got {getattr(cfg, name)}")
