"""Adversarial configuration and start-up: the real console scripts, each given one bad input.

Every case must end the same way: exit status 2, exactly one line on stderr of the form
`<prog>: error: <message>` naming the address, file or key at fault, and no traceback. The processes
are the installed entry points (`eptwatch-agent`, `eptwatch-server`, `eptwatch-demo`), so the wiring
from argparse to the error line is what is tested, not a function beneath it.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from eptwatch.agent.faces.config import ConfigError, check_grpc_target, load_config, parse_hostport
from eptwatch.agent.faces.daemon import AgentConfig
from eptwatch.server.app import ServerConfig

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
# Only a guard against a process that never exits (the garbled-CA agent used to retry forever); no
# test asserts how fast anything is.
HANG_GUARD_SECONDS = 60
INSECURE = ["--insecure-plaintext", "--insecure-no-auth"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run(prog: str, *args: str, cwd: Path) -> Outcome:
    proc = subprocess.run([str(BIN / prog), *args], cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS,
                          stdin=subprocess.DEVNULL)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(out: Outcome, prog: str, *names: str) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for name in names:
        assert name in line, f"{name!r} not named in {line!r}"
    assert out.returncode == 2, (out.returncode, line)
    return line


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by a plain listening socket (no SO_REUSEPORT), as another program would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two unrelated self-signed certificates with their keys, and files that only look like PEM."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    for name in ("a", "b"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)
    # An encrypted key: OpenSSL would prompt on the terminal for its passphrase unless told not to.
    _openssl("genpkey", "-algorithm", "RSA", "-aes256", "-pass", "pass:secret", "-out", "enc.key", cwd=d)
    _openssl("req", "-x509", "-key", "enc.key", "-passin", "pass:secret", "-days", "2", "-subj", "/CN=enc", "-out", "enc.crt", cwd=d)
    (d / "garbled.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    (d / "garbled.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    (d / "empty.pem").write_text("")
    return d


def server_args(tmp_path: Path, *extra: str, insecure: bool = True) -> list[str]:
    base = ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--state", str(tmp_path / "state")]
    return [*base, *(INSECURE if insecure else []), *extra]


def agent_args(tmp_path: Path, *extra: str, server: str = "127.0.0.1:9861") -> list[str]:
    return ["run", "--server", server, "--spool", str(tmp_path / "spool.sqlite3"), "--metrics-listen", "", *extra]


# ---------------------------------------------------------------------------------------------------
# Ports in use


def test_server_grpc_port_in_use_names_the_address(tmp_path: Path, busy_port: int) -> None:
    addr = f"127.0.0.1:{busy_port}"
    out = run("eptwatch-server", *server_args(tmp_path, "--listen", addr), cwd=tmp_path)
    line = assert_one_line_error(out, "eptwatch-server", addr, "listen")
    assert "Failed to bind" not in line


def test_server_http_port_in_use_names_the_address(tmp_path: Path, busy_port: int) -> None:
    addr = f"127.0.0.1:{busy_port}"
    out = run("eptwatch-server", *server_args(tmp_path, "--http", addr), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", addr, "Address already in use")


def test_agent_metrics_port_in_use_names_the_address(tmp_path: Path, busy_port: int) -> None:
    addr = f"127.0.0.1:{busy_port}"
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", "--metrics-listen", addr), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", addr)


# ---------------------------------------------------------------------------------------------------
# State and spool locations


def test_server_state_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    out = run("eptwatch-server", *server_args(tmp_path, "--state", str(tmp_path / "afile")), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(tmp_path / "afile"), "not a directory")


def test_server_state_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    out = run("eptwatch-server", *server_args(tmp_path, "--state", str(tmp_path / "afile" / "state")), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(tmp_path / "afile"))


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes into read-only directories: the case cannot happen")
def test_server_state_not_writable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    out = run("eptwatch-server", *server_args(tmp_path, "--state", str(ro)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(ro), "not writable")


def test_server_state_that_cannot_be_created(tmp_path: Path) -> None:
    """procfs refuses new directories even to root, so this runs where the read-only case is skipped."""
    state = "/proc/eptwatch-no-such-state/state"
    out = run("eptwatch-server", *server_args(tmp_path, "--state", state), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", "state_dir", "cannot create directory")


def test_server_state_holding_a_foreign_database(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "eptwatch.sqlite3").write_bytes(b"this is not an SQLite database" * 200)
    out = run("eptwatch-server", *server_args(tmp_path), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", "state_dir", str(state))


def test_agent_spool_on_a_directory(tmp_path: Path) -> None:
    (tmp_path / "spooldir").mkdir()
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", "--spool", str(tmp_path / "spooldir")), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", "spool_path", str(tmp_path / "spooldir"))


# ---------------------------------------------------------------------------------------------------
# TLS material


@pytest.mark.parametrize("which", ["cert", "key"])
def test_server_missing_tls_file(tmp_path: Path, certs: Path, which: str) -> None:
    files = {"cert": str(certs / "a.crt"), "key": str(certs / "a.key")}
    files[which] = str(tmp_path / f"missing.{which}")
    out = run("eptwatch-server", *server_args(tmp_path, "--insecure-no-auth", "--tls-cert", files["cert"], "--tls-key", files["key"],
                                              insecure=False), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", files[which], "No such file")


@pytest.mark.parametrize(("cert", "key", "says"), [
    ("garbled.pem", "a.key", "certificate"),
    ("empty.pem", "a.key", "certificate"),
    ("a.crt", "garbled.key", "private key"),
    ("a.crt", "a.crt", "private key"),
    ("a.crt", "b.key", "does not match"),
    ("enc.crt", "enc.key", "encrypted"),
])
def test_server_garbled_or_mismatched_tls(tmp_path: Path, certs: Path, cert: str, key: str, says: str) -> None:
    out = run("eptwatch-server", *server_args(tmp_path, "--insecure-no-auth", "--tls-cert", str(certs / cert),
                                              "--tls-key", str(certs / key), insecure=False), cwd=tmp_path)
    bad = cert if says == "certificate" else key  # the key's file for every key problem
    assert_one_line_error(out, "eptwatch-server", str(certs / bad), says)


def test_server_garbled_client_ca(tmp_path: Path, certs: Path) -> None:
    out = run("eptwatch-server", *server_args(tmp_path, "--insecure-no-auth", "--tls-cert", str(certs / "a.crt"), "--tls-key",
                                              str(certs / "a.key"), "--tls-client-ca", str(certs / "garbled.pem"), insecure=False),
              cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(certs / "garbled.pem"), "CA")


@pytest.mark.parametrize("ca", ["garbled.pem", "empty.pem", "a.key"])
def test_agent_garbled_ca_refuses_to_start(tmp_path: Path, certs: Path, ca: str) -> None:
    """It used to start and retry the handshake forever."""
    out = run("eptwatch-agent", *agent_args(tmp_path, "--tls-ca", str(certs / ca)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", str(certs / ca), "TLS CA")


def test_agent_client_key_not_matching_its_certificate(tmp_path: Path, certs: Path) -> None:
    out = run("eptwatch-agent", *agent_args(tmp_path, "--tls-ca", str(certs / "a.crt"), "--tls-cert", str(certs / "a.crt"),
                                            "--tls-key", str(certs / "b.key")), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", str(certs / "b.key"), "does not match")


# ---------------------------------------------------------------------------------------------------
# Configuration files and values


def test_server_config_not_utf8(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_bytes(b"page_title: caf\xe9\n")
    out = run("eptwatch-server", *server_args(tmp_path, "--config", str(cfg)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(cfg), "UTF-8")


def test_agent_config_not_utf8(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_bytes(b"\xff\xfeserver: a:1\n")
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", "--config", str(cfg)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", str(cfg), "UTF-8")


def test_server_tokens_file_not_utf8(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_bytes(b"tokens:\n  - name: \xff\n")
    out = run("eptwatch-server", *server_args(tmp_path, "--insecure-plaintext", "--tokens-file", str(tokens), insecure=False),
              cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(tokens), "UTF-8")


def test_server_config_not_yaml_is_still_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("listen: [\n")
    out = run("eptwatch-server", *server_args(tmp_path, "--config", str(cfg)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(cfg), "not valid YAML")


@pytest.mark.parametrize(("text", "key"), [
    ("report_interval_seconds: .inf\n", "report_interval_seconds"),
    ("report_interval_seconds: .nan\n", "report_interval_seconds"),
    ("report_interval_seconds: -5\n", "report_interval_seconds"),
    ("stale_after_intervals: 1e400\n", "stale_after_intervals"),
    ("stream_idle_timeout_seconds: " + "9" * 400 + "\n", "stream_idle_timeout_seconds"),
    ("shutdown_grace_seconds: -1\n", "shutdown_grace_seconds"),
    ("max_message_bytes: 4294967296\n", "max_message_bytes"),
    ("max_concurrent_streams: -1\n", "max_concurrent_streams"),
    ("top_n_worst_hosts: -1\n", "top_n_worst_hosts"),
    ("regression_unexplained_ratio: .nan\n", "regression_unexplained_ratio"),
    ("store_commit_gather_seconds: .nan\n", "store_commit_gather_seconds"),
    ("store_commit_gather_seconds: 1e400\n", "store_commit_gather_seconds"),
    ("store_commit_gather_seconds: 2\n", "store_commit_gather_seconds"),
    ("store_commit_gather_seconds: -0.01\n", "store_commit_gather_seconds"),
    ("store_commit_gather_seconds: soon\n", "store_commit_gather_seconds"),
])
def test_server_nonsense_values(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text(text)
    out = run("eptwatch-server", *server_args(tmp_path, "--config", str(cfg)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(cfg), key)


def test_server_empty_token_list(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens: []\n")
    out = run("eptwatch-server", *server_args(tmp_path, "--insecure-plaintext", "--tokens-file", str(tokens), insecure=False),
              cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(tokens), "tokens")


@pytest.mark.parametrize(("text", "key"), [
    ("guest_ram_min_bytes: -1\n", "guest_ram_min_bytes"),
    ("guest_ram_min_bytes: 4096\n", "guest_ram_min_bytes"),
    ("smaps_budget_seconds: -0.5\n", "smaps_budget_seconds"),
    ("smaps_budget_seconds: .inf\n", "smaps_budget_seconds"),
    ("interval_seconds: .nan\n", "interval_seconds"),
    ("backoff_max_seconds: 0\n", "backoff_max_seconds"),
    ("shutdown_flush_seconds: -1\n", "shutdown_flush_seconds"),
    ("max_message_bytes: 99999999999\n", "max_message_bytes"),
])
def test_agent_nonsense_values(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", "--config", str(cfg)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", str(cfg), key)


@pytest.mark.parametrize("value", ["nowhere", "[::1]", "127.0.0.1:65536"])
def test_agent_metrics_listen_not_hostport(tmp_path: Path, value: str) -> None:
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", "--metrics-listen", value), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", "metrics_listen", value)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_agent_interval_flag_not_finite_names_the_flag(tmp_path: Path, value: str) -> None:
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", f"--interval={value}"), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", "--interval")


@pytest.mark.parametrize("server", ["nohostport", ":::", "127.0.0.1:99999", "host:0", ":9861", "[nothex]:1", "::1:9861", "dns:///",
                                    "dns:///svc:123456"])
def test_agent_server_not_hostport(tmp_path: Path, server: str) -> None:
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", server=server), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", "server", repr(server) if server != "dns:///svc:123456" else "123456")


@pytest.mark.parametrize("listen", ["0.0.0.0:0", ":0", "[::]:0", "10.1.2.3:9861"])
def test_server_insecure_flags_refuse_non_loopback(tmp_path: Path, listen: str) -> None:
    out = run("eptwatch-server", *server_args(tmp_path, "--listen", listen), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", listen, "--insecure-allow-non-loopback")


def test_demo_state_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    out = run("eptwatch-demo", "--state", str(tmp_path / "afile"), "--fixtures", str(REPO / "tests" / "fixtures"), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-demo", str(tmp_path / "afile"))


@pytest.mark.parametrize(("flag", "value"), [("--interval", "nan"), ("--interval", "0"), ("--duration", "inf"), ("--grpc-port", "70000")])
def test_demo_nonsense_flags(tmp_path: Path, flag: str, value: str) -> None:
    out = run("eptwatch-demo", "--state", str(tmp_path / "s"), "--fixtures", str(REPO / "tests" / "fixtures"), flag, value, cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-demo", flag)


# ---------------------------------------------------------------------------------------------------
# What stays accepted (so the checks above are not simply refusing everything)


def test_insecure_non_loopback_with_the_override_loads() -> None:
    cfg = load_config(ServerConfig, None, flags={"listen": "0.0.0.0:9861", "insecure_plaintext": True, "insecure_no_auth": True,
                                                 "insecure_allow_non_loopback": True})
    assert cfg.insecure_allow_non_loopback and cfg.listen == "0.0.0.0:9861"
    for listen in ("127.0.0.1:9861", "127.9.9.9:1", "[::1]:9861", "localhost:9861"):
        assert load_config(ServerConfig, None, flags={"listen": listen, "insecure_plaintext": True, "insecure_no_auth": True}).listen == listen
    with pytest.raises(ConfigError, match="insecure_no_auth is set"):
        load_config(ServerConfig, None, flags={"listen": "0.0.0.0:9861", "tls_cert": "c", "tls_key": "k", "insecure_no_auth": True})


@pytest.mark.parametrize("server", ["aggregator:9861", "[::1]:9861", "[fe80::1%eth0]:9861", "10.0.0.1:1",
                                    "dns:///eptwatch-headless.ns.svc.cluster.local:9861", "dns:///svc", "unix:/run/eptwatch.sock"])
def test_agent_server_accepted(server: str) -> None:
    check_grpc_target(server, "server")
    assert load_config(AgentConfig, None, flags={"server": server, "insecure_plaintext": True}).server == server


def test_hostport_parse() -> None:
    assert parse_hostport("[::1]:80", "k") == ("::1", 80)
    assert parse_hostport(":0", "k") == ("", 0)
    assert parse_hostport("a.b-c_d:65535", "k") == ("a.b-c_d", 65535)


def test_agent_smallest_allowed_values_load() -> None:
    cfg = load_config(AgentConfig, None, flags={"server": "a:1", "insecure_plaintext": True})
    assert dataclasses.replace(cfg, guest_ram_min_bytes=2 * 1024 * 1024, smaps_budget_seconds=0.0).guest_ram_min_bytes == 2 * 1024 * 1024


def test_server_ipv6_http_listen_serves(tmp_path: Path) -> None:
    """`--http [::1]:PORT` binds IPv6 (http.server alone would try IPv4 and fail)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"cannot bind [::1]: {exc}")
    from eptwatch.common.httpserve import HttpServer

    srv = HttpServer("[::1]:0", lambda path, query: (200, "text/plain", b"ok\n"))
    try:
        assert srv.httpd.address_family == socket.AF_INET6 and srv.port > 0
    finally:
        srv.httpd.server_close()


