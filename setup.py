"""Only the optional C extensions live here; everything else is in pyproject.toml (PEP 621)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional=True: without a compiler (or Python headers) the build goes on without them: the
        # agent falls back to its regex scanner (eptwatch.agent.sources.smaps.SCANNER says which one runs) and
        # the aggregator to its Python checks (eptwatch.server.ingest.validate.WALKER).
        Extension("eptwatch.agent.sources._smapscan", ["agent/sources/_smapscan.c"], optional=True, extra_compile_args=["-O2"]),
        # The aggregator's per-VM report checks from the wire bytes; without it validate.py walks the
        # parsed message in Python, several times slower per report.
        Extension("eptwatch.server.ingest._reportscan", ["server/ingest/_reportscan.c"], optional=True, extra_compile_args=["-O2"]),
    ],
)
