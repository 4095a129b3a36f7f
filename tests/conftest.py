"""Fixtures shared by every test module.

One SoftHSM2 configuration and one loaded PKCS#11 module serve the whole test process.
"""

from tests.broker_fixtures import _reset_clock, broker, hsm_home  # noqa: F401
from tests.hsm_fixtures import hsm, softhsm, softhsm_home, softhsm_second  # noqa: F401
