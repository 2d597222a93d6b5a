"""eptwatch agent: samples a KVM host and estimates lost EPT/NPT huge mappings.

Layout (one source, one module): `hostroot` owns every host path; `smaps`, `kvm_debugfs`,
`kvm_binary_stats`, `kernel`, `thp`, `discovery` each read and parse one source; `model` is the pure
predicate model; `sampler` runs the collectors; `report` converts to the wire contract; `cli` is the
command line.
"""

from eptwatch.common import __version__

__all__ = ["__version__"]
