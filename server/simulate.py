"""A simulated fleet: the real agent's reports on recorded fixture trees, replayed as many hosts.

Used by the embedded demo, the aggregator tests and the scale benchmark. Each fixture tree is sampled
once with the real Sampler; a simulated host is one fixture's report under its own host id, labels
and sequence numbers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from eptwatch.agent.model.sampler import Sampler, SamplerConfig
from eptwatch.agent.report.host_report import host_report
from eptwatch.agent.sources.hostroot import HostRoot
from eptwatch.v1 import report_pb2 as pb

# Fleet mix for the demo: mostly healthy modern kernels, the seed's unfixed and fixed kernels, and
# 6.6.15 whose VMs lose huge mappings the model cannot explain (the regression to find).
DEFAULT_MIX: dict[str, int] = {
    "linux-6.6-pages2m": 10,
    "anon-thp": 20,
    "linux-5.10-hostwalk": 20,
    "linux-5.4-fixed": 12,
    "linux-5.3-unfixed": 8,
    "linux-4.19.84-backport": 8,
    "hugetlbfs-1g": 8,
    "linux-5.14-lpages": 6,
    "nx-splits": 4,
    "thp-off": 4,
}
ZONES = ("eu-west-1a", "eu-west-1b", "us-east-1a")
CLUSTERS = ("prod-a", "prod-b")


def sample_fixture(root: Path) -> pb.HostReport:
    sample = Sampler(HostRoot.from_root(root), SamplerConfig(smaps_mode="full")).sample()
    return host_report(sample)


def load_templates(fixtures: Path, names: Sequence[str]) -> dict[str, pb.HostReport]:
    out = {}
    for n in names:
        root = fixtures / n
        if not (root / "proc").is_dir():
            raise FileNotFoundError(f"{root}: not a fixture tree")
        out[n] = sample_fixture(root)
    return out


@dataclass(frozen=True)
class SimHost:
    host_id: str
    template: str
    labels: tuple[tuple[str, str], ...]
    instance: str


class SimulatedFleet:
    @staticmethod
    def default_mix() -> dict[str, int]:
        return dict(DEFAULT_MIX)

    def __init__(self, templates: dict[str, pb.HostReport], n_hosts: int, mix: dict[str, int] | None = None, seed: int = 7) -> None:
        mix = {k: v for k, v in (mix or DEFAULT_MIX).items() if k in templates} or {k: 1 for k in templates}
        rng = random.Random(seed)
        self.templates = templates
        self.hosts: list[SimHost] = []
        # Exact proportions (largest remainder), interleaved so any prefix of the fleet is a mix too.
        total = sum(mix.values())
        quotas = {k: n_hosts * w / total for k, w in mix.items()}
        counts = {k: int(q) for k, q in quotas.items()}
        for k in sorted(quotas, key=lambda k: (-(quotas[k] - counts[k]), k))[: n_hosts - sum(counts.values())]:
            counts[k] += 1
        order: list[str] = []
        while len(order) < n_hosts:
            for k in mix:
                if counts[k] > 0:
                    order.append(k)
                    counts[k] -= 1
        for i, t in enumerate(order):
            labels = (("cluster", CLUSTERS[i % len(CLUSTERS)]), ("zone", rng.choice(ZONES)))
            self.hosts.append(SimHost(f"sim-{i:05d}", t, labels, f"sim{i:05d}"))
        self._seq: dict[str, int] = {}

    def report(self, host: SimHost, now: float) -> pb.HostReport:
        r = pb.HostReport()
        r.CopyFrom(self.templates[host.template])
        seq = self._seq.get(host.host_id, 0) + 1
        self._seq[host.host_id] = seq
        r.host_id, r.agent_instance, r.sequence = host.host_id, host.instance, seq
        r.labels.clear()
        r.labels.update(dict(host.labels))
        r.sample_time.FromNanoseconds(int(now * 1e9))
        return r

    def round(self, now: float) -> Iterator[pb.HostReport]:
        for h in self.hosts:
            yield self.report(h, now)
