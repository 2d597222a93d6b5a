"""The aggregator's report checks (pure)."""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptwatch.server.ingest.validate import validate_report
from eptwatch.v1 import report_pb2 as pb

from .conftest import have_compiler, sampled_report_bytes
from .fuzzing import fuzz_settings

NOW = time.time()


@pytest.fixture
def report() -> pb.HostReport:
    r = pb.HostReport.FromString(sampled_report_bytes("linux-6.6-pages2m"))  # sampled once per session
    r.sequence, r.agent_instance = 1, "i"
    r.sample_time.FromNanoseconds(int(NOW * 1e9))
    return r


def test_a_real_report_is_valid(report: pb.HostReport) -> None:
    assert validate_report(report, NOW) is None


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: setattr(r, "host_id", ""), "empty host_id"),
    (lambda r: setattr(r, "host_id", "bad host"), "host_id"),
    (lambda r: setattr(r, "sequence", 0), "sequence"),
    (lambda r: r.sample_time.FromSeconds(int(NOW) + 3600), "future"),
    (lambda r: r.sample_time.FromSeconds(100), "before 2000"),
    (lambda r: setattr(r.kernel, "era", 99), "kernel.era: unknown value 99"),
    (lambda r: setattr(r.estimates[0], "cause", 77), "unknown cause 77"),
    (lambda r: setattr(r.estimates[1].breakdown[0], "cause", 78), "breakdown: unknown cause 78"),
    (lambda r: setattr(r.estimates[1], "lost_ratio", math.nan), "lost_ratio"),
    (lambda r: setattr(r.estimates[1], "lost_ratio", 1.5), "lost_ratio"),
    (lambda r: setattr(r.estimates[1], "lost_huge_2m", 5), "lost_huge_2m 5 != max(0"),
    (lambda r: setattr(r.estimates[1].breakdown[0], "lost_huge_2m", 1), "breakdown sums"),
    (lambda r: setattr(r.estimates[0], "allowed_huge_2m", 10**9), "allowed_huge_2m"),
    (lambda r: setattr(r.vms[0], "smaps_read_cost_seconds", math.nan), "smaps_read_cost_seconds"),
    (lambda r: setattr(r.vms[0], "smaps_read_cost_seconds", -1.0), "smaps_read_cost_seconds"),
    (lambda r: r.labels.update({f"k{i}": "v" for i in range(100)}), "labels"),
])
def test_impossible_values_are_named(report: pb.HostReport, mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    mutate(report)
    reason = validate_report(report, NOW)
    assert reason is not None and needle in reason
    from eptwatch.server.ingest.validate import check_report

    if validate._walk_wire is not None:  # the compiled walk leaves every refusal to Python
        wire = report.SerializeToString()
        assert check_report(report, NOW, (wire, 0, len(wire))) == reason


def test_unknown_informational_enums_follow_the_contract(report: pb.HostReport) -> None:
    """A newer agent's new smaps mode, backing, counter scope or source state is not a reason to refuse it."""
    report.vms[0].smaps_mode = 42  # type: ignore[assignment]
    report.vms[0].guest_ram[0].backing = 43  # type: ignore[assignment]
    report.vms[0].kvm.scope = 44  # type: ignore[assignment]
    report.sources[0].state = 45  # type: ignore[assignment]
    assert validate_report(report, NOW) is None


# --- the one-pass checks and totals against a plain reference ------------------------------------

def _reference(e: pb.VmEstimate) -> str | None:
    """The estimate rules written the obvious way (every presence asked of protobuf): the oracle the
    optimised single pass in server/ingest/validate.py must agree with."""
    causes = set(pb.Cause.values())
    if e.cause not in causes:
        return "cause"
    if any(s.cause not in causes for s in e.breakdown):
        return "breakdown cause"
    if e.HasField("lost_ratio") and not (0.0 <= e.lost_ratio <= 1.0):
        return "ratio range"
    if e.HasField("lost_ratio") and not e.HasField("lost_huge_2m"):
        return "ratio without lost"
    if e.HasField("host_huge_capacity_2m") and e.HasField("allowed_huge_2m") and e.allowed_huge_2m > e.host_huge_capacity_2m:
        return "allowed"
    if e.HasField("lost_huge_2m"):
        if not (e.HasField("host_huge_capacity_2m") and e.HasField("observed_huge_2m")):
            return "lost without both"
        if e.lost_huge_2m != max(0, e.host_huge_capacity_2m - e.observed_huge_2m):
            return "lost definition"
        if sum(s.lost_huge_2m for s in e.breakdown) != e.lost_huge_2m:
            return "breakdown sum"
    return None


_OPTIONAL = ("host_huge_capacity_2m", "observed_huge_2m", "allowed_huge_2m", "lost_huge_2m")


@given(st.data())
@pytest.mark.fuzz
@fuzz_settings(400)
def test_single_pass_agrees_with_the_reference(report: pb.HostReport, data: st.DataObject) -> None:
    from eptwatch.server.ingest.validate import EXPLAINED_CAUSES, check_report

    r = pb.HostReport()
    r.CopyFrom(report)
    small = st.integers(0, 4)  # small values make zeros (unset-looking) and equalities common
    # One estimate mutated, the others left valid, so that each rule is reached often.
    for e in [r.estimates[data.draw(st.integers(0, len(r.estimates) - 1))]]:
        for name in _OPTIONAL:
            choice = data.draw(st.sampled_from(["keep", "clear", "set"]))
            if choice == "clear":
                e.ClearField(name)
            elif choice == "set":
                setattr(e, name, data.draw(small))
        ratio = data.draw(st.sampled_from(["keep", "clear", "clear", 0.0, 0.5, 1.0, 1.5, -0.0, math.nan]))
        if ratio == "clear":
            e.ClearField("lost_ratio")
        elif ratio != "keep":
            e.lost_ratio = ratio  # type: ignore[assignment]
        if data.draw(st.booleans()):
            del e.breakdown[:]
            for _ in range(data.draw(st.integers(0, 2))):
                s = e.breakdown.add()
                s.cause = data.draw(st.sampled_from([*pb.Cause.values(), 99]))  # type: ignore[assignment]
                s.lost_huge_2m = data.draw(small)
        if data.draw(st.integers(0, 9)) == 0:
            e.cause = 98  # type: ignore[assignment]
    expected = next((reason for reason in map(_reference, r.estimates) if reason), None)
    got = check_report(r, NOW)
    if validate._walk_wire is not None:  # the compiled walk over the same report's bytes agrees
        wire = r.SerializeToString()
        assert check_report(r, NOW, (wire, 0, len(wire))) == got
    assert isinstance(got, str) == (expected is not None), (expected, got)
    if isinstance(got, str):
        return
    valid = [e for e in r.estimates if e.HasField("lost_huge_2m")]
    assert got.vms == len(r.estimates)
    assert got.capacity_2m == sum(e.host_huge_capacity_2m for e in valid)
    assert got.observed_2m == sum(e.observed_huge_2m for e in valid)
    assert got.lost_2m == sum(e.lost_huge_2m for e in valid)
    assert got.lost_explained_2m == sum(s.lost_huge_2m for e in valid for s in e.breakdown if s.cause in EXPLAINED_CAUSES)
    assert got.lost_unexplained_2m == sum(s.lost_huge_2m for e in valid for s in e.breakdown if s.cause == pb.CAUSE_UNEXPLAINED)
    assert dict(got.causes) == dict(Counter(int(e.cause) for e in r.estimates))


# --- the compiled walk (server/ingest/_reportscan.c) against the Python one ------------------------------

from unittest import mock  # noqa: E402

from eptwatch.agent.uplink.delivery import varint as _varint  # noqa: E402
from eptwatch.server.ingest import validate  # noqa: E402

needs_walker = pytest.mark.skipif(validate._walk_wire is None, reason="eptwatch.server.ingest._reportscan is not built here")


def _python_walk(r: pb.HostReport) -> object:
    with mock.patch.object(validate, "_walk_wire", None):
        return validate.check_report(r, NOW)


def _compiled(data: bytes, start: int = 0, end: int | None = None) -> object:
    assert validate._walk_wire is not None
    return validate._walk_wire(data, start, len(data) if end is None else end, *validate._WALK_ARGS)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _sub(field: int, body: bytes) -> bytes:
    return _key(field, 2) + _varint(len(body)) + body


@needs_walker
def test_compiled_walk_matches_on_a_real_report(report: pb.HostReport) -> None:
    data = report.SerializeToString()
    walked = _compiled(data)
    assert walked is not None and validate.ReportTotals._make(walked) == _python_walk(report)
    # A span inside a larger buffer (the ingest path passes the whole message and the report's span).
    framed = b"\x00" * 7 + data + b"\xff" * 5
    assert _compiled(framed, 7, 7 + len(data)) == walked
    with pytest.raises(ValueError):
        _compiled(data, 0, len(data) + 1)


@needs_walker
@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.data())
def test_compiled_walk_on_wire_variants(report: pb.HostReport, data: st.DataObject) -> None:
    """Encodings a protobuf runtime accepts but a plain serializer never writes: appended fields
    (a repeated scalar's last value wins, a repeated singular message merges), unknown fields, wrong
    wire types (the runtime keeps those as unknown fields), 10-byte varints and enum values past
    int32. Whatever the bytes, the compiled walk gives the Python walk's answer for the message the
    runtime parsed, or None (decide in Python); it never crashes."""
    base = report.SerializeToString()
    estimate = report.estimates[data.draw(st.integers(0, len(report.estimates) - 1))].SerializeToString()
    value = data.draw(st.sampled_from([0, 1, 2, 7, 99, 2**31 + 7, 2**32 + 1, 2**63, 2**64 - 1]))
    field = data.draw(st.integers(1, 13))
    wire_type = data.draw(st.sampled_from([0, 1, 2, 5]))
    payload = {0: _varint(value), 1: value.to_bytes(8, "little"), 2: _varint(3) + b"abc", 5: (value & 0xFFFFFFFF).to_bytes(4, "little")}[wire_type]
    extra = data.draw(st.sampled_from([
        _key(field, wire_type) + payload,  # at the report level
        _sub(10, estimate + _key(field, wire_type) + payload),  # an extra estimate with one more field
        _sub(10, estimate + _sub(8, _key(data.draw(st.integers(1, 3)), wire_type) + payload)),  # ... or breakdown share
        _sub(12, _key(field, wire_type) + payload),  # a host-level estimate
        _sub(12, b"") + _sub(12, b""),  # twice: merged by the runtime
        _sub(12, estimate) + _sub(12, _key(field, wire_type) + payload),
        _sub(9, _key(9, 1) + data.draw(st.sampled_from([b"\x00" * 8, b"\x00" * 7 + b"\x80", b"\x00" * 6 + b"\xf0\x7f"]))),  # VM cost: 0, -0, inf
    ]))
    _agrees(base + extra)


