"""The agent's /metrics, built from a sample: per-VM gauges, source success, delivery and spool."""

from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry

from eptwatch.agent.faces.metrics import METRICS, AgentCollector, AgentState
from eptwatch.agent.model.sampler import Sampler
from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.agent.uplink.spool import Spool

from .conftest import FIXTURES


def registry_for(fixture: str | Path, tmp_path: Path) -> tuple[CollectorRegistry, AgentState]:
    """The agent's registry after one sample of `fixture` (a fixture's name, or a host root's path)."""
    root = fixture if isinstance(fixture, Path) else FIXTURES / fixture
    state = AgentState(sample=Sampler(HostRoot.from_root(root)).sample(), sample_duration_seconds=0.01, samples_total=1,
                       spool=Spool(tmp_path / "s.db", 10**6, 3600))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(state))
    return reg, state


def copy_fixture(fixture: str, tmp_path: Path) -> Path:
    """A writable copy of a fixture host root, to break one of its files."""
    root = tmp_path / "host"
    shutil.copytree(FIXTURES / fixture, root, symlinks=True)
    return root


def test_per_vm_gauges_on_the_seed(tmp_path: Path) -> None:
    reg, _ = registry_for("linux-5.3-unfixed", tmp_path)
    vm = {"vm_id": "5b1f0c7e-2d4a-4c38-9a51-0e6a3b7c0001", "vm_name": "seed-vm", "pid": "4242"}
    assert reg.get_sample_value("eptwatch_vm_host_huge_capacity_2m", vm) == 283
    assert reg.get_sample_value("eptwatch_vm_observed_huge_2m", vm) == 12
    assert reg.get_sample_value("eptwatch_vm_lost_huge_2m", vm) == 271
    assert reg.get_sample_value("eptwatch_vm_cause", {**vm, "cause": "known_page_cache_thp_bug"}) == 1
    assert reg.get_sample_value("eptwatch_agent_source_success", {"source": "smaps", "vm_id": vm["vm_id"]}) == 1
    assert reg.get_sample_value("eptwatch_agent_spool_reports") == 0
    assert reg.get_sample_value("eptwatch_agent_samples_total") == 1


def test_unknown_is_absent_not_zero(tmp_path: Path) -> None:
    reg, _ = registry_for("debugfs-missing", tmp_path)
    vm = {"vm_id": "5b1f0c7e-2d4a-4c38-9a51-0e6a3b7c0013", "vm_name": "dark-vm", "pid": "9500"}
    assert reg.get_sample_value("eptwatch_vm_host_huge_capacity_2m", vm) == 2048
    assert reg.get_sample_value("eptwatch_vm_observed_huge_2m", vm) is None
    assert reg.get_sample_value("eptwatch_vm_lost_huge_2m", vm) is None
    assert reg.get_sample_value("eptwatch_agent_source_success", {"source": "kvm_debugfs", "vm_id": ""}) == 0


def test_every_exported_family_is_declared(tmp_path: Path) -> None:
    reg, _ = registry_for("linux-6.6-pages2m", tmp_path)
    names = {m.name + ("_total" if m.type == "counter" else "") for m in reg.collect()}
    assert names <= set(METRICS), names - set(METRICS)


def test_collector_duration_and_success(tmp_path: Path) -> None:
    reg, state = registry_for("linux-5.3-unfixed", tmp_path)
    assert state.sample is not None
    collectors = dict(state.sample.collector_seconds)
    assert {"kernel", "thp", "kvm_debugfs", "discovery", "smaps", "kvm_counters", "process"} <= set(collectors)
    for c, seconds in collectors.items():
        assert reg.get_sample_value("eptwatch_agent_collector_duration_seconds", {"collector": c}) == seconds >= 0
        assert reg.get_sample_value("eptwatch_agent_collector_success", {"collector": c}) == 1


def test_failed_collector_reports_zero(tmp_path: Path) -> None:
    root = copy_fixture("linux-5.3-unfixed", tmp_path)
    (root / "proc/4242/smaps").write_text("garbage\n")
    reg, _ = registry_for(root, tmp_path)
    assert reg.get_sample_value("eptwatch_agent_collector_success", {"collector": "smaps"}) == 0
    assert reg.get_sample_value("eptwatch_agent_collector_success", {"collector": "kernel"}) == 1


def test_a_per_vm_counter_error_is_not_blamed_on_the_global_debugfs_collector(tmp_path: Path) -> None:
    root = copy_fixture("linux-6.6-pages2m", tmp_path)
    vm_dirs = [d for d in (root / "sys/kernel/debug/kvm").iterdir() if d.is_dir()]
    assert vm_dirs
    (vm_dirs[0] / "pages_2m").write_text("not a number\n")
    reg, _ = registry_for(root, tmp_path)
    assert reg.get_sample_value("eptwatch_agent_collector_success", {"collector": "kvm_counters"}) == 0
    assert reg.get_sample_value("eptwatch_agent_collector_success", {"collector": "kvm_debugfs"}) == 1


def test_build_info_names_the_smaps_scanner(tmp_path: Path) -> None:
    from eptwatch.agent import __version__
    from eptwatch.agent.sources import smaps

    assert smaps.SCANNER in {"c", "regex"}
    reg, _ = registry_for("linux-6.6-pages2m", tmp_path)
    assert reg.get_sample_value("eptwatch_agent_build_info", {"version": __version__, "smaps_scanner": smaps.SCANNER}) == 1