# ---------------------------------------------------------------------------------------------------
# --version


@pytest.mark.parametrize("prog", ["eptwatch-agent", "eptwatch-server", "eptwatch-demo"])
def test_version_matches_pyproject(tmp_path: Path, prog: str) -> None:
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out = run(prog, "--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"{prog} {expected}", out


def test_package_versions_match_pyproject() -> None:
    import eptwatch.agent
    import eptwatch.common
    import eptwatch.server

    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert eptwatch.common.__version__ == expected  # a constant in common/__init__.py: bump it with pyproject.toml
    assert eptwatch.agent.__version__ == expected
    assert eptwatch.server.__version__ == expected


@pytest.mark.parametrize("content", [b"\xff\xfe secret", b"two words", b"tab\tinside"])
def test_agent_token_file_that_cannot_be_a_header_is_refused_without_echoing_it(tmp_path: Path, content: bytes) -> None:
    token = tmp_path / "token"
    token.write_bytes(content)
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", "--token-file", str(token)), cwd=tmp_path)
    line = assert_one_line_error(out, "eptwatch-agent", str(token), "printable ASCII")
    assert "secret" not in line and "words" not in line and "inside" not in line


# ---------------------------------------------------------------------------------------------------
# Inputs found by the property fuzz (tests/test_config_parsers_fuzz.py), kept as they were found: each
# used to end in a traceback (RecursionError, "Exceeds the limit (4300 digits)") or, for a label, in an
# agent whose every report failed to encode.

DEEP_YAML = "[" * 20000 + "\n"
LONG_INT = "9" * 5000


@pytest.mark.parametrize("text", [DEEP_YAML, f"interval_seconds: {LONG_INT}\n", 'labels: {a: "\\ud800"}\n',
                                  'tls_server_name: "\\udfff"\n'])
def test_agent_config_found_by_fuzzing(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", "--config", str(cfg)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", str(cfg))


@pytest.mark.parametrize("text", [DEEP_YAML, f"report_interval_seconds: {LONG_INT}\n", 'page_title: "\\ud800"\n'])
def test_server_config_found_by_fuzzing(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text(text)
    out = run("eptwatch-server", *server_args(tmp_path, "--config", str(cfg)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(cfg))


@pytest.mark.parametrize("text", [DEEP_YAML, "tokens: " + "[" * 20000 + "\n", f"tokens: [{LONG_INT}]\n"])
def test_server_tokens_file_found_by_fuzzing(tmp_path: Path, text: str) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(text)
    out = run("eptwatch-server", *server_args(tmp_path, "--insecure-plaintext", "--tokens-file", str(tokens), insecure=False),
              cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-server", str(tokens))


@pytest.mark.parametrize(("flag", "text"), [
    ("--labels-file", 'zone="\\ud800"\n'),  # JSON's escape for a lone surrogate: no report can carry it
    ("--labels-file", 'ok="x"\nzone="a\\udc00b"\n'),
    ("--era-overrides", DEEP_YAML),
    ("--era-overrides", f"overrides: {LONG_INT}\n"),
])
def test_agent_files_found_by_fuzzing(tmp_path: Path, flag: str, text: str) -> None:
    path = tmp_path / "input"
    path.write_text(text)
    out = run("eptwatch-agent", *agent_args(tmp_path, "--insecure-plaintext", flag, str(path)), cwd=tmp_path)
    assert_one_line_error(out, "eptwatch-agent", str(path))
