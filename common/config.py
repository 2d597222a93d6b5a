"""Typed configuration files and start-up checks shared by agent and aggregator.

Precedence, lowest first: the dataclass defaults, the YAML file, environment variables for paths to
secrets (EPTWATCH_<FIELD>, so a Secret can be mounted anywhere without editing the file), command-line
flags. Unknown keys are errors; every error names the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import ssl
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value, file or start-up resource is wrong. The message names the file, key or
    address and what was expected; the CLIs print it as one line (`<prog>: error: <message>`), exit 2."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a YAML "\\ud800" escape: no report, path or log line can carry it
                raise ConfigError(f"{where}: not encodable as UTF-8: {value[:80]!r}") from None
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_check(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_check(k, str, f"{where} key"): _check(v, str, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover - schema bug


E = TypeVar("E", bound=Exception)


def safe_load_yaml(text: str, name: str, error: Callable[[str], E]) -> Any:
    """yaml.safe_load, with every way a hostile file makes it fail raised as `error` naming `name`:
    besides YAMLError, nesting deeper than the recursion limit (RecursionError) and an integer longer
    than Python converts (ValueError: "Exceeds the limit (4300 digits)")."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{name}: not valid YAML: {exc}") from None
    except RecursionError:
        raise error(f"{name}: not valid YAML: nested too deeply") from None
    except ValueError as exc:
        raise error(f"{name}: not valid YAML: {exc}") from None


def load_config(cls: type[T], path: Path | None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None, secret_paths: tuple[str, ...] = (),
                flag_names: Mapping[str, str] | None = None) -> T:
    """Build `cls` (a dataclass) from defaults, the YAML file, env overrides and flags."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
        doc = safe_load_yaml(text, str(path), ConfigError)
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        for key, value in doc.items():
            key_s = str(key)
            if key_s not in known:
                close = [k for k in sorted(known) if k.split("_")[0] == key_s.split("_")[0]]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"{path}: unknown key {key_s!r}{hint}")
            values[key_s] = _check(value, hints[key_s], f"{path}: {key_s}")
    for name in secret_paths:
        var = f"EPTWATCH_{name.upper()}"
        if env and env.get(var):
            values[name] = env[var]
    for key, value in (flags or {}).items():
        if value is not None:
            if key not in known:
                raise ConfigError(f"flag {key!r} has no configuration key")  # pragma: no cover - wiring bug
            flag = (flag_names or {}).get(key) or f"--{key.replace('_', '-')}"
            values[key] = _check(value, hints[key], flag)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def environ() -> Mapping[str, str]:
    return os.environ


def read_config_file(path: str, what: str) -> bytes:
    """A file a config key names (token, TLS material, labels, era overrides); ValueError says which."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what}: {exc.strerror}") from None


# ---------------------------------------------------------------------------------------------------
# Start-up checks shared by agent and aggregator. Each raises ConfigError naming the address, file or
# key, so both CLIs can print one line and exit 2 instead of a traceback (or, worse, starting and then
# retrying forever against a CA that can never verify anything).

_HOSTPORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+(?:%[\w.-]+)?)\]|(?P<host>[A-Za-z0-9_.-]*)):(?P<port>[0-9]{1,5})")
LOOPBACK_NAMES = ("localhost",)


def parse_hostport(value: str, key: str, *, allow_port_zero: bool = True, require_host: bool = False) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or :PORT (all interfaces) -> (host, port). Anything else is a ConfigError:
    a bare word, '::' without brackets and ports above 65535 would otherwise be read as some other port."""
    m = _HOSTPORT.fullmatch(value)
    if m is None:
        raise ConfigError(f"{key}: expected HOST:PORT (IPv6 as [ADDR]:PORT), got {value!r}")
    port = int(m.group("port"))
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ConfigError(f"{key}: port {port} out of range (1-65535) in {value!r}")
    host = m.group("v6") if m.group("v6") is not None else m.group("host")
    if m.group("v6") is not None:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ConfigError(f"{key}: {host!r} is not an IPv6 address in {value!r}") from None
    if require_host and not host:
        raise ConfigError(f"{key}: expected HOST:PORT with a host, got {value!r}")
    return host, port


def is_loopback_host(host: str) -> bool:
    """True when `host` can only be reached from this machine ('' means every interface: not loopback)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_port_free(address: str, key: str, *, reuse_port: bool = False) -> None:
    """Fail with the address named if nothing could bind it. gRPC's own failure is a RuntimeError plus
    C-core lines on stderr; checking first gives one clear line. `reuse_port` mirrors a server that
    sets SO_REUSEPORT (several aggregators on one port), so that case still passes."""
    host, port = parse_hostport(address, key)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"{key}: cannot resolve {address!r}: {exc}") from None
    errors: list[str] = []
    for family, kind, proto, _canon, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind(sockaddr)
                return  # gRPC, like us, is content with one of the resolved addresses
            except OSError as exc:
                errors.append(exc.strerror or str(exc))
    raise ConfigError(f"{key}: cannot listen on {address}: {'; '.join(dict.fromkeys(errors)) or 'no address'}")


def check_state_dir(path: str, key: str) -> None:
    """A directory we can create files in (created if missing), not a file or a read-only place."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {path} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create directory {path}: {exc.strerror}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: directory {path} is not writable")


def check_file_parent(path: str, key: str) -> None:
    """A file (SQLite database) whose directory exists or can be made writable, and which is no directory."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{key}: {path} is a directory, expected a file")
    check_state_dir(str(p.parent), f"{key}: {path}")


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key; gRPC cannot use one.
    raise ConfigError("encrypted private keys are not supported")


def _check_pem_cert(path: str, what: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=path)
    except OSError as exc:  # ssl.SSLError is an OSError too: read errors first
        if isinstance(exc, ssl.SSLError):
            raise ConfigError(f"{path}: {what} holds no valid PEM certificate ({exc.reason or exc})") from None
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None


def check_tls_files(cert: str | None, key: str | None, ca: str | None, *, server: bool) -> None:
    """Load the TLS material the way it will be used, at start: a missing, garbled or mismatched file is
    a ConfigError naming it rather than a handshake failure on every connection later."""
    if ca:
        _check_pem_cert(ca, "TLS CA")
    if cert:
        _check_pem_cert(cert, "TLS certificate")
    if cert and key:
        try:
            Path(key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read TLS private key: {exc.strerror}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_cert_chain(cert, key, password=_no_password)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(f"{key}: TLS private key does not match the certificate {cert}") from None
            raise ConfigError(f"{key}: TLS private key is not a valid PEM private key") from None
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read TLS private key: {exc.strerror}") from None


# Upper bound of every duration setting: a year. Beyond it a number is a typo, and timers would overflow.
MAX_SECONDS = 365 * 86400.0


def error_line(prog: str, exc: BaseException | str) -> str:
    """`<prog>: error: <message>` on one line (YAML parser messages span several)."""
    message = _NEWLINES.sub("; ", str(exc).strip())
    return f"{prog}: error: {message}"


_NEWLINES = re.compile(r"\s*\n\s*")
