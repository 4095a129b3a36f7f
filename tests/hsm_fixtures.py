"""Fixtures for tests against a real SoftHSM2 token.

SoftHSM2 reads SOFTHSM2_CONF once per process and a PKCS#11 module is initialised once per
process, so the whole test session shares one softhsm2.conf (under `softhsm_home`) and one
loaded module (`softhsm`). To put every SoftHSM2 user of the session on the same conf, a
conftest can override `softhsm_home` (e.g. to return the broker's home).

Use:

    from tests.hsm_fixtures import hsm, softhsm, softhsm_home  # in a conftest or test module

    def test_x(hsm: Pkcs11Hsm) -> None: ...
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import PyKCS11
import pytest

from broker.adapters.pkcs11_hsm import Pkcs11Hsm, Pkcs11Library
from broker.ports import HsmInfo
from hsm_sim.softhsm import SoftHsmToken, ensure_token

#: Label of the session's main token.
TOKEN_LABEL = "keybroker"
#: Label of a second token on the same conf, declared in another jurisdiction.
SECOND_TOKEN_LABEL = "us-east"

LOCAL_INFO = HsmInfo(name="local", jurisdiction="FR", operator="test SoftHSM2")
US_INFO = HsmInfo(name="us-east", jurisdiction="US", operator="test SoftHSM2 declared in the US")


def unique_label(prefix: str = "t") -> str:
    """A label no other test uses (token objects outlive a test: the token is per session)."""
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def softhsm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the session's softhsm2.conf and tokens/.

    A fixed path under the session's base temp dir, so that the fixture yields the same
    directory even when it is imported into several modules.
    """
    home = tmp_path_factory.getbasetemp() / "softhsm"
    home.mkdir(mode=0o700, exist_ok=True)
    return home


@pytest.fixture(scope="session")
def softhsm(softhsm_home: Path) -> tuple[Pkcs11Library, SoftHsmToken]:
    """(library, token): the process's loaded SoftHSM2 module and the "keybroker" token.

    Sets SOFTHSM2_CONF for the whole process (SoftHSM2 reads it at C_Initialize, also when
    the adapter re-initialises the module during recovery).
    """
    token = ensure_token(softhsm_home, TOKEN_LABEL, softhsm_home / "hsm.pin")
    return token.library, token


@pytest.fixture(scope="session")
def softhsm_second(softhsm: tuple[Pkcs11Library, SoftHsmToken]) -> SoftHsmToken:
    """A second token ("us-east") on the same conf and module."""
    library, token = softhsm
    home = token.conf_path.parent
    return ensure_token(home, SECOND_TOKEN_LABEL, home / "hsm-us-east.pin", library=library)


def make_hsm(
    library: Pkcs11Library,
    token: SoftHsmToken,
    info: HsmInfo = LOCAL_INFO,
    pool_size: int = 4,
    lease_timeout: float = 5.0,
) -> Pkcs11Hsm:
    """A `Pkcs11Hsm` on `token` (caller closes it)."""
    return Pkcs11Hsm(
        library, token.label, token.pin(), info, pool_size, lease_timeout=lease_timeout
    )


@pytest.fixture
def hsm(softhsm: tuple[Pkcs11Library, SoftHsmToken]) -> Iterator[Pkcs11Hsm]:
    """A fresh `Pkcs11Hsm` (session pool of 4) on the "keybroker" token, closed afterwards."""
    library, token = softhsm
    adapter = make_hsm(library, token)
    yield adapter
    adapter.fault_hook = None
    adapter.close()


@contextmanager
def raw_session(library: Pkcs11Library, token: SoftHsmToken) -> Iterator[PyKCS11.Session]:
    """A logged-in PyKCS11 session outside the adapter, as an attacker with the PIN has."""
    slot = library.slot_for_token(token.label)
    with library.using() as lib:
        session = lib.openSession(slot, PyKCS11.CKF_RW_SESSION)
        try:
            try:
                session.login(token.pin())
            except PyKCS11.PyKCS11Error as exc:
                if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                    raise
            yield session
        finally:
            session.closeSession()
