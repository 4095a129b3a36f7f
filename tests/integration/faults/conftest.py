"""A broker home set up once for the process tests of this package (the first start makes
its SoftHSM2 token, PIN and development PKI; later starts reuse them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.faults.procs import running


@pytest.fixture(scope="package")
def broker_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("faults") / "home"
    with running(home) as broker:
        assert broker.stop() == 0
    return home
