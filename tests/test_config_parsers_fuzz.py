"""Property fuzz of the input files both programs read and of the QMP stream (issue 11): the agent and
aggregator configuration, the aggregator's tokens file, the era override table, the downward-API
labels file, host:port values, the JSON stream a QMP monitor sends, and the HTTP API's paths and
query parameters. Byte mutations of the shipped
examples (deploy/examples) and of a real QEMU transcript, with unbounded integers and deep nesting
spliced in. Whatever comes in, the loader returns a value that can go on the wire, or raises the
project's own error for that input (ConfigError, ParseError, QmpUnavailable); nothing else.

`make fuzz` runs these with EPTWATCH_FUZZ_EXAMPLES inputs each (tests/fuzzing.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptwatch.agent.faces.config import ConfigError, check_grpc_target, load_config, parse_hostport
from eptwatch.agent.faces.daemon import AgentConfig
from eptwatch.agent.model.predicate import era_for, load_era_overrides
from eptwatch.agent.sources.kvm_qmp import STAT_NAMES, QmpUnavailable, _Conn, parse_query_stats
from eptwatch.agent.sources.labels import parse_labels_file
from eptwatch.agent.sources.status import ParseError
from eptwatch.server.app import Aggregator, ServerConfig
from eptwatch.server.fleet.state import summarise
from eptwatch.server.ingest.auth import TokenTable, hash_token
from eptwatch.v1 import report_pb2 as pb

from .fuzzing import fuzz_settings
from .test_agent_parsers_fuzz import mutated, number_text
from .test_kvm_qmp import GREETING, REAL_REPLY

pytestmark = pytest.mark.fuzz

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
AGENT_YAML = (EXAMPLES / "agent.yaml").read_bytes()
SERVER_YAML = (EXAMPLES / "server.yaml").read_bytes()
TOKENS_YAML = (EXAMPLES / "tokens.yaml").read_bytes()
ERA_YAML = (EXAMPLES / "era-overrides.yaml").read_bytes()
# What the kubelet writes for `fieldPath: metadata.labels` (values quoted and escaped as JSON strings).
LABELS = (b'app.kubernetes.io/name="eptwatch-agent"\ncluster="prod-a"\ncontroller-revision-hash="6d9c7f8b54"\n'
          b'pod-template-generation="3"\nzone="eu-west-1b"\nnote="caf\\u00e9 \\"quoted\\""\n')
# A QMP conversation as QEMU 7.2 sends it: greeting, the capabilities reply, an event, the stats.
QMP_STREAM = b"".join(json.dumps(m).encode() + b"\r\n" for m in (
    GREETING, {"return": {}, "id": "eptwatch-qmp_capabilities"},
    {"timestamp": {"seconds": 1700000000, "microseconds": 1}, "event": "RESUME"},
    {"return": REAL_REPLY, "id": "eptwatch-query-stats"}))

# What a YAML or JSON reader is handed to make it recurse or build huge numbers.
_hostile_splices = st.one_of(
    st.integers(1, 3_000).map(lambda n: "[" * n),  # the recursion limit is passed near 1,000
    st.integers(1, 1_500).map(lambda n: "{a: " * n),
    st.integers(1, 3_000).map(lambda n: "[" * n + "]" * n),
    number_text,
    st.sampled_from(['"\\ud800"', '"\\udfff x"', "!!python/object:os.system", "&a [*a]", "*x", "\t", "\x00", ".inf", ".nan",
                     "-.inf", "0x" + "f" * 30, "1e400", "~", "<<: {}", "? [a]\n: b", "2024-01-01", "0o777", "---\n---"]),
)


@st.composite
def hostile(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` mutated (tests/test_agent_parsers_fuzz.py) and, half the time, one hostile splice."""
    data = bytearray(draw(mutated(seed)))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(_hostile_splices).encode("utf-8", "surrogatepass")
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzzcfg") / "input.yaml"


