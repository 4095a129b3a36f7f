"""Invariant 4: every forged, stale, foreign or replayed token is UNAUTHENTICATED.

Forgeries that need a valid signature are signed by the broker's own HSM key (through the
running app), so each case isolates the one check it attacks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.duration_pb2 import Duration
from keybroker.v1 import key_admin_pb2, tokens_pb2

from broker.services.signing import TOKEN_PURPOSE
from tests.broker_fixtures import Broker
from tests.integration.flows import (
    CTX,
    code_of,
    create_key,
    datakey,
    decrypt,
    events_for,
    issue,
    rid,
)

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def thumbprint(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return b64(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def claims_for(broker: Broker, key_id: str, identity: str = "consumer", **over: Any) -> dict:
    now = int(datetime.now(UTC).timestamp())
    claims = {
        "iss": broker.app.settings.issuer,
        "sub": identity,
        "aud": broker.app.settings.audience,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        "scope": {
            "key_id": key_id,
            "operations": ["decrypt"],
            "context": CTX,
            "justification": "test",
            "max_uses": 0,
        },
        "cnf": {"x5t#S256": thumbprint((broker.home / "pki" / f"{identity}.pem").read_bytes())},
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def hsm_signed(broker: Broker, claims: dict, **headers: Any) -> str:
    body = json.dumps(claims).encode()
    return broker.app.signing.sign_jws(TOKEN_PURPOSE, body, {"typ": "at+jwt", **headers})


def unsigned(header: dict, claims: dict, sig: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(sig)])


@pytest.fixture
def setup(broker: Broker) -> tuple[str, bytes]:
    key_id = create_key(broker)
    return key_id, datakey(broker, key_id).wrapped_key


def assert_refused(broker: Broker, blob: bytes, token: str, identity: str = "consumer") -> str:
    request_id = rid()
    code, msg = code_of(
        lambda: decrypt(broker, blob, token, identity=identity, request_id=request_id)
    )
    assert code == UNAUTH, msg
    events = events_for(broker, request_id)
    assert len(events) == 1 and events[0].outcome == 2  # OUTCOME_DENIED
    if len(token) > 8:
        assert token not in msg
        assert token not in str(events[0])
    return msg


def test_control_forged_claims_signed_by_hsm_are_accepted(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    """The forgery helper makes tokens the broker accepts, so each refusal below is real."""
    key_id, blob = setup
    token = hsm_signed(broker, claims_for(broker, key_id))
    assert len(decrypt(broker, blob, token).plaintext) == 32


def test_missing_garbage_truncated_oversized(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    good = issue(broker, key_id).token
    for token in (
        "",
        "garbage",
        "a.b.c",
        good[:-5],
        good[: len(good) // 2],
        good + "x",
        good + "." + good,
        "e" * 9000,
        good.replace(".", "..", 1),
    ):
        assert_refused(broker, blob, token)


def test_alg_none(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    kid = broker.app.signing.ensure(TOKEN_PURPOSE, "local").kid
    for alg in ("none", "None", "NONE"):
        token = unsigned({"alg": alg, "typ": "at+jwt", "kid": kid}, claims_for(broker, key_id))
        assert_refused(broker, blob, token)


def test_hs256_keyed_with_the_public_key(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    signing = broker.app.signing.ensure(TOKEN_PURPOSE, "local")
    pub = signing.public_key
    secrets_to_try = [
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
        json.dumps(json.loads(tokens_jwks(broker))["keys"][0]).encode(),
    ]
    for secret in secrets_to_try:
        header = {"alg": "HS256", "typ": "at+jwt", "kid": signing.kid}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims_for(broker, key_id)).encode())}"
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        assert_refused(broker, blob, f"{signing_input}.{b64(sig)}")


def tokens_jwks(broker: Broker) -> str:
    return broker.tokens("producer").GetSigningKeys(tokens_pb2.GetSigningKeysRequest()).jwks_json


def test_another_signing_key(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    rogue = ec.generate_private_key(ec.SECP256R1())
    kid = broker.app.signing.ensure(TOKEN_PURPOSE, "local").kid
    for header_kid in (kid, "rogue"):
        token = jwt.encode(
            claims_for(broker, key_id),
            rogue,
            algorithm="ES256",
            headers={"kid": header_kid, "typ": "at+jwt"},
        )
        assert_refused(broker, blob, token)
    # The audit signing key is the broker's too, but not for tokens.
    audit_key = next(k for k in broker.app.signing.all() if k.purpose == "audit")
    body = json.dumps(claims_for(broker, key_id)).encode()
    forged = broker.app.signing.sign_jws("audit", body, {"typ": "at+jwt"})
    assert json.loads(base64.urlsafe_b64decode(forged.split(".")[0] + "=="))["kid"] == audit_key.kid
    assert_refused(broker, blob, forged)


def test_expired_and_exp_equal_to_now(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    issued = issue(broker, key_id, ttl=Duration(seconds=60))
    broker.clock.offset = timedelta(seconds=61)
    assert "expired" in assert_refused(broker, blob, issued.token)
    broker.clock.offset = timedelta(0)
    exp = int(datetime.now(UTC).timestamp()) + 30
    token = hsm_signed(broker, claims_for(broker, key_id, exp=exp))
    broker.clock.frozen = datetime.fromtimestamp(exp, UTC)
    assert "expired" in assert_refused(broker, blob, token)
    broker.clock.frozen = datetime.fromtimestamp(exp - 1, UTC)
    assert decrypt(broker, blob, token).plaintext


def test_not_yet_valid_beyond_leeway(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    now = int(datetime.now(UTC).timestamp())
    broker.clock.frozen = datetime.fromtimestamp(now, UTC)
    for over in ({"nbf": now + 6}, {"iat": now + 6}):
        assert_refused(broker, blob, hsm_signed(broker, claims_for(broker, key_id, **over)))
    # Within the 5-second leeway.
    token = hsm_signed(broker, claims_for(broker, key_id, nbf=now + 5, iat=now + 5))
    assert decrypt(broker, blob, token).plaintext


def test_lifetime_above_maximum(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    now = int(datetime.now(UTC).timestamp())
    assert_refused(broker, blob, hsm_signed(broker, claims_for(broker, key_id, exp=now + 3601)))


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "cnf"])
def test_each_required_claim_missing(broker: Broker, setup, claim: str) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    claims = claims_for(broker, key_id)
    del claims[claim]
    assert_refused(broker, blob, hsm_signed(broker, claims))


def test_foreign_or_near_miss_audience_and_issuer(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    aud = broker.app.settings.audience
    for over in (
        {"aud": "urn:keybroker:other"},
        {"aud": aud + " "},
        {"aud": aud.upper()},
        {"aud": [aud, "urn:keybroker:other"]},
        {"aud": [aud]},
        {"iss": "urn:keybroker:other"},
        {"iss": broker.app.settings.issuer + "/"},
    ):
        assert_refused(broker, blob, hsm_signed(broker, claims_for(broker, key_id, **over)))


def test_duplicate_claims(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    claims = claims_for(broker, key_id)
    body = json.dumps(claims)[:-1] + ', "sub": "consumer"}'
    token = broker.app.signing.sign_jws(TOKEN_PURPOSE, body.encode(), {"typ": "at+jwt"})
    assert_refused(broker, blob, token)


def test_key_carrying_headers_are_refused_without_any_connection(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/jwks"
    connections: list[object] = []

    def accept() -> None:
        try:
            connections.append(listener.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    rogue = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(rogue.public_key()))
    for extra in ({"jku": url}, {"x5u": url}, {"jwk": jwk}, {"x5c": ["AAAA"]}):
        token = hsm_signed(broker, claims_for(broker, key_id), **extra)
        assert_refused(broker, blob, token)
    t.join()
    listener.close()
    assert connections == []


def test_typ_must_be_access_token(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    body = json.dumps(claims_for(broker, key_id)).encode()
    for typ in ("JWT", "at+JWT2", ""):
        token = broker.app.signing.sign_jws(TOKEN_PURPOSE, body, {"typ": typ})
        assert_refused(broker, blob, token)


def test_revoked_token(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    issued = issue(broker, key_id)
    assert decrypt(broker, blob, issued.token).plaintext
    broker.tokens("consumer").RevokeToken(tokens_pb2.RevokeTokenRequest(token_id=issued.token_id))
    assert "revoked" in assert_refused(broker, blob, issued.token)


def test_revocation_rights(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, _ = setup
    issued = issue(broker, key_id)
    code, _ = code_of(
        lambda: broker.tokens("producer").RevokeToken(
            tokens_pb2.RevokeTokenRequest(token_id=issued.token_id)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    broker.tokens("admin").RevokeToken(tokens_pb2.RevokeTokenRequest(token_id=issued.token_id))
    code, _ = code_of(
        lambda: broker.tokens("admin").RevokeToken(
            tokens_pb2.RevokeTokenRequest(token_id="no-such-token")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_replayed_from_another_client_certificate(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    token = issue(broker, key_id).token
    # Another principal's certificate.
    assert "another client certificate" in assert_refused(broker, blob, token, "producer")
    # A second certificate with the same name, issued by the same CA: the binding is to the
    # certificate, not the name.
    pki = broker.home / "pki"
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consumer")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (pki / "consumer-twin.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / "consumer-twin.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert_refused(broker, blob, token, "consumer-twin")


def test_token_for_another_key_or_context(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    other = create_key(broker)
    other_token = issue(broker, other).token
    code, _ = code_of(lambda: decrypt(broker, blob, other_token))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    narrow = issue(broker, key_id, {"dataset": "cohort-42", "site": "lyon"}).token
    code, msg = code_of(lambda: decrypt(broker, blob, narrow, {"dataset": "cohort-42"}))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "site" in msg


def test_token_does_not_open_admin_rpcs(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, _ = setup
    token = issue(broker, key_id).token
    code, _ = code_of(
        lambda: broker.keys("consumer").RotateKey(
            key_admin_pb2.RotateKeyRequest(key_id=key_id),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_withdrawn_grant_stops_issued_tokens(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    token = issue(broker, key_id).token
    from keybroker.v1 import resources_pb2

    from tests.integration.flows import ENCRYPT, grant

    broker.keys().UpdateKeyPolicy(
        key_admin_pb2.UpdateKeyPolicyRequest(
            key_id=key_id, policy=resources_pb2.KeyPolicy(grants=[grant("producer", ENCRYPT)])
        )
    )
    code, _ = code_of(lambda: decrypt(broker, blob, token))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_ttl_rules(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, _ = setup
    issued = issue(broker, key_id)
    lifetime = issued.expire_time.seconds - int(datetime.now(UTC).timestamp())
    assert 290 <= lifetime <= 300
    code, _ = code_of(lambda: issue(broker, key_id, ttl=Duration(seconds=3601)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(lambda: issue(broker, key_id, justification=" "))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    from keybroker.v1 import resources_pb2

    from tests.integration.flows import DECRYPT, grant

    short = create_key(
        broker, policy=resources_pb2.KeyPolicy(grants=[grant("consumer", DECRYPT, max_ttl=60)])
    )
    assert issue(broker, short).expire_time.seconds - int(datetime.now(UTC).timestamp()) <= 60
    code, msg = code_of(lambda: issue(broker, short, ttl=Duration(seconds=120)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "maximum" in msg


def test_admin_issues_for_another_subject(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    consumer_tp = thumbprint((broker.home / "pki" / "consumer.pem").read_bytes())
    issued = issue(
        broker, key_id, identity="admin", subject="consumer", subject_cert_thumbprint=consumer_tp
    )
    assert decrypt(broker, blob, issued.token).plaintext
    # Not usable by the admin itself, and non-admins may not issue for others.
    assert_refused(broker, blob, issued.token, "admin")
    code, _ = code_of(
        lambda: issue(
            broker,
            key_id,
            identity="consumer",
            subject="producer",
            subject_cert_thumbprint=consumer_tp,
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_jwks_lists_token_and_audit_keys(broker: Broker) -> None:
    jwks = json.loads(tokens_jwks(broker))
    purposes = sorted(k["keybroker_purpose"] for k in jwks["keys"])
    assert purposes == ["audit", "token"]
    for k in jwks["keys"]:
        assert k["kty"] == "EC" and k["crv"] == "P-256" and k["alg"] == "ES256"
        assert "d" not in k
    # A token verifies with the published key alone (what an offline verifier does).
    key_id = create_key(broker)
    token = issue(broker, key_id).token
    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(
        token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience=broker.app.settings.audience
    )
    assert claims["cnf"]["x5t#S256"] == thumbprint(
        (broker.home / "pki" / "consumer.pem").read_bytes()
    )
    assert claims["scope"]["key_id"] == key_id


def test_token_use_limit(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    key_id, blob = setup
    issued = issue(broker, key_id, max_uses=2)
    assert issued.max_uses == 2
    # A refused call (wrong context) does not use the token up.
    code, msg = code_of(lambda: decrypt(broker, blob, issued.token, {"dataset": "cohort-43"}))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # The message names the value the token requires and the one the request has.
    assert msg == (
        "the token requires context dataset='cohort-42', the request has dataset='cohort-43'"
    )
    code, msg = code_of(lambda: decrypt(broker, blob, issued.token, {"other": "x"}))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert msg == "the request's context does not carry the token's entry 'dataset'"
    for _ in range(2):
        assert decrypt(broker, blob, issued.token).plaintext
    request_id = rid()
    code, msg = code_of(lambda: decrypt(broker, blob, issued.token, request_id=request_id))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 allowed" in msg
    (event,) = events_for(broker, request_id)
    assert event.outcome == 2 and event.token_id == issued.token_id
    # Unlimited by default; out-of-range limits are refused.
    unlimited = issue(broker, key_id)
    for _ in range(3):
        assert decrypt(broker, blob, unlimited.token).plaintext
    code, _ = code_of(lambda: issue(broker, key_id, max_uses=10_001))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_use_limit_claim_is_signed(broker: Broker, setup) -> None:  # type: ignore[no-untyped-def]
    """The limit lives in the signed claims: a token whose limit is stripped does not verify."""
    key_id, blob = setup
    token = issue(broker, key_id, max_uses=1).token
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["scope"]["max_uses"] = 0
    forged = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    assert_refused(broker, blob, forged)
