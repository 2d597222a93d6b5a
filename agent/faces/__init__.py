"""What operators touch: the CLI, the `run` loop, the local /metrics endpoint, the table, config checks.
"""
