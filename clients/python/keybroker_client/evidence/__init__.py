"""The audit trail as evidence: canonical records, the event hash, signed records, and the
verifier shared by the broker (`VerifyAuditLog`, exports) and offline auditors.

Pure Python (json, hashlib, cryptography): no gRPC, no protobuf, so an auditor needs nothing
but an export and the broker's JWKS. docs/audit.md describes the format byte by byte.

    report = verify_export(open("audit.jsonl", "rb"), json.load(open("jwks.json")))
    if not report.ok:
        print(report.location, report.first_bad_chain, report.first_bad_sequence, report.error)

Destruction receipts (`verify_receipt`) are checked the same way, with the same JWKS.
"""

from keybroker_client.evidence.export import verify_export
from keybroker_client.evidence.receipt import (
    RECEIPT_JWS_TYPE,
    RECEIPT_TYPE,
    DestroyedVersion,
    DestructionReceipt,
    ReceiptInvalid,
    receipt_text,
    verify_receipt,
)
from keybroker_client.evidence.records import (
    AUDIT_PURPOSE,
    EVENT_BODY,
    GENESIS_HASH,
    JWS_TYPE,
    EvidenceError,
    Record,
    audit_keys,
    canonical,
    event_hash,
    event_problem,
    format_time,
    parse_time,
    signature_problem,
    signing_input,
)
from keybroker_client.evidence.verify import Report, TrailVerifier

__all__ = [
    "AUDIT_PURPOSE",
    "EVENT_BODY",
    "GENESIS_HASH",
    "JWS_TYPE",
    "RECEIPT_JWS_TYPE",
    "RECEIPT_TYPE",
    "DestroyedVersion",
    "DestructionReceipt",
    "EvidenceError",
    "ReceiptInvalid",
    "Record",
    "Report",
    "TrailVerifier",
    "audit_keys",
    "canonical",
    "event_hash",
    "event_problem",
    "format_time",
    "parse_time",
    "receipt_text",
    "signature_problem",
    "signing_input",
    "verify_export",
    "verify_receipt",
]
