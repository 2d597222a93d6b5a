"""How many inputs each property test tries: a few hundred in `make test`, many more in `make fuzz`.

Every parser and check that takes outside input has a property test marked `@pytest.mark.fuzz` and
decorated with `@fuzz_settings(N)`: N examples in the ordinary suite, or `EPTWATCH_FUZZ_EXAMPLES`
of them when that is set (`make fuzz` sets 100,000 and runs only the `fuzz` tests, printing
hypothesis's statistics, which count the inputs each test actually ran).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def _examples_override() -> int:
    raw = os.environ.get("EPTWATCH_FUZZ_EXAMPLES", "")
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"EPTWATCH_FUZZ_EXAMPLES={raw!r}: expected a positive whole number")
    return int(raw)


FUZZ_EXAMPLES = _examples_override()


def fuzz_settings(examples: int) -> settings:
    """Settings for a property test: `examples` inputs, or EPTWATCH_FUZZ_EXAMPLES under `make fuzz`.

    No deadline (a loaded machine must not fail a test for being slow) and no example database (a
    failure is reproduced from the seed hypothesis prints, not from state left in the work tree)."""
    return settings(
        max_examples=FUZZ_EXAMPLES or examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
