"""eptwatch agent: samples a KVM host and estimates lost EPT/NPT huge mappings.

Layout (one source, one module): `hostroot` owns every host path; `smaps`, `kvm_debugfs`,
`kvm_qmp`, `kernel`, `thp`, `discovery` each read and parse one source; `collectors/` holds one
collector per source (reads it, reports values plus statuses); `model` is the pure predicate model;
`sampler` runs the collectors in order, then the model; `report` converts to the wire contract; `cli` is the
command line.
"""

from eptwatch.common import __version__

__all__ = ["__version__"]
