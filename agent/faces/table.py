"""A per-VM table in the spirit of kvm_stat: one line a VM, the numbers an operator scans first."""

from __future__ import annotations

from eptwatch.agent.model.sampler import HostSample


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)


def render_table(sample: HostSample) -> str:
    k = sample.kernel
    lines = [
        f"host {sample.host_id}  kernel {k.release if k else '?'} ({k.machine if k and k.machine else '?'})  era {sample.era.era.value}",
        f"  era basis: {sample.era.basis}",
        f"  thp enabled={sample.thp.enabled or '?'} shmem_enabled={sample.thp.shmem_enabled or '?'} "
        f"defrag={sample.thp.defrag or '?'} nx_huge_pages={sample.thp.nx_huge_pages or '?'}",
    ]
    if sample.global_counters is not None:
        g = sample.global_counters
        lines.append(f"  kvm (all VMs, {g.naming}): pages_2m={_n(g.pages_2m)} pages_1g={_n(g.pages_1g)} large_pages={_n(g.large_pages)} nx_splits={_n(g.nx_lpage_splits)}")
    header = f"{'VM':<24} {'PID':>7} {'SMAPS':<6} {'CAP_2M':>8} {'OBS_2M':>8} {'ALLOW_2M':>8} {'LOST_2M':>8} {'LOST%':>6}  CAUSE"
    lines += ["", header]
    by_id = {s.vm.vm_id: s for s in sample.vms}
    for e in sample.estimates:
        s = by_id.get(e.vm_id)
        ratio = "-" if e.lost_ratio is None else f"{100 * e.lost_ratio:.1f}"
        label = (s.vm.identity.name if s else "") or e.vm_id
        lines.append(
            f"{label[:24]:<24} {s.vm.pid if s else '-':>7} {s.smaps_mode if s else '-':<6} {_n(e.host_huge_capacity_2m):>8} "
            f"{_n(e.observed_huge_2m):>8} {_n(e.allowed_huge_2m):>8} {_n(e.lost_huge_2m):>8} {ratio:>6}  {e.cause.value}"
        )
        lines.append(f"{'':<24} {e.explanation}")
        for u in e.uncertainty:
            lines.append(f"{'':<24} ~ {u}")
    if not sample.estimates:
        lines.append("(no VMs on this host)")
    if sample.host_estimate is not None:
        h = sample.host_estimate
        lines.append(f"{'host (all VMs)':<24} {'':>7} {'':<6} {_n(h.host_huge_capacity_2m):>8} {_n(h.observed_huge_2m):>8} {_n(h.allowed_huge_2m):>8} {_n(h.lost_huge_2m):>8}        {h.cause.value}")
    problems = [st for st in sample.statuses if st.state.value in ("error", "partial")]
    problems += [st for v in sample.vms for st in v.statuses if st.state.value in ("error", "partial")]
    unavailable = [st for st in sample.statuses if st.state.value == "unavailable"]
    if problems or unavailable:
        lines.append("")
        for st in problems + unavailable:
            lines.append(f"  [{st.state.value}] {st.source}: {st.reason}")
    return "\n".join(lines) + "\n"
