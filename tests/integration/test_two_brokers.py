"""Two broker processes' worth of state in one database and one token: tokens, revocations,
keys and the audit chain are shared."""

from __future__ import annotations

from pathlib import Path

import grpc
from keybroker.v1 import audit_pb2, key_admin_pb2, tokens_pb2

from tests.broker_fixtures import start_broker
from tests.integration.flows import code_of, create_key, datakey, decrypt, issue


def test_revocation_on_one_broker_is_refused_by_the_other(hsm_home: Path, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    a = start_broker(hsm_home, database=db)
    b = start_broker(hsm_home, database=db)
    try:
        key_id = create_key(a)
        dk = datakey(a, key_id)
        issued = issue(a, key_id)
        # The other broker knows the key and trusts the token (same signing key in the HSM).
        assert decrypt(b, dk.wrapped_key, issued.token).plaintext == dk.plaintext_key
        a.tokens("consumer").RevokeToken(tokens_pb2.RevokeTokenRequest(token_id=issued.token_id))
        code, msg = code_of(lambda: decrypt(b, dk.wrapped_key, issued.token))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in msg
        # A rotation on one is seen by the other.
        b.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
        assert datakey(a, key_id).key_version == 2
        # Both append to one chain.
        result = a.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())
        assert result.ok and result.events_checked >= 8
    finally:
        a.close()
        b.close()


def test_use_limit_is_counted_across_brokers(hsm_home: Path, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    a = start_broker(hsm_home, database=db)
    b = start_broker(hsm_home, database=db)
    try:
        key_id = create_key(a)
        dk = datakey(a, key_id)
        token = issue(a, key_id, max_uses=1).token
        assert decrypt(a, dk.wrapped_key, token).plaintext == dk.plaintext_key
        code, _ = code_of(lambda: decrypt(b, dk.wrapped_key, token))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        a.close()
        b.close()
