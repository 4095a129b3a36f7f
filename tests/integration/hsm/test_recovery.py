"""C.15: the token directory disappears; the adapter fails closed and recovers on its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm, Pkcs11Library
from broker.devhsm import SoftHsmToken
from broker.errors import HsmUnavailable
from broker.ports import KeyKind
from tests.hsm_fixtures import US_INFO, make_hsm, objects_labelled, unique_label
from tests.integration.hsm.common import AAD, IV, Softhsm


@contextmanager
def library_restored_on_failure(library: Pkcs11Library) -> Iterator[None]:
    """When the test fails half-way, re-initialise the shared module so that later tests
    do not fail in cascade (the adapter's own recovery is what the test checks)."""
    try:
        yield
    except BaseException:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                library.reinitialize()
                break
            except HsmUnavailable:
                time.sleep(library.reinit_min_interval)
        raise


def test_token_directory_renamed_away_fails_closed_and_recovers(
    softhsm: Softhsm, softhsm_second: SoftHsmToken
) -> None:
    library, token = softhsm
    with library_restored_on_failure(library):
        _token_directory_scenario(library, token, softhsm_second)


def _token_directory_scenario(
    library: Pkcs11Library, token: SoftHsmToken, softhsm_second: SoftHsmToken
) -> None:
    tokens = token.conf_path.parent / "tokens"
    away = tokens.with_name("tokens.away")
    adapter = make_hsm(library, token)
    other = make_hsm(library, softhsm_second, info=US_INFO)
    label, fresh = unique_label("kek"), unique_label("kek")
    adapter.generate_kek(label)
    sealed = adapter.encrypt(label, IV, b"secret", AAD)
    other_label = unique_label("kek")
    other.generate_kek(other_label)
    before = sorted(str(p.relative_to(tokens)) for p in tokens.rglob("*.object"))
    probes = [make_hsm(library, token) for _ in range(8)]
    for probe in probes:
        probe.check()  # a warm session: the failure must come from the call itself
    generation = library.generation

    tokens.rename(away)
    try:
        # Observed on SoftHSM2 2.6.1: cached handles turn CKR_OBJECT_HANDLE_INVALID, searches
        # find nothing (no error!) and C_GetTokenInfo answers CKR_GENERAL_ERROR. The adapter
        # never reads "nothing found" as "no such key" without asking the token. Each first
        # call below runs on an adapter that has not seen a failure yet.
        with pytest.raises(HsmUnavailable):
            adapter.encrypt(label, IV, b"secret", AAD)  # cached handle
        first_calls: list[Callable[[Pkcs11Hsm], object]] = [
            lambda h: h.key_properties(label, KeyKind.KEK),
            lambda h: h.key_properties(fresh, KeyKind.KEK),
            lambda h: h.encrypt(label, IV, b"secret", AAD),
            lambda h: h.decrypt(label, IV, sealed, AAD),
            lambda h: h.generate_kek(fresh),
            lambda h: h.destroy(label),
            lambda h: h.attributes(label),
            lambda h: h.check(),
        ]
        for call, probe in zip(first_calls, probes, strict=True):
            with pytest.raises(HsmUnavailable):
                call(probe)
        assert library.generation == generation
        # The next call of the adapter that saw the failure re-initialises the module. SoftHSM2
        # keeps the token marked lost even after the directory returns, until the module is
        # finalised and initialised again; C_Initialize itself fails while the directory is
        # missing, so every token of the module is unavailable until then.
        with pytest.raises(HsmUnavailable):
            adapter.check()
        assert library.generation > generation
        assert not library.initialized
        with pytest.raises(HsmUnavailable):
            other.encrypt(other_label, IV, b"x", b"")
        assert not tokens.exists()
    finally:
        away.rename(tokens)

    deadline = time.monotonic() + 15
    while True:  # the module re-initialises at most once a second (reinit_min_interval)
        try:
            adapter.check()
            break
        except HsmUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert library.initialized
    assert adapter.decrypt(label, IV, sealed, AAD) == b"secret"  # the same key, not a new one
    assert other.encrypt(other_label, IV, b"x", b"")  # the other token's pool recovered too
    assert not objects_labelled(library, token, fresh)  # nothing was created while away
    assert adapter.attributes(label)["objects"] == 1
    after = sorted(str(p.relative_to(tokens)) for p in tokens.rglob("*.object"))
    assert after == before
    for h in (adapter, other, *probes):
        h.close()
