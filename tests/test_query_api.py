"""The aggregator's read side on a real process: HTTP JSON API, gRPC Query, /metrics rollups."""

from __future__ import annotations

import json
import re
import time
import urllib.error
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from eptwatch.server.simulate import SimulatedFleet, load_templates
from eptwatch.v1 import query_pb2, query_pb2_grpc

from .conftest import FIXTURES
from .fleetfeed import feed
from .procs import Aggregator, http_get

MIX = {"linux-6.6-pages2m": 1, "linux-5.10-hostwalk": 1, "linux-5.3-unfixed": 1, "linux-5.4-fixed": 1}


@pytest.fixture(scope="module")
def fleet() -> SimulatedFleet:
    return SimulatedFleet(load_templates(FIXTURES, list(MIX)), 16, mix=MIX)


@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory, fleet: SimulatedFleet):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("agg")
    (d / "server.yaml").write_text("rollup_labels: [zone, cluster]\ntop_n_worst_hosts: 5\n")
    a = Aggregator(d, ["--insecure-plaintext", "--insecure-no-auth", "--config", str(d / "server.yaml")]).start()
    assert feed(a.target, fleet, fleet.hosts) == 16
    yield a
    a.proc.kill9()  # type: ignore[union-attr]


def get(agg: Aggregator, path: str) -> dict:  # type: ignore[type-arg]
    return json.loads(http_get(agg.http + path))  # type: ignore[no-any-return]


