"""Reports in: agent authentication, the Ingest servicer and the checks a report must pass.
"""
