"""The fixtures hold only what a real kernel could have printed (issue 12).

Hand-written smaps once named a memfd "memfd:NAME" where every kernel prints "/memfd:NAME (deleted)",
so the tests never saw the real form and a real memfd-backed VM was misread. Every mapping name in every
fixture's smaps and maps must pass guest_ram.unreal_mapping_name(), and the captured real text
(tests/fixtures/captured/, from capture_real.py) must be what make_fixtures.py builds from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eptwatch.agent.sources.guest_ram import unreal_mapping_name

from .conftest import FIXTURES, fixture_roots

CAPTURED = FIXTURES / "captured"
_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ [-r][-w][-x][ps] [0-9a-f]+ [0-9a-f]+:[0-9a-f]+ \d+(?: +(.*))?$")


def mapping_names(text: str) -> list[str]:
    """The pathname field of every VMA header line of a smaps or maps text."""
    names = []
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            names.append((m.group(1) or "").rstrip())
    return names


def _files() -> list[Path]:
    out = [p for root in fixture_roots() for p in sorted(root.glob("proc/*/smaps")) + sorted(root.glob("proc/*/maps"))]
    return out + sorted(CAPTURED.glob("*.smaps"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_fixture_mapping_name_could_come_from_a_real_kernel(path: Path) -> None:
    names = mapping_names(path.read_text())
    assert names, f"{path}: no VMA header lines"
    bad = {n: why for n in names if (why := unreal_mapping_name(n)) is not None}
    assert not bad, f"{path}: {bad}"


def test_the_check_catches_the_hand_written_memfd_form(tmp_path: Path) -> None:
    # The very line the fixtures used to carry: it must fail the test above.
    text = "7f5000000000-7f5100000000 rw-s 00000000 00:01 1025                       memfd:pc.ram (deleted)\nSize: 4 kB\n"
    (name,) = mapping_names(text)
    assert name == "memfd:pc.ram (deleted)"
    assert unreal_mapping_name(name) is not None


def test_fixtures_carry_the_captured_memfd_name() -> None:
    captured = mapping_names((CAPTURED / "memfd.smaps").read_text())
    assert captured == ["/memfd:memory-backend-memfd (deleted)"]
    memfd_fixture_names = {n for root in fixture_roots() for p in root.glob("proc/*/smaps")
                           for n in mapping_names(p.read_text()) if "memfd:" in n}
    assert memfd_fixture_names == set(captured)


@pytest.mark.parametrize("meta", sorted(CAPTURED.glob("*.json")), ids=lambda p: p.stem)
def test_captured_cases_are_complete(meta: Path) -> None:
    """Each captured case has its smaps block and says where it came from and what was compared."""
    doc = json.loads(meta.read_text())
    assert doc["case"] == meta.stem and doc["kernel_release"] and doc["qemu_memory"]
    assert {"pages_4k", "pages_2m"} <= set(doc["kvm_counters"])
    block = (CAPTURED / f"{meta.stem}.smaps").read_text()
    assert len(mapping_names(block)) == 1 and "VmFlags:" in block


def test_fixture_from_captures_gives_what_the_real_vms_gave() -> None:
    """linux-6.18-backends is the captured real text: the agent must conclude on it what it concluded on
    the real VMs (the e2e test compared that with the kernel's own numbers)."""
    from eptwatch.agent.model.sampler import Sampler
    from eptwatch.agent.sources.hostroot import HostRoot

    root = FIXTURES / "linux-6.18-backends"
    sample = Sampler(HostRoot.from_root(root)).sample()
    got = {vs.vm.identity.name: (vs.mappings[0].backing.value, e.host_huge_capacity_2m, e.observed_huge_2m, e.cause.value)
           for vs, e in zip(sample.vms, sample.estimates)}
    want = {}
    for case in ("ram-thp", "ram-shared", "memfd", "memfd-hugetlb-2m", "tmpfs-always", "tmpfs-never", "hugetlbfs-2m",
                 "hugetlbfs-1g", "file-ext4", "mem-path-tmpfs"):
        doc = json.loads((CAPTURED / f"{case}.json").read_text())
        want[f"real-{case}"] = (doc["backing"], doc["capacity_2m"], doc["observed_2m"], doc["cause"])
    assert got == want
