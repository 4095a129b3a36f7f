"""Invariant 8 for real: HSMs declared in FR, DE and the US (SoftHSM2 tokens of `hsm_sim`), keys
created and used only where their policy allows, grants bound to the caller certificate's
country, and GetKey / `keybroker keys show` saying where a key lives. Everything through gRPC
over mutual TLS."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from keybroker.v1 import crypto_pb2, key_admin_pb2, resources_pb2, tokens_pb2
from keybroker_client.certs import cert_thumbprint

from broker.devpki import issue_dev_identity
from hsm_sim.tokens import DE, FLEET, FR, US, hsm_configs
from tests.broker_fixtures import Broker, start_broker
from tests.integration.flows import (
    CTX,
    DECRYPT,
    ENCRYPT,
    REWRAP,
    code_of,
    create_key,
    datakey,
    decrypt,
    events_for,
    grant,
    issue,
    rid,
    standard_policy,
)
from tests.integration.test_cli_files import kb
from tests.store_fixtures import connect, database_path

DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def fleet(hsm_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker with the three simulated HSMs: local (FR), de-frankfurt (DE), us-east (US)."""
    db = tmp_path_factory.mktemp("fleet") / "keybroker.db"
    broker = start_broker(hsm_home, database=db, hsms=hsm_configs(hsm_home, FLEET))
    yield broker
    broker.close()


def _db(broker: Broker) -> Path:
    return database_path(broker.app.settings)


def _alter_record(broker: Broker, key_id: str, change: Callable[[dict[str, Any]], None]) -> str:
    """Rewrites the key's stored record behind the broker's back; returns the old text."""
    with connect(_db(broker)) as db:  # SQLite or PostgreSQL: tests/store_fixtures.py
        [(old,)] = db.execute("SELECT data FROM keys WHERE key_id = ?", (key_id,))
        record = json.loads(old)
        change(record)
        db.execute("UPDATE keys SET data = ? WHERE key_id = ?", (json.dumps(record), key_id))
    return str(old)


def _restore_record(broker: Broker, key_id: str, text: str) -> None:
    with connect(_db(broker)) as db:
        db.execute("UPDATE keys SET data = ? WHERE key_id = ?", (text, key_id))


def _policy(**kw: Any) -> resources_pb2.KeyPolicy:
    policy = standard_policy(**kw)
    policy.grants.append(grant("producer", REWRAP, context={"dataset": "cohort-*"}))
    return policy


def _get(broker: Broker, key_id: str) -> resources_pb2.Key:
    return broker.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)).key


# Creation ----------------------------------------------------------------------------------


def test_a_key_is_created_only_on_an_hsm_its_policy_allows(fleet: Broker) -> None:
    # The default policy (EU/EEA) allows FR and DE, not the US.
    for hsm in (FR, DE):
        key_id = create_key(fleet, hsm=hsm.info.name)
        info = _get(fleet, key_id).hsm_info
        assert (info.name, info.jurisdiction, info.operator) == (
            hsm.info.name,
            hsm.info.jurisdiction,
            hsm.info.operator,
        )
    code, msg = code_of(lambda: create_key(fleet, hsm=US.info.name))
    assert code == DENIED
    assert "jurisdiction 'US'" in msg and "us-east" in msg
    # A policy naming only FR keeps the key off the German HSM; naming the US allows it.
    code, _ = code_of(
        lambda: create_key(fleet, policy=_policy(allowed_jurisdictions=["FR"]), hsm=DE.info.name)
    )
    assert code == DENIED
    us_key = create_key(fleet, policy=_policy(allowed_jurisdictions=["US"]), hsm=US.info.name)
    assert _get(fleet, us_key).hsm_info.jurisdiction == "US"
    assert datakey(fleet, us_key).key_version == 1


def test_a_refused_creation_leaves_nothing_and_is_audited(fleet: Broker) -> None:
    key_id, request_id = f"k-{uuid.uuid4().hex[:12]}", rid()
    code, _ = code_of(
        lambda: fleet.keys("admin").CreateKey(
            key_admin_pb2.CreateKeyRequest(key_id=key_id, hsm=US.info.name),
            metadata=(("x-request-id", request_id),),
        )
    )
    assert code == DENIED
    [event] = events_for(fleet, request_id)
    assert (event.operation, event.key_id, event.outcome) == ("CreateKey", key_id, 2)
    assert "jurisdiction" in event.reason
    code, _ = code_of(lambda: _get(fleet, key_id))
    assert code == grpc.StatusCode.NOT_FOUND


# Use ---------------------------------------------------------------------------------------


Metadata = tuple[tuple[str, str], ...]