def _agrees(wire: bytes) -> None:
    walked = _compiled(wire)  # must not crash, whatever the bytes
    try:
        parsed = pb.HostReport.FromString(wire)
    except Exception:  # noqa: BLE001 - the runtime refuses it: nothing reaches check_report
        return
    if walked is not None:  # an answer, not "decide in Python": it must be the Python walk's
        assert validate.ReportTotals._make(walked) == validate.estimate_totals(parsed)
        assert all(0.0 <= vm.smaps_read_cost_seconds < math.inf for vm in parsed.vms)
    assert validate.check_report(parsed, NOW, (wire, 0, len(wire))) == _python_walk(parsed)


@needs_walker
@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.data())
def test_compiled_walk_survives_mutated_bytes(report: pb.HostReport, data: st.DataObject) -> None:
    wire = bytearray(report.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        kind = data.draw(st.sampled_from(["replace", "delete", "truncate"]))
        if kind == "replace":
            wire[pos] = data.draw(st.integers(0, 255))
        elif kind == "delete":
            del wire[pos]
        else:
            del wire[pos:]
        if not wire:
            return
    _agrees(bytes(wire))


def test_compiled_extensions_are_built_where_a_compiler_is() -> None:
    """Both C extensions are optional so that a build without a compiler still works; where one is
    (this test machine, the Docker build stage) a silent fallback would be a packaging bug."""
    from eptwatch.agent.sources import smaps

    if not have_compiler():
        pytest.skip("no C compiler or no Python.h: the regex scanner and the Python walk are expected here")
    assert (smaps.SCANNER, validate.WALKER) == ("c", "c"), "agent/sources/_smapscan.c or server/ingest/_reportscan.c was not built"


# --- the compiled report-level checks (_reportscan.check) against the Python ones ----------------------

needs_check = pytest.mark.skipif(validate._check_wire is None or validate._walk_wire is None,
                                 reason="eptwatch.server.ingest._reportscan.check is not built here")


def _header_variants() -> list[tuple[str, object]]:
    """(name, mutation of a valid report) at and just past every report-level bound, and in the
    encodings the compiled check must leave to Python (a singular field sent twice, a wrong wire type)."""
    now = time.time()
    out: list[tuple[str, object]] = []
    for host in ["a", "A" * 253, "A" * 254, "h-1.b_c:d", "-h", ".h", "h h", "hé", "h\x00"]:
        out.append((f"host_id={host[:12]!r}x{len(host)}", lambda r, h=host: setattr(r, "host_id", h)))
    for inst in ["", "i", "x" * 64, "x" * 65, "é" * 64, "é" * 65, "€" * 64, "😀" * 65]:
        out.append((f"agent_instance={inst[:3]!r}x{len(inst)}", lambda r, i=inst: setattr(r, "agent_instance", i)))
    for seq in [0, 1, 2**63 - 1, 2**63, 2**64 - 1]:
        out.append((f"sequence={seq}", lambda r, s=seq: setattr(r, "sequence", s)))
    for t in [now + 299, now + 301, 946684800.0, 946684799.0, 0.0, -5.5]:
        out.append((f"sample_time={t}", lambda r, t=t: r.sample_time.FromNanoseconds(int(t * 1e9))))
    out.append(("sample_time 2^40 s", lambda r: setattr(r.sample_time, "seconds", 2**40)))  # beyond Timestamp's range
    out.append(("sample_time -2^62 s", lambda r: setattr(r.sample_time, "seconds", -2**62)))
    out.append(("sample_time negative nanos", lambda r: setattr(r.sample_time, "nanos", -1)))
    out.append(("sample_time absent", lambda r: r.ClearField("sample_time")))
    out.append(("sample_time empty", lambda r: (r.ClearField("sample_time"), r.sample_time.SetInParent())))
    for n in [0, 64, 65]:
        out.append((f"{n} labels", lambda r, n=n: (r.labels.clear(), r.labels.update({f"k{i}": "v" for i in range(n)}))))
    for k, v in [("k" * 256, "v"), ("k" * 257, "v"), ("k", "v" * 256), ("k", "v" * 257), ("é" * 256, "€" * 256),
                 ("é" * 257, "v"), ("k", "😀" * 257), ("", "v")]:
        out.append((f"label {len(k)}:{len(v)}", lambda r, k=k, v=v: r.labels.update({k: v})))
    for era in [*pb.PredicateEra.values(), 99, -1]:
        out.append((f"era={era}", lambda r, e=era: setattr(r.kernel, "era", e)))
    out.append(("no kernel", lambda r: r.ClearField("kernel")))
    out.append(("4097 estimates", lambda r: [r.estimates.add(vm_id=f"x{i}", cause=pb.CAUSE_IMPLAUSIBLE) for i in range(4097 - len(r.estimates))]))
    return out


@needs_check
@pytest.mark.parametrize("name, mutate", _header_variants(), ids=[n for n, _ in _header_variants()])
def test_compiled_report_checks_agree_with_python(report: pb.HostReport, name: str, mutate) -> None:  # type: ignore[no-untyped-def]
    """The compiled report-level checks answer a valid report with its totals and leave every other
    one to Python (None): check_report's answer with them is the Python one, reason or totals."""
    mutate(report)
    wire = report.SerializeToString()
    now = time.time()
    with mock.patch.object(validate, "_walk_wire", None):
        python = validate.check_report(report, now)
    fast = validate._check_wire(wire, 0, len(wire), now, *validate._CHECK_ARGS)
    assert validate.check_report(report, now, (wire, 0, len(wire))) == python
    if isinstance(python, str):
        assert fast is None, python
    else:
        assert fast is not None and validate.ReportTotals._make(fast) == python


@needs_check
@pytest.mark.parametrize("extra", [
    _sub(1, b"other-host"),  # host_id sent twice: the last one counts (not modelled: Python decides)
    _sub(4, b"j"),  # agent_instance twice
    _key(5, 0) + _varint(7),  # sequence twice
    _sub(6, b"\x08\x01"),  # sample_time twice: the messages merge
    _sub(7, b"\x20\x01"),  # kernel twice
    _key(1, 0) + _varint(1),  # host_id with a varint's wire type: an unknown field to protobuf
    _key(5, 2) + _varint(1) + b"x",  # sequence with a length's wire type
])
def test_encodings_the_compiled_checks_do_not_model_are_left_to_python(report: pb.HostReport, extra: bytes) -> None:
    wire = report.SerializeToString() + extra
    parsed = pb.HostReport.FromString(wire)
    now = time.time()
    assert validate._check_wire(wire, 0, len(wire), now, *validate._CHECK_ARGS) is None
    with mock.patch.object(validate, "_walk_wire", None):
        python = validate.check_report(parsed, now)
    assert validate.check_report(parsed, now, (wire, 0, len(wire))) == python


@needs_check
@pytest.mark.parametrize("labels, repeats", [(1, 2), (64, 2), (63, 2), (3, 70)])
def test_a_label_key_sent_again_is_counted_as_sent_and_python_agrees(report: pb.HostReport, labels: int, repeats: int) -> None:
    """Map entries with a key sent again (the last value counts): the compiled check counts entries as
    sent, which is stricter than counting keys; past the bound it leaves the report to Python."""
    report.labels.clear()
    report.labels.update({f"k{i}": "v" for i in range(labels)})
    extra = _sub(2, b"\x0a\x02k0\x12\x01w") * repeats  # k0 again, another value
    wire = report.SerializeToString() + extra
    parsed = pb.HostReport.FromString(wire)
    assert len(parsed.labels) == labels and parsed.labels["k0"] == "w"
    now = time.time()
    fast = validate._check_wire(wire, 0, len(wire), now, *validate._CHECK_ARGS)
    assert (fast is None) == (labels + repeats > validate.MAX_LABELS)
    with mock.patch.object(validate, "_walk_wire", None):
        python = validate.check_report(parsed, now)
    assert validate.check_report(parsed, now, (wire, 0, len(wire))) == python
    with mock.patch.object(validate, "_walk_wire", None):
        python = validate.check_report(parsed, now)
    assert validate.check_report(parsed, now, (wire, 0, len(wire))) == python


@needs_check
def test_a_valid_report_is_checked_in_one_compiled_call(report: pb.HostReport) -> None:
    """The point of the compiled checks: a valid report costs no protobuf field access in check_report."""
    wire = report.SerializeToString()

    class _NoFields:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"check_report read {name} from protobuf")

    got = validate.check_report(_NoFields(), time.time(), (wire, 0, len(wire)))  # type: ignore[arg-type]
    assert got == validate.check_report(report, time.time())
