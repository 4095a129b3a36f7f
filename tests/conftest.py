"""Fixtures shared by every test module.

One SoftHSM2 configuration and one loaded PKCS#11 module serve the whole test process.
"""

pytest_plugins = ["tests.store_fixtures", "tests.hsm_fixtures", "tests.broker_fixtures"]