def _encodable(value: Any) -> None:
    """Every string a loaded configuration holds can be encoded (a report, a path, a log line)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, (tuple, list)):
        for v in value:
            _encodable(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _encodable(k)
            _encodable(v)


@fuzz_settings(200)
@given(st.one_of(hostile(AGENT_YAML), hostile(SERVER_YAML)))
def test_agent_and_server_config_files(scratch: Path, raw: bytes) -> None:
    scratch.write_bytes(raw)
    for cls in (AgentConfig, ServerConfig):
        try:
            cfg = load_config(cls, scratch, env={})  # type: ignore[type-var]
        except ConfigError as exc:
            assert str(scratch) in str(exc) or "flag" not in str(exc)
            continue
        for value in vars(cfg).values():
            _encodable(value)
        if cls is AgentConfig:
            pb.HostReport(labels=cfg.labels).SerializeToString()  # type: ignore[attr-defined]


@fuzz_settings(300)
@given(hostile(TOKENS_YAML), st.text(max_size=40))
def test_tokens_file(scratch: Path, raw: bytes, token: str) -> None:
    scratch.write_bytes(raw)
    try:
        table = TokenTable.from_file(scratch)
    except ConfigError as exc:
        assert str(scratch) in str(exc)
        return
    assert len(table) >= 1
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        principal = table.authenticate(metadata)
    except UnicodeEncodeError:  # gRPC metadata is ASCII; a lone surrogate cannot arrive on the wire
        assert not token.isascii()
        return
    if principal is not None:  # only the token whose digest is listed gets in
        assert principal.name and hash_token(token.strip()) in table._by_digest


@fuzz_settings(300)
@given(hostile(ERA_YAML), st.sampled_from(["4.18.0-513.el8.x86_64", "4.15.0-213-generic", "6.6.0", "5.3.0", "x"]))
def test_era_override_file(raw: bytes, release: str) -> None:
    try:
        overrides = load_era_overrides(raw.decode("utf-8", "replace"), "era.yaml")
    except ParseError as exc:
        assert str(exc).startswith("era.yaml")
        return
    era_for(release, "x86_64", overrides)


@fuzz_settings(300)
@given(hostile(LABELS))
def test_labels_file(raw: bytes) -> None:
    try:
        labels = parse_labels_file(raw.decode("utf-8", "replace"), "labels")
    except ParseError as exc:
        assert str(exc).startswith("labels")
        return
    pb.HostReport(labels=labels).SerializeToString()  # every label can go on the wire


@fuzz_settings(300)
@given(st.one_of(st.text(max_size=60), number_text, st.tuples(st.sampled_from(["", "a", "[::1]", "dns:///svc", "unix:/x", "host"]),
                                                               number_text).map(":".join)))
def test_hostport_and_grpc_targets(value: str) -> None:
    try:
        host, port = parse_hostport(value, "listen")
    except ConfigError as exc:
        assert "listen" in str(exc)
    else:
        assert 0 <= port <= 65535 and isinstance(host, str)
    try:
        check_grpc_target(value, "server")
    except ConfigError as exc:
        assert "server" in str(exc)


class _Replay:
    """A socket that hands out `chunks`, then end of stream; what _Conn needs of one."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def settimeout(self, _seconds: float) -> None:
        pass

    def recv(self, _size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


@fuzz_settings(300)
@given(hostile(QMP_STREAM), st.lists(st.integers(1, 400), max_size=6))
def test_qmp_stream(raw: bytes, cuts: list[int]) -> None:
    """A monitor's byte stream, cut into arbitrary recv() chunks: every message read is a JSON object,
    and the conversation ends in QmpUnavailable (closed, not QMP, unreadable); query-stats replies
    parse or raise ParseError."""
    chunks, rest = [], raw
    for n in cuts:
        chunks.append(rest[:n])
        rest = rest[n:]
    chunks.append(rest)
    conn = _Conn(_Replay([c for c in chunks if c]), "fuzz")  # type: ignore[arg-type]
    with pytest.raises(QmpUnavailable):
        for _ in range(len(raw) + 1):  # each read consumes bytes or raises: this ends
            msg = conn.read_msg(time.monotonic() + 60, "busy")
            assert isinstance(msg, dict)
            if "return" in msg:
                try:
                    got = parse_query_stats(msg, "fuzz")
                except ParseError:
                    continue
                assert set(got) == set(STAT_NAMES)
                assert all(v is None or 0 <= v < 2**64 for v in got.values())


# --- the HTTP API's paths and query parameters -----------------------------------------------------

@pytest.fixture(scope="module")
def aggregator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aggregator]:
    """An in-process aggregator (not started: http_routes needs only its fleet view and store) holding
    two hosts, one of them from an absurd report."""
    from .test_adversarial_http import absurd, report

    d = tmp_path_factory.mktemp("fuzzhttp")
    agg = Aggregator(ServerConfig(state_dir=str(d), insecure_plaintext=True, insecure_no_auth=True, listen="127.0.0.1:0",
                                  http="127.0.0.1:0"))
    for r in (report("hv-good"), absurd("hv-absurd")):
        agg.fleet.put(summarise(r, time.time()))
    yield agg
    agg.store.close()


_param_names = st.sampled_from(["limit", "offset", "kernel", "label", "status", "cause", "era", "verdict", "x", ""])
_param_values = st.one_of(number_text, st.text(max_size=40), st.sampled_from(["-1", "4294967296", "all", "invalid", "fresh",
                                                                             "cluster=prod-a", "=", "zone", "%00", "\x00"]))


@fuzz_settings(300)
@given(st.sampled_from(["/", "/api/v1/fleet", "/api/v1/kernels", "/api/v1/hosts", "/api/v1/hosts/hv-good",
                        "/api/v1/hosts/hv-absurd", "/api/v1/hosts/", "/api/v1/hostsx"]) | st.text(max_size=40).map(lambda t: "/api/v1/hosts/" + t),
       st.dictionaries(_param_names, st.lists(_param_values, min_size=1, max_size=3), max_size=4))
def test_http_paths_and_query_parameters(aggregator: Aggregator, path: str, query: dict[str, list[str]]) -> None:
    """Whatever the path and query, the API answers 200, 400 (naming the parameter) or 404, or leaves
    the path to the next router (None); it never raises, which the HTTP server would turn into a 500."""
    got = aggregator.http_routes(path, query)
    if got is None:
        return
    code, _ctype, body = got
    assert code in (200, 400, 404), (code, body[:200])
    if code != 200:
        assert json.loads(body)["error"]