def _every_use(
    broker: Broker, key_id: str, blob: bytes, token: str
) -> dict[str, Callable[[Metadata], Any]]:
    """Each way of using the key, as the callers granted it, tagged with the given metadata."""
    crypto = broker.crypto("producer")
    return {
        "GenerateDataKey": lambda md: crypto.GenerateDataKey(
            crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=CTX), metadata=md
        ),
        "Encrypt": lambda md: crypto.Encrypt(
            crypto_pb2.EncryptRequest(key_id=key_id, plaintext=b"row", context=CTX), metadata=md
        ),
        "Decrypt": lambda md: broker.crypto("consumer").Decrypt(
            crypto_pb2.DecryptRequest(ciphertext=blob, context=CTX, token=token), metadata=md
        ),
        "ReWrap": lambda md: crypto.ReWrap(
            crypto_pb2.ReWrapRequest(ciphertext=blob, context=CTX), metadata=md
        ),
        "IssueToken": lambda md: broker.tokens("consumer").IssueToken(
            tokens_pb2.IssueTokenRequest(key_id=key_id, context=CTX, justification="study"),
            metadata=md,
        ),
    }


@pytest.mark.parametrize(
    ("where", "change"),
    [
        # The policy narrowed to Germany behind the broker's back (UpdateKeyPolicy refuses it).
        ("policy", lambda r: r["policy"].update(allowed_jurisdictions=["DE"])),
        # The record moved to the US HSM (its policy, the default, is the EU/EEA).
        ("hsm", lambda r: r.update(hsm="us-east")),
    ],
)
def test_every_use_is_checked_against_the_jurisdiction_at_use(
    fleet: Broker, where: str, change: Callable[[dict[str, Any]], None]
) -> None:
    key_id = create_key(fleet, policy=_policy())
    dk = datakey(fleet, key_id)
    token = issue(fleet, key_id).token
    uses = _every_use(fleet, key_id, dk.wrapped_key, token)
    for use in uses.values():
        use(())  # all allowed while the record says FR under an EU policy
    old = _alter_record(fleet, key_id, change)
    try:
        for name, use in uses.items():
            request_id = rid()
            tagged = (("x-request-id", request_id),)
            code, message = code_of(lambda use=use, md=tagged: use(md))
            assert code == DENIED, (where, name)
            assert "may not be held or used in jurisdiction" in message, (where, name)
            [event] = events_for(fleet, request_id)
            assert (event.operation, event.outcome) == (name, 2)
            assert "jurisdiction" in event.reason
        # The stream checks each item the same way.
        [result] = _rewrap_stream(fleet, [dk.wrapped_key])
        assert result.code == DENIED.value[0] and "jurisdiction" in result.message
    finally:
        _restore_record(fleet, key_id, old)
    assert decrypt(fleet, dk.wrapped_key, token).plaintext == dk.plaintext_key


def _rewrap_stream(broker: Broker, blobs: list[bytes], who: str = "producer") -> list[Any]:
    request = crypto_pb2.ReWrapStreamRequest(
        items=[crypto_pb2.ReWrapRequest(ciphertext=b, context=CTX) for b in blobs]
    )
    return [r for reply in broker.crypto(who).ReWrapStream(iter([request])) for r in reply.results]


def test_a_us_key_stops_working_once_its_policy_no_longer_names_the_us(fleet: Broker) -> None:
    key_id = create_key(fleet, policy=_policy(allowed_jurisdictions=["US"]), hsm=US.info.name)
    dk = datakey(fleet, key_id)
    old = _alter_record(fleet, key_id, lambda r: r["policy"].update(allowed_jurisdictions=[]))
    try:
        code, msg = code_of(lambda: datakey(fleet, key_id))
        assert code == DENIED and "'US'" in msg
        code, _ = code_of(lambda: issue(fleet, key_id))
        assert code == DENIED
    finally:
        _restore_record(fleet, key_id, old)
    token = issue(fleet, key_id).token
    assert decrypt(fleet, dk.wrapped_key, token).plaintext == dk.plaintext_key


# Caller countries --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analysts(fleet: Broker) -> dict[str, str]:
    """Principals whose certificates name FR, US and no country, by that country ("" none)."""
    names = {}
    for country in ("FR", "US", ""):
        name = f"analyst-{country.lower() or 'none'}-{uuid.uuid4().hex[:8]}"
        issue_dev_identity(fleet.home / "pki", name, country)
        names[country] = name
    return names


def _country_policy(analysts: dict[str, str]) -> resources_pb2.KeyPolicy:
    grants = []
    for name in analysts.values():
        g = grant(name, ENCRYPT, DECRYPT, REWRAP, context={"dataset": "cohort-*"})
        g.countries.extend(["FR", "DE"])
        grants.append(g)
    return resources_pb2.KeyPolicy(grants=grants)