def status_of(agg: Aggregator, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    try:
        return 200, get(agg, path)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_fleet_and_kernel_verdicts(agg: Aggregator) -> None:
    f = get(agg, "/api/v1/fleet")
    assert f["total"]["hosts"] == "16" and f["hosts_stale"] == "0"
    verdicts = {k["kernel_release"]: k["verdict"] for k in f["kernels"]}
    assert verdicts == {"6.6.15": "KERNEL_VERDICT_REGRESSED", "5.3.0": "KERNEL_VERDICT_KNOWN_BAD",
                        "5.10.0-28-amd64": "KERNEL_VERDICT_OK", "5.4.0": "KERNEL_VERDICT_OK"}
    assert len(f["worst_hosts"]) == 5 and all(h["kernel_release"] == "5.3.0" for h in f["worst_hosts"][:4])
    assert {(x["label"], x["value"]) for x in f["labels"]} >= {("cluster", "prod-a"), ("cluster", "prod-b")}
    regressed = get(agg, "/api/v1/kernels?verdict=regressed")["kernels"]
    assert [k["kernel_release"] for k in regressed] == ["6.6.15"] and "unexplained loss" in regressed[0]["evidence"]
    assert [k["kernel_release"] for k in get(agg, "/api/v1/kernels?era=compound_map_unfixed")["kernels"]] == ["5.3.0"]


def test_host_filters_and_pagination(agg: Aggregator) -> None:
    assert get(agg, "/api/v1/hosts?kernel=5.3.0")["total"] == "4"
    assert get(agg, "/api/v1/hosts?cause=unexplained")["total"] == "4"
    prod_a = get(agg, "/api/v1/hosts?label=cluster=prod-a")
    assert prod_a["total"] == "8" and all(h["labels"]["cluster"] == "prod-a" for h in prod_a["hosts"])
    page = get(agg, "/api/v1/hosts?limit=5&offset=10")
    assert page["total"] == "16" and len(page["hosts"]) == 5 and page["hosts"][0]["host_id"] == "sim-00010"
    assert get(agg, "/api/v1/hosts?status=stale")["total"] == "0"


@pytest.mark.parametrize("path, needle", [
    ("/api/v1/kernels?verdict=bogus", "verdict"), ("/api/v1/kernels?era=ancient", "era"),
    ("/api/v1/hosts?status=maybe", "status"), ("/api/v1/hosts?label=nolabel", "label"),
    ("/api/v1/hosts?limit=-1", "limit"), ("/api/v1/hosts?limit=999999", "limit"), ("/api/v1/hosts?cause=gremlins", "cause"),
])
def test_bad_filters_are_400_naming_the_parameter(agg: Aggregator, path: str, needle: str) -> None:
    code, body = status_of(agg, path)
    assert code == 400 and needle in body["error"]


def test_host_detail_and_404(agg: Aggregator) -> None:
    d = get(agg, "/api/v1/hosts/sim-00000")
    assert d["summary"]["host_id"] == "sim-00000"
    assert d["latest_report"]["host_id"] == "sim-00000" and d["latest_report"]["vms"]  # full per-VM detail from the store
    code, body = status_of(agg, "/api/v1/hosts/nope")
    assert code == 404 and "nope" in body["error"]
    assert status_of(agg, "/api/v1/nothing")[0] == 404


def test_grpc_query_answers_like_http(agg: Aggregator) -> None:
    with grpc.insecure_channel(agg.target) as ch:
        stub = query_pb2_grpc.QueryStub(ch)
        fleet = json_format.MessageToDict(stub.GetFleet(query_pb2.GetFleetRequest()), preserving_proto_field_name=True,
                                          always_print_fields_with_no_presence=True)
        http = get(agg, "/api/v1/fleet")
        for doc in (fleet, http):
            doc.pop("generated_at")
        assert fleet == http
        hosts = stub.ListHosts(query_pb2.ListHostsRequest(kernel_release="6.6.15"))
        assert hosts.total == 4
        with pytest.raises(grpc.RpcError) as info:
            stub.ListKernels(query_pb2.ListKernelsRequest(verdict="bogus"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.GetHost(query_pb2.GetHostRequest(host_id="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_rollups_are_sums_with_bounded_labels(agg: Aggregator) -> None:
    text = http_get(agg.http + "/metrics")
    assert 'eptwatch_fleet_hosts{era="compound_map_unfixed",kernel_release="5.3.0"} 4.0' in text
    regressed = re.findall(r'^eptwatch_kernel_regressed\{era="[a-z_]+",kernel_release="6\.6\.15"\} 1\.0$', text, re.M)
    assert len(regressed) == 1
    # The verdict's comparison is an info series beside it; the verdict series carries no changing label.
    assert re.search(r'^eptwatch_kernel_comparison_info\{compared_to="5\.10\.0-28-amd64",era="[a-z_]+",'
                     r'kernel_release="6\.6\.15"\} 1\.0$', text, re.M)
    assert "compared_to" not in "".join(line for line in text.splitlines() if line.startswith("eptwatch_kernel_regressed{"))
    assert re.search(r'^eptwatch_kernel_regressed\{era="[a-z_]+",kernel_release="5\.10\.0-28-amd64"\} 0\.0$', text, re.M)
    assert 'eptwatch_kernel_known_bad_hosts{kernel_release="5.3.0"} 4.0' in text
    assert 'eptwatch_fleet_label_hosts{label="cluster",value="prod-a"} 8.0' in text
    assert "eptwatch_fleet_worst_host_lost_ratio{" in text
    assert "vm_id=" not in text  # no per-VM series on the aggregator
    assert "_ratio{kernel" not in text  # rollups are never pre-computed ratios


def test_silent_hosts_go_stale_and_leave_rollups(tmp_path: Path, fleet: SimulatedFleet) -> None:
    (tmp_path / "server.yaml").write_text("report_interval_seconds: 0.5\nstale_after_intervals: 2\n")
    a = Aggregator(tmp_path, ["--insecure-plaintext", "--insecure-no-auth", "--config", str(tmp_path / "server.yaml")]).start()
    try:
        feed(a.target, fleet, fleet.hosts[:4])
        assert get(a, "/api/v1/fleet")["total"]["hosts"] == "4"
        time.sleep(2.2)
        f = get(a, "/api/v1/fleet")
        assert f["total"]["hosts"] == "0" and f["hosts_stale"] == "4" and f["kernels"] == []
        assert get(a, "/api/v1/hosts?status=stale")["total"] == "4"
        assert "eptwatch_fleet_hosts_stale 4.0" in http_get(a.http + "/metrics")
    finally:
        a.proc.kill9()  # type: ignore[union-attr]
