"""Where the agent's numbers come from: `hostroot` owns every host path, one module reads and parses
each source (smaps, KVM debugfs and QMP, kernel, THP, discovery, labels), and `collectors/` wraps
each source as one unit that returns values plus statuses.
"""
