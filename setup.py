"""Only the optional C extension lives here; everything else is in pyproject.toml (PEP 621)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional=True: without a compiler (or Python headers) the build goes on without it and the
        # agent falls back to its regex scanner (eptwatch.agent.smaps.SCANNER says which one runs).
        Extension("eptwatch.agent._smapscan", ["agent/_smapscan.c"], optional=True, extra_compile_args=["-O2"]),
    ],
)
