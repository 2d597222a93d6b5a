"""Durable state: the store interface (`base`), SQLite (`sqlite`) and PostgreSQL (`postgres`).
"""
