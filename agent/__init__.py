"""eptwatch agent: samples a KVM host and estimates lost EPT/NPT huge mappings.

The folders follow the data, and each imports only the ones before it (tests/test_imports.py):

- `sources/`: where the numbers come from. `hostroot` owns every host path; one module reads and
  parses each source (`smaps`, `kvm_debugfs`, `kvm_qmp`, `kernel`, `thp`, `discovery`, `guest_ram`,
  `labels`); `collectors/` wraps each source as one unit returning values plus statuses.
- `model/`: the pure predicate model (`predicate`) and the `sampler` that runs the collectors in order,
  then the model.
- `report/`: a host sample -> the wire contract (eptwatch.v1.HostReport).
- `uplink/`: the durable `spool` and the gRPC `delivery` stream to the aggregator.
- `faces/`: what operators touch: `cli` (eptwatch-agent), the `daemon` loop of `run`, the local
  /metrics endpoint, the `sample` table and the config checks.
"""

from eptwatch.common import __version__

__all__ = ["__version__"]