def test_a_grant_limited_to_countries_admits_only_those_certificates(
    fleet: Broker, analysts: dict[str, str]
) -> None:
    key_id = create_key(fleet, policy=_country_policy(analysts))
    stored = _get(fleet, key_id).policy.grants
    assert {tuple(g.countries) for g in stored} == {("FR", "DE")}

    fr = analysts["FR"]
    dk = datakey(fleet, key_id, identity=fr)
    token = issue(fleet, key_id, identity=fr).token
    assert decrypt(fleet, dk.wrapped_key, token, identity=fr).plaintext == dk.plaintext_key
    [result] = _rewrap_stream(fleet, [dk.wrapped_key], who=fr)
    assert result.code == 0
    rewrap_request = crypto_pb2.ReWrapRequest(ciphertext=dk.wrapped_key, context=CTX)

    for country, want in (("US", "names country 'US'"), ("", "names no country")):
        who = analysts[country]
        for use in (
            lambda who=who: datakey(fleet, key_id, identity=who),
            lambda who=who: issue(fleet, key_id, identity=who),
            lambda who=who: fleet.crypto(who).ReWrap(rewrap_request),
        ):
            code, msg = code_of(use)
            assert code == DENIED and want in msg and "FR, DE" in msg
        [result] = _rewrap_stream(fleet, [dk.wrapped_key], who=who)
        assert result.code == DENIED.value[0] and want in result.message


def test_the_country_is_checked_when_a_token_is_used(
    fleet: Broker, analysts: dict[str, str]
) -> None:
    """An admin may issue a token for another principal's certificate without holding it; the
    country of that certificate is checked at Decrypt, over its own connection."""
    key_id = create_key(fleet, policy=_country_policy(analysts))
    dk = datakey(fleet, key_id, identity=analysts["FR"])
    us = analysts["US"]
    pem = (fleet.home / "pki" / f"{us}.pem").read_bytes()
    issued = fleet.tokens("admin").IssueToken(
        tokens_pb2.IssueTokenRequest(
            key_id=key_id,
            context=CTX,
            justification="on behalf of the US analyst",
            subject=us,
            subject_cert_thumbprint=cert_thumbprint(pem),
        )
    )
    request_id = rid()
    code, msg = code_of(
        lambda: decrypt(fleet, dk.wrapped_key, issued.token, identity=us, request_id=request_id)
    )
    assert code == DENIED and "names country 'US'" in msg
    [event] = events_for(fleet, request_id)
    assert (event.operation, event.outcome, event.token_id) == ("Decrypt", 2, issued.token_id)


def test_a_malformed_country_in_a_policy_is_refused(fleet: Broker) -> None:
    policy = standard_policy()
    policy.grants[0].countries.append("France")
    code, msg = code_of(lambda: create_key(fleet, policy=policy))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'France'" in msg


# Where a key lives -------------------------------------------------------------------------


def test_keys_show_says_where_a_key_lives(fleet: Broker, tmp_path: Path) -> None:
    key_id = create_key(fleet, hsm=DE.info.name)
    r = kb(fleet, "admin", "keys", "show", key_id, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert "hsm:                    de-frankfurt" in lines
    assert "hsm_jurisdiction:       DE" in lines
    assert f"hsm_operator:           {DE.info.operator}" in lines
    r = kb(fleet, "auditor", "keys", "show", key_id, "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["hsm_info"] == {
        "name": "de-frankfurt",
        "jurisdiction": "DE",
        "operator": DE.info.operator,
    }
    # A key whose HSM this broker does not know: said so, not guessed.
    old = _alter_record(fleet, key_id, lambda rec: rec.update(hsm="gone"))
    try:
        assert not _get(fleet, key_id).HasField("hsm_info")
        r = kb(fleet, "admin", "keys", "show", key_id, cwd=tmp_path)
        assert "hsm_jurisdiction:       unknown (HSM not configured here)" in r.stdout.decode()
    finally:
        _restore_record(fleet, key_id, old)


def test_caller_countries_from_the_cli(fleet: Broker, tmp_path: Path) -> None:
    key_id = f"k-{uuid.uuid4().hex[:12]}"
    r = kb(
        fleet, "admin", "keys", "create", key_id, "--grant", "analyst:decrypt",
        "--caller-country", "analyst=fr,DE", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["policy"]["grants"][0]["countries"] == ["FR", "DE"]
    r = kb(
        fleet, "admin", "keys", "create", f"{key_id}-x", "--grant", "analyst:decrypt",
        "--caller-country", "someone=FR", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and b"who has no grant" in r.stderr
