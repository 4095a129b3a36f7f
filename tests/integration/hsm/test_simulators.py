"""The simulated HSMs of `hsm_sim`: several tokens on one conf, faults at the port and at the
PyKCS11 gate, against the real adapter."""

from __future__ import annotations

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm
from broker.domain import EU_EEA
from broker.errors import DecryptionFailed, FailedPrecondition, HsmUnavailable
from hsm_sim.faults import CallLog, FailOnCall, injected
from hsm_sim.faulty import FaultyHsm
from hsm_sim.tokens import DE, FLEET, FR, US, ensure_tokens, hsm_configs
from tests.hsm_fixtures import make_hsm, unique_label
from tests.integration.hsm.common import AAD, IV, Softhsm


def test_fleet_of_tokens_in_three_countries_on_one_conf(softhsm: Softhsm) -> None:
    library, token = softhsm
    home = token.conf_path.parent
    tokens = ensure_tokens(home, FLEET, library)
    assert [t.hsm.info.jurisdiction for t in tokens.values()] == ["FR", "DE", "US"]
    assert len({t.hsm.info.operator for t in tokens.values()}) == 3
    assert {FR.info.jurisdiction, DE.info.jurisdiction} <= EU_EEA
    assert US.info.jurisdiction not in EU_EEA
    assert {t.token.conf_path for t in tokens.values()} == {token.conf_path}
    assert all(t.library is library for t in tokens.values())
    slots = {library.slot_for_token(t.token.label) for t in tokens.values()}
    assert len(slots) == 3
    for simulated in tokens.values():
        hsm = simulated.open(pool_size=1)
        try:
            assert hsm.info == simulated.hsm.info
            label = unique_label("kek")
            hsm.generate_kek(label)
            assert hsm.decrypt(label, IV, hsm.encrypt(label, IV, b"x", AAD), AAD) == b"x"
        finally:
            hsm.close()
    configs = hsm_configs(home, (FR, US))
    assert [(c.name, c.jurisdiction, c.softhsm_init) for c in configs] == [
        ("local", "FR", True),
        ("us-east", "US", True),
    ]
    assert configs[1].read_pin() == tokens["us-east"].token.pin()


def test_faulty_hsm_raises_what_the_adapter_maps_a_ckr_code_to(hsm: Pkcs11Hsm) -> None:
    kek, sig = unique_label("kek"), unique_label("sig")
    hsm.generate_kek(kek)
    hsm.generate_signing_key(sig)
    faulty = FaultyHsm(hsm)
    faulty.fail_like_pkcs11(PyKCS11.CKR_DEVICE_ERROR, nth=2, methods={"encrypt"})
    sealed = faulty.encrypt(kek, IV, b"secret", AAD)
    with pytest.raises(HsmUnavailable, match="CKR_DEVICE_ERROR"):
        faulty.encrypt(kek, IV, b"secret", AAD)
    assert faulty.encrypt(kek, IV, b"secret", AAD) == sealed
    faulty.fail_like_pkcs11(PyKCS11.CKR_GENERAL_ERROR, methods={"decrypt"})
    with pytest.raises(DecryptionFailed):
        faulty.decrypt(kek, IV, sealed, AAD)
    faulty.fail_like_pkcs11(PyKCS11.CKR_MECHANISM_INVALID, methods={"sign"})
    with pytest.raises(FailedPrecondition, match="CKR_MECHANISM_INVALID"):
        faulty.sign(sig, bytes(32))
    assert faulty.decrypt(kek, IV, sealed, AAD) == b"secret"
    assert faulty.calls.count("encrypt") == 3


def test_library_calls_go_through_the_library_gate(softhsm: Softhsm) -> None:
    library, token = softhsm
    with injected(library, CallLog()) as calls:
        library.tokens()
    assert calls.count("getSlotList") == 1
    fault = FailOnCall(1, PyKCS11.CKR_DEVICE_ERROR, names=frozenset({"getSlotList"}))
    adapter = make_hsm(library, token)
    try:
        with injected(library, fault), pytest.raises(HsmUnavailable, match="CKR_DEVICE_ERROR"):
            adapter.check()  # finding the token's slot lists the slots
        assert fault.failed == 1
        adapter.check()
    finally:
        adapter.close()
    assert library.gate.fault is None


def test_every_call_of_a_fresh_adapter_goes_through_its_gate(softhsm: Softhsm) -> None:
    library, token = softhsm
    adapter = make_hsm(library, token, pool_size=1)
    calls = CallLog()
    adapter.gate.fault = calls
    adapter.random(8)
    adapter.close()
    assert calls.names[0] == "openSession"
    assert "getSessionInfo" in calls.names
    assert calls.names[-2:] == ["generateRandom", "closeSession"]
