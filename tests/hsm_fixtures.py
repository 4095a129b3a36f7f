"""Fixtures and PKCS#11 helpers for tests against a real SoftHSM2 token.

SoftHSM2 reads SOFTHSM2_CONF once per process and a PKCS#11 module is initialised once per
process, so the whole test session shares one softhsm2.conf (under `softhsm_home`) and one
loaded module (`softhsm`). The tokens are the simulated HSMs of `hsm_sim.tokens`: "keybroker"
(HSM "local", FR) and "us-east" (US), plus "de-frankfurt" (DE) for the tests that need it.

The fixtures are loaded through `pytest_plugins` in tests/conftest.py; the helpers below
(`raw_session`, `find_one`, `objects_labelled`, `plant_weak_key`, ...) look at the token
directly, outside the adapter, as an attacker holding the PIN would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm, Pkcs11Library
from broker.devhsm import SoftHsmToken
from broker.ports import HsmInfo
from hsm_sim.tokens import FR, US, ensure_tokens

#: Label of the session's main token.
TOKEN_LABEL = FR.label
#: Label of a second token on the same conf, declared in another jurisdiction.
SECOND_TOKEN_LABEL = US.label

LOCAL_INFO = FR.info
US_INFO = US.info


def unique_label(prefix: str = "t") -> str:
    """A label no other test uses (token objects outlive a test: the token is per session)."""
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def softhsm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the session's softhsm2.conf and tokens/ (a fixed path under the
    session's base temp dir, shared with every broker the tests start)."""
    home = tmp_path_factory.getbasetemp() / "softhsm"
    home.mkdir(mode=0o700, exist_ok=True)
    return home


@pytest.fixture(scope="session")
def softhsm(softhsm_home: Path) -> tuple[Pkcs11Library, SoftHsmToken]:
    """(library, token): the process's loaded SoftHSM2 module and the "keybroker" token.

    Sets SOFTHSM2_CONF for the whole process (SoftHSM2 reads it at C_Initialize, also when
    the adapter re-initialises the module during recovery).
    """
    token = ensure_tokens(softhsm_home, (FR,))[FR.info.name].token
    return token.library, token


@pytest.fixture(scope="session")
def softhsm_second(softhsm: tuple[Pkcs11Library, SoftHsmToken]) -> SoftHsmToken:
    """A second token ("us-east") on the same conf and module."""
    library, token = softhsm
    return ensure_tokens(token.conf_path.parent, (US,), library)[US.info.name].token


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
    adapter.gate.fault = None
    adapter.close()


# -- looking at the token outside the adapter ---------------------------------------------------


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


def find_one(session: PyKCS11.Session, label: str, cls: int) -> PyKCS11.CK_OBJECT_HANDLE:
    """The one object of class `cls` labelled `label` (asserts there is exactly one)."""
    found = session.findObjects([(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_CLASS, cls)])
    assert len(found) == 1, f"{len(found)} objects of class {cls} labelled {label}"
    return found[0]


def read_attrs(session: PyKCS11.Session, handle: object, attrs: list[int]) -> dict[int, object]:
    """The values of `attrs` of one object, by attribute type."""
    return dict(zip(attrs, session.getAttributeValue(handle, attrs), strict=True))


def objects_labelled(library: Pkcs11Library, token: SoftHsmToken, label: str) -> int:
    """How many objects a PKCS#11 search finds on the token with that label."""
    with raw_session(library, token) as session:
        return len(session.findObjects([(PyKCS11.CKA_LABEL, label)]))


def plant_weak_key(
    session: PyKCS11.Session,
    label: str,
    attributes: Sequence[tuple[int, object]] = (),
    *,
    token: bool = True,
) -> PyKCS11.CK_OBJECT_HANDLE:
    """Generates an AES-256 key labelled `label` outside the broker: SoftHSM2's defaults
    (no CKA_ALLOWED_MECHANISMS, wrap and unwrap on) plus `attributes`.

    Args:
        session: a logged-in session (`raw_session`).
        label: its CKA_LABEL.
        attributes: further (CKA_*, value) pairs, e.g. `[(PyKCS11.CKA_EXTRACTABLE, True)]`.
        token: a token object (True) or a session object that vanishes with the session.
    """
    return session.generateKey(
        [
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
            (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
            (PyKCS11.CKA_VALUE_LEN, 32),
            (PyKCS11.CKA_TOKEN, token),
            (PyKCS11.CKA_LABEL, label),
            *attributes,
        ],
        PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN),
    )
