"""The documented example configuration files load, and the reference documents every key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eptwatch.agent.faces.config import load_config
from eptwatch.agent.faces.daemon import AgentConfig
from eptwatch.agent.model.predicate import Era, era_for, load_era_overrides
from eptwatch.server.app import ServerConfig
from eptwatch.server.ingest.auth import TokenTable

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "deploy" / "examples"
DOC = (REPO / "docs" / "configuration.md").read_text()


def test_agent_example_loads() -> None:
    cfg = load_config(AgentConfig, EXAMPLES / "agent.yaml")
    assert cfg.load_balancing == "round_robin" and cfg.labels == {"cluster": "prod-a"} and cfg.procfs == "/host/proc"


def test_server_example_loads_and_env_overrides_secret_paths() -> None:
    cfg = load_config(ServerConfig, EXAMPLES / "server.yaml", env={"EPTWATCH_TLS_KEY": "/run/secrets/key"},
                      secret_paths=("tokens_file", "tls_cert", "tls_key", "tls_client_ca"))
    assert cfg.rollup_labels == ("cluster", "zone") and cfg.tls_key == "/run/secrets/key"


def test_tokens_and_era_examples_load() -> None:
    table = TokenTable.from_file(EXAMPLES / "tokens.yaml")
    assert len(table) == 2
    overrides = load_era_overrides((EXAMPLES / "era-overrides.yaml").read_text(), "era-overrides.yaml")
    assert era_for("4.18.0-305.el8.x86_64", "x86_64", overrides).era is Era.COMPOUND_MAP_FIXED


def test_every_key_is_documented() -> None:
    for cls in (AgentConfig, ServerConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in DOC, f"{cls.__name__}.{f.name} missing from docs/configuration.md"
