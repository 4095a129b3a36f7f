"""Invariant 1 at start: a key-encryption key weaker than its template stops the broker."""

from __future__ import annotations

from pathlib import Path

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Library
from broker.app import build_app
from broker.devhsm import SoftHsmToken
from broker.services.startup_check import WeakKeyError
from tests.broker_fixtures import broker_settings, start_broker
from tests.hsm_fixtures import plant_weak_key, raw_session
from tests.integration.flows import create_key
from tests.store_fixtures import connect


def test_weak_kek_on_the_token_refuses_start(
    hsm_home: Path, tmp_path: Path, softhsm: tuple[Pkcs11Library, SoftHsmToken]
) -> None:
    db = tmp_path / "weak.db"
    b = start_broker(hsm_home, database=db)
    key_id = create_key(b)
    b.close()
    # Someone with the PIN plants an extractable AES key and points the metadata at it.
    library, token = softhsm
    weak_label = f"weak-{key_id}"
    with raw_session(library, token) as session:
        plant_weak_key(
            session,
            weak_label,
            [
                (PyKCS11.CKA_PRIVATE, True),
                (PyKCS11.CKA_SENSITIVE, False),
                (PyKCS11.CKA_EXTRACTABLE, True),
                (PyKCS11.CKA_ENCRYPT, True),
                (PyKCS11.CKA_DECRYPT, True),
            ],
        )
    with connect(db) as conn:  # SQLite or PostgreSQL: tests/store_fixtures.py
        [(data,)] = conn.execute("SELECT data FROM keys WHERE key_id = ?", (key_id,))
        label = data.split('"label": "')[1].split('"')[0]
        conn.execute(
            "UPDATE keys SET data = ? WHERE key_id = ?", (data.replace(label, weak_label), key_id)
        )
    with pytest.raises(WeakKeyError) as info:
        build_app(broker_settings(hsm_home, database=db))
    message = str(info.value)
    assert key_id in message and "CKA_EXTRACTABLE" in message
