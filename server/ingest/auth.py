"""Agent authentication: bearer tokens scoped to host ids, and TLS material.

The tokens file holds SHA-256 digests, not tokens, so the aggregator's configuration is no secret:

    tokens:
      - name: rack-a             # what logs and metrics show instead of the token
        sha256: 3f0c...          # hex SHA-256 of the bearer token (eptwatch-server hash-token)
        hosts: ["hv-a-*"]        # fnmatch patterns of host ids this token may report for

Tokens travel as `authorization: Bearer <token>` call metadata. No log line carries a token or key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

# One error type for every configuration problem, agent and aggregator alike (re-exported here).
from eptwatch.common.config import ConfigError, safe_load_yaml

__all__ = ["ConfigError", "Principal", "TlsFiles", "TokenTable", "hash_token"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Principal:
    name: str
    host_patterns: tuple[str, ...]

    def may_report_for(self, host_id: str) -> bool:
        return any(fnmatch.fnmatchcase(host_id, p) for p in self.host_patterns)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    def __init__(self, entries: dict[str, Principal]) -> None:
        self._by_digest = entries

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def from_yaml(cls, text: str, name: str) -> TokenTable:
        doc = safe_load_yaml(text, name, ConfigError)
        if not isinstance(doc, dict) or set(doc) != {"tokens"} or not isinstance(doc["tokens"], list):
            raise ConfigError(f"{name}: expected a mapping with the single key 'tokens' holding a list")
        if not doc["tokens"]:
            # An empty table is not "no auth": it would refuse every agent while looking configured.
            raise ConfigError(f"{name}: tokens: expected at least one token (for no authentication say insecure_no_auth)")
        entries: dict[str, Principal] = {}
        names: set[str] = set()
        for i, e in enumerate(doc["tokens"]):
            where = f"{name}: tokens[{i}]"
            if not isinstance(e, dict):
                raise ConfigError(f"{where}: expected a mapping with keys name, sha256, hosts")
            unknown = set(e) - {"name", "sha256", "hosts"}
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
            n, digest, hosts = e.get("name"), e.get("sha256"), e.get("hosts")
            if not isinstance(n, str) or not n:
                raise ConfigError(f"{where}.name: expected a non-empty string")
            if n in names:
                raise ConfigError(f"{where}.name: {n!r} appears twice")
            if isinstance(digest, (int, float)):
                raise ConfigError(f"{where}.sha256: YAML read the digest as a number; put it in quotes")
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ConfigError(f"{where}.sha256: expected 64 lowercase hex digits (the token's SHA-256, not the token)")
            if digest in entries:
                raise ConfigError(f"{where}.sha256: the same token is listed twice")
            if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
                raise ConfigError(f"{where}.hosts: expected a non-empty list of host id patterns")
            names.add(n)
            entries[digest] = Principal(n, tuple(hosts))
        return cls(entries)

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read tokens file: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: tokens file is not UTF-8 text (invalid byte at offset {exc.start})") from None
        return cls.from_yaml(text, str(path))

    def authenticate(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Principal | None:
        for key, value in metadata or ():
            if key.lower() != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            digest = hash_token(token.strip())
            for known, principal in self._by_digest.items():
                if hmac.compare_digest(known, digest):
                    return principal
            return None
        return None


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate it signed

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        def rd(p: Path, what: str) -> bytes:
            try:
                return p.read_bytes()
            except OSError as exc:
                # The path is safe to show; the contents never are.
                raise ConfigError(f"{p}: cannot read TLS {what}: {exc.strerror}") from None

        return rd(self.cert, "certificate"), rd(self.key, "private key"), rd(self.client_ca, "client CA") if self.client_ca else None
