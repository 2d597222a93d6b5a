"""The fleet view: latest state per host, rollups, verdicts (`state`), and following a shared store.
"""
