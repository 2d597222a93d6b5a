"""The agent's collectors, one small unit per source (node_exporter's `collector/`).

Each unit reads one source through the `HostRoot` and returns its values plus the `SourceStatus`es
saying how that went: a failing collector reports its failure as data, never an exception. The
parsing itself stays in the source's module one level up (`kernel`, `thp`, `kvm_debugfs`, `kvm_qmp`,
`discovery`, `smaps`, `guest_ram`); a collector only calls it, turns errors into statuses and keeps
whatever state must live from one sample to the next (smaps budgets, QMP back-off).

Host level, in the order the sampler runs them: `kernel`, `thp`, `kvm_debugfs` (the kvm/ directory,
the host-wide counters, the per-VM directory names), `discovery`. Per VM: `kvm_counters` (a chain of
counter sources, first success wins: `kvm_debugfs_vm` in any of debugfs' three naming eras, then
`kvm_qmp`), `process` (THP_enabled, and whether the pid still is the same process), `smaps` (with
`file_mappers`). The sampler (`..sampler`) only orders them and runs the model.

A new per-VM counter source is one new file with a `CounterSource` (see `kvm_counters`), listed in
`Sampler`'s counter chain.
"""
