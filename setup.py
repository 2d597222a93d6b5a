"""Only the optional C extensions live here; everything else is in pyproject.toml (PEP 621)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional=True: without a compiler (or Python headers) the build goes on without them: the
        # agent falls back to its regex scanner (eptwatch.agent.smaps.SCANNER says which one runs) and
        # the aggregator to its Python checks (eptwatch.server.validate.WALKER).
        Extension("eptwatch.agent._smapscan", ["agent/_smapscan.c"], optional=True, extra_compile_args=["-O2"]),
        # The aggregator's per-VM report checks from the wire bytes; without it validate.py walks the
        # parsed message in Python, several times slower per report.
        Extension("eptwatch.server._reportscan", ["server/_reportscan.c"], optional=True, extra_compile_args=["-O2"]),
    ],
)
