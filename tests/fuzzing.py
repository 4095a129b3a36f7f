"""How hard the property tests push: brief in `make test`, long in `make fuzz`.

`make fuzz` sets KEYBROKER_FUZZ_EXAMPLES (examples per property); a test asks for
`examples(brief)` instead of a fixed `max_examples`, so the same properties run both ways.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def examples(brief: int) -> int:
    """Examples per property: `brief` normally, KEYBROKER_FUZZ_EXAMPLES under `make fuzz`."""
    return int(os.environ.get("KEYBROKER_FUZZ_EXAMPLES", brief))


def fuzz_settings(brief: int) -> settings:
    """Settings for a property test of a parser: no deadline (a noisy machine), no health
    check that would stop a long run."""
    return settings(
        max_examples=examples(brief), deadline=None, suppress_health_check=list(HealthCheck)
    )
