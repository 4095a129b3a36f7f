"""The two-person rule through gRPC over mutual TLS on SoftHSM2, on the store of the run
(SQLite, or PostgreSQL with --store=postgres): with approvals.required = 2 a policy change,
the enabling of a disabled key and a scheduled destruction wait for a second admin; the
requester and non-admins cannot approve; two racing approvals apply the change once; a
request on a key changed since, or past its expiry, is refused; every step is audited."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result
from google.protobuf.duration_pb2 import Duration
from keybroker.v1 import audit_pb2, key_admin_pb2, resources_pb2
from keybroker_client import KeybrokerClient
from keybroker_client import types as sdk_types
from keybroker_client.cli import cli
from keybroker_client.errors import ApprovalPending
from keybroker_client.errors import PermissionDenied as PermissionDeniedError

from broker.devpki import issue_dev_identity
from broker.domain import ApprovalOperation, ApprovalRequest, ApprovalState
from broker.errors import ConcurrentModification
from tests.broker_fixtures import Broker, start_broker
from tests.integration.flows import DECRYPT, code_of, create_key, grant, standard_policy

EXPIRY = 3600  # seconds
PENDING = key_admin_pb2.APPROVAL_STATE_PENDING
APPLIED = key_admin_pb2.APPROVAL_STATE_APPLIED
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def admins(hsm_home: Path) -> tuple[str, str]:
    """Two more admin identities beside `admin`, from the development CA."""
    names = (f"sec-b-{uuid.uuid4().hex[:8]}", f"sec-c-{uuid.uuid4().hex[:8]}")
    for name in names:
        issue_dev_identity(hsm_home / "pki", name)
    return names


@pytest.fixture(scope="module")
def two(
    hsm_home: Path, tmp_path_factory: pytest.TempPathFactory, admins: tuple[str, str]
) -> Iterator[Broker]:
    """A broker whose key changes need two admins out of admin and the two of `admins`."""
    b = start_broker(
        hsm_home,
        database=tmp_path_factory.mktemp("approvals") / "kb.db",
        admins=("admin", *admins),
        approvals_required=2,
        approvals_expiry=float(EXPIRY),
        keys_min_destruction_window=60.0,
        keys_scheduler_interval=0.0,
    )
    yield b
    b.close()


def get_key(b: Broker, key_id: str) -> resources_pb2.Key:
    return b.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)).key


def approve(b: Broker, identity: str, request_id: str) -> key_admin_pb2.ApproveRequestResponse:
    return b.keys(identity).ApproveRequest(
        key_admin_pb2.ApproveRequestRequest(request_id=request_id)
    )


def get_request(b: Broker, request_id: str) -> key_admin_pb2.ApprovalRequest:
    request = key_admin_pb2.GetApprovalRequestRequest(request_id=request_id)
    return b.keys("auditor").GetApprovalRequest(request).approval_request


def events(b: Broker, key_id: str, operation: str) -> list[resources_pb2.AuditEvent]:
    request = audit_pb2.ListAuditEventsRequest(key_id=key_id, operation=operation)
    return [r.event for r in b.audit().ListAuditEvents(request)]


def request_events(b: Broker, request_id: str, operation: str) -> list[resources_pb2.AuditEvent]:
    """The events of one approval request (a refused caller's event names no key)."""
    request = audit_pb2.ListAuditEventsRequest(operation=operation)
    found = [r.event for r in b.audit().ListAuditEvents(request)]
    return [e for e in found if e.context["approval_request"] == request_id]


def widened_policy() -> resources_pb2.KeyPolicy:
    return standard_policy(allowed_jurisdictions=["FR", "US"])


def test_one_admin_is_enough_by_default(broker: Broker) -> None:
    """The embedded default (approvals.required = 1): applied at once, as before."""
    key_id = create_key(broker)
    response = broker.keys().UpdateKeyPolicy(
        key_admin_pb2.UpdateKeyPolicyRequest(key_id=key_id, policy=widened_policy())
    )
    assert not response.HasField("approval_request")
    assert list(response.key.policy.allowed_jurisdictions) == ["FR", "US"]
    (event,) = events(broker, key_id, "UpdateKeyPolicy")
    assert event.context["widening"] == "jurisdictions widened: +US"


def test_a_policy_change_waits_for_another_admin(two: Broker, admins: tuple[str, str]) -> None:
    key_id = create_key(two)
    response = two.keys("admin").UpdateKeyPolicy(
        key_admin_pb2.UpdateKeyPolicyRequest(key_id=key_id, policy=widened_policy())
    )
    pending = response.approval_request
    assert response.HasField("approval_request") and pending.state == PENDING
    assert pending.operation == key_admin_pb2.APPROVAL_OPERATION_UPDATE_KEY_POLICY
    assert pending.requester == "admin" and pending.required_approvals == 2
    assert [a.principal for a in pending.approvals] == ["admin"]
    assert pending.widening and list(pending.widening_summary) == ["jurisdictions widened: +US"]
    assert list(pending.policy.allowed_jurisdictions) == ["FR", "US"]
    assert list(get_key(two, key_id).policy.allowed_jurisdictions) == []  # not applied

    # Neither the requester nor anyone without the admin role may approve.
    code, message = code_of(lambda: approve(two, "admin", pending.request_id))
    assert code == DENIED and "cannot approve it too" in message
    for identity in ("auditor", "producer"):
        code, _ = code_of(lambda i=identity: approve(two, i, pending.request_id))  # type: ignore[misc]
        assert code == DENIED
    assert get_request(two, pending.request_id).state == PENDING

    done = approve(two, admins[0], pending.request_id)
    assert done.approval_request.state == APPLIED
    assert done.approval_request.closed_by == admins[0]
    assert list(done.key.policy.allowed_jurisdictions) == ["FR", "US"]
    assert list(get_key(two, key_id).policy.allowed_jurisdictions) == ["FR", "US"]
    assert code_of(lambda: approve(two, admins[1], pending.request_id))[0] == PRECONDITION

    (requested,) = events(two, key_id, "RequestApproval")
    assert requested.principal == "admin" and requested.outcome == resources_pb2.OUTCOME_ALLOWED
    assert requested.context["approval_request"] == pending.request_id
    assert requested.context["widening"] == "jurisdictions widened: +US"
    approvals = [
        (e.principal, e.outcome) for e in request_events(two, pending.request_id, "ApproveRequest")
    ]
    assert approvals == [
        ("admin", resources_pb2.OUTCOME_DENIED),
        ("auditor", resources_pb2.OUTCOME_DENIED),
        ("producer", resources_pb2.OUTCOME_DENIED),
        (admins[0], resources_pb2.OUTCOME_ALLOWED),
        (admins[1], resources_pb2.OUTCOME_DENIED),
    ]
    (applied,) = events(two, key_id, "ApplyApprovedChange")
    assert applied.principal == admins[0] and applied.outcome == resources_pb2.OUTCOME_ALLOWED
    assert applied.context["approvals"] == f"2/2: admin,{admins[0]}"
    assert events(two, key_id, "UpdateKeyPolicy") == []


def test_two_racing_approvals_apply_the_change_exactly_once(
    two: Broker, admins: tuple[str, str]
) -> None:
    key_id = create_key(two)
    revision = two.app.store.get_key(key_id).revision
    narrower = standard_policy()
    narrower.grants[1].max_token_ttl.CopyFrom(Duration(seconds=300))
    pending = (
        two.keys()
        .UpdateKeyPolicy(key_admin_pb2.UpdateKeyPolicyRequest(key_id=key_id, policy=narrower))
        .approval_request
    )
    assert not pending.widening
    start = threading.Barrier(len(admins))
    results: dict[str, Any] = {}

    def run(identity: str) -> None:
        start.wait(timeout=30)
        try:
            results[identity] = approve(two, identity, pending.request_id)
        except grpc.RpcError as exc:
            results[identity] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in admins]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ok = [r for r in results.values() if not isinstance(r, grpc.RpcError)]
    refused = [r for r in results.values() if isinstance(r, grpc.RpcError)]
    assert len(ok) == 1 and len(refused) == 1
    assert ok[0].approval_request.state == APPLIED
    assert refused[0].code() == PRECONDITION
    assert two.app.store.get_key(key_id).revision == revision + 1
    assert get_key(two, key_id).policy.grants[1].max_token_ttl.seconds == 300
    assert len(events(two, key_id, "ApplyApprovedChange")) == 1


def test_the_store_applies_one_request_once_among_racing_writers(two: Broker) -> None:
    """The store's own guarantee, under the service: racing `apply_approval`s of one request
    at one revision, on separate connections, commit exactly once."""
    key_id = create_key(two)
    store = two.app.store
    key = store.get_key(key_id)
    now = two.clock.now()
    request = ApprovalRequest(
        request_id=f"apr-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}",
        operation=ApprovalOperation.ENABLE_KEY,
        key_id=key_id,
        requester="admin",
        create_time=now,
        expire_time=now + timedelta(hours=1),
        required=2,
        key_revision=key.revision,
    )
    store.create_approval(request)
    applied = request.evolve(state=ApprovalState.APPLIED, closed_by="x", close_time=now)
    changed = key.evolve(description="changed once")
    start = threading.Barrier(4)
    outcomes: list[str] = []

    def run() -> None:
        start.wait(timeout=30)
        try:
            store.apply_approval(applied, request.revision, changed, key.revision)
            outcomes.append("applied")
        except ConcurrentModification:
            outcomes.append("refused")

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["applied", "refused", "refused", "refused"]
    assert store.get_key(key_id).revision == key.revision + 1
    assert store.get_approval(request.request_id).state is ApprovalState.APPLIED


def test_a_request_on_a_key_changed_since_is_refused(two: Broker, admins: tuple[str, str]) -> None:
    key_id = create_key(two)
    request = key_admin_pb2.ScheduleKeyDestructionRequest(
        key_id=key_id, pending_window=Duration(seconds=120)
    )
    pending = two.keys().ScheduleKeyDestruction(request).approval_request
    assert pending.operation == key_admin_pb2.APPROVAL_OPERATION_SCHEDULE_KEY_DESTRUCTION
    assert pending.pending_window.seconds == 120
    # Someone changes the key meanwhile (disabling needs no approval).
    two.keys(admins[1]).DisableKey(key_admin_pb2.DisableKeyRequest(key_id=key_id))
    code, message = code_of(lambda: approve(two, admins[0], pending.request_id))
    assert code == PRECONDITION and "has changed since the request" in message
    stored = get_request(two, pending.request_id)
    assert stored.state == key_admin_pb2.APPROVAL_STATE_FAILED
    assert "has changed since the request" in stored.reason
    assert get_key(two, key_id).state == resources_pb2.KEY_STATE_DISABLED  # not pending destruction
    (stale,) = events(two, key_id, "ApplyApprovedChange")
    assert stale.outcome == resources_pb2.OUTCOME_DENIED and "changed since" in stale.reason


def test_an_expired_request_cannot_be_approved(two: Broker, admins: tuple[str, str]) -> None:
    key_id = create_key(two)
    two.keys().DisableKey(key_admin_pb2.DisableKeyRequest(key_id=key_id))
    response = two.keys().EnableKey(key_admin_pb2.EnableKeyRequest(key_id=key_id))
    pending = response.approval_request
    assert pending.operation == key_admin_pb2.APPROVAL_OPERATION_ENABLE_KEY
    assert response.key.state == resources_pb2.KEY_STATE_DISABLED
    two.clock.offset = timedelta(seconds=EXPIRY + 1)
    try:
        code, message = code_of(lambda: approve(two, admins[0], pending.request_id))
    finally:
        two.clock.offset = timedelta(0)
    assert code == PRECONDITION and "is expired" in message
    assert get_request(two, pending.request_id).state == key_admin_pb2.APPROVAL_STATE_EXPIRED
    assert get_key(two, key_id).state == resources_pb2.KEY_STATE_DISABLED
    (expired,) = events(two, key_id, "ExpireApprovalRequest")
    assert expired.principal == "keybroker-approvals"
    assert expired.context["approval_request"] == pending.request_id


def test_list_get_and_cancel(two: Broker, admins: tuple[str, str]) -> None:
    key_id = create_key(two)
    pending = (
        two.keys(admins[1])
        .UpdateKeyPolicy(
            key_admin_pb2.UpdateKeyPolicyRequest(
                key_id=key_id, policy=resources_pb2.KeyPolicy(grants=[grant("consumer", DECRYPT)])
            )
        )
        .approval_request
    )
    listed = two.keys("auditor").ListApprovalRequests(
        key_admin_pb2.ListApprovalRequestsRequest(state=PENDING, key_id=key_id)
    )
    assert [r.request_id for r in listed.approval_requests] == [pending.request_id]
    cancel = key_admin_pb2.CancelApprovalRequestRequest(request_id=pending.request_id)
    assert code_of(lambda: two.keys("producer").CancelApprovalRequest(cancel))[0] == DENIED
    cancelled = two.keys(admins[1]).CancelApprovalRequest(cancel).approval_request
    assert cancelled.state == key_admin_pb2.APPROVAL_STATE_CANCELLED
    assert code_of(lambda: approve(two, "admin", pending.request_id))[0] == PRECONDITION
    listed = two.keys("auditor").ListApprovalRequests(
        key_admin_pb2.ListApprovalRequestsRequest(state=PENDING, key_id=key_id)
    )
    assert list(listed.approval_requests) == []
    bad = key_admin_pb2.GetApprovalRequestRequest(request_id="nope")
    assert code_of(lambda: two.keys("auditor").GetApprovalRequest(bad))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    outcomes = [
        (e.principal, e.outcome)
        for e in request_events(two, pending.request_id, "CancelApprovalRequest")
    ]
    assert outcomes == [
        ("producer", resources_pb2.OUTCOME_DENIED),
        (admins[1], resources_pb2.OUTCOME_ALLOWED),
    ]


# The SDK ----------------------------------------------------------------------------------


def sdk(b: Broker, identity: str) -> KeybrokerClient:
    pki = b.home / "pki"
    return KeybrokerClient(
        b.target,
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{identity}.key").read_bytes(),
        certificate_chain=(pki / f"{identity}.pem").read_bytes(),
    )


def test_sdk_raises_approval_pending_and_approves(two: Broker, admins: tuple[str, str]) -> None:
    key_id = create_key(two)
    with sdk(two, "admin") as alice, sdk(two, admins[0]) as bob:
        bob.disable_key(key_id)
        with pytest.raises(ApprovalPending) as info:
            alice.enable_key(key_id)
        pending = info.value.request
        assert info.value.key.state is sdk_types.KeyState.DISABLED
        assert pending.state is sdk_types.ApprovalState.PENDING
        assert pending.operation is sdk_types.ApprovalOperation.ENABLE_KEY
        assert [r.request_id for r in bob.iter_approval_requests(key_id=key_id)] == [
            pending.request_id
        ]
        with pytest.raises(PermissionDeniedError):
            alice.approve_request(pending.request_id)
        done = bob.approve_request(pending.request_id)
        assert done.state is sdk_types.ApprovalState.APPLIED
        assert [a.principal for a in done.approvals] == ["admin", admins[0]]
        assert alice.get_key(key_id).state is sdk_types.KeyState.ENABLED
        assert alice.get_approval_request(pending.request_id).closed_by == admins[0]


# The CLI ----------------------------------------------------------------------------------


def kb(b: Broker, identity: str, *args: str, input: str | None = None) -> Result:
    result = CliRunner().invoke(
        cli,
        ["--home", str(b.home), "--target", b.target, "--as", identity, *args],
        input=input,
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_cli_set_policy_shows_a_widening_asks_and_the_request_is_approved(
    two: Broker, admins: tuple[str, str]
) -> None:
    key_id = create_key(two)
    args = ("keys", "set-policy", key_id, "--grant", "producer:encrypt", "--jurisdiction", "FR",
            "--jurisdiction", "US")  # fmt: skip
    refused = kb(two, "admin", *args, input="n\n")
    assert refused.exit_code == 1
    assert "- jurisdictions: EU/EEA (default)" in refused.stderr
    assert "+ jurisdictions: FR, US" in refused.stderr
    assert "WIDENS" in refused.stderr and "jurisdictions widened: +US" in refused.stderr
    listed = kb(two, "auditor", "approvals", "list", "--key-id", key_id, "--json")
    assert listed.exit_code == 0 and listed.stdout == ""  # nothing was sent

    asked = kb(two, "admin", *args, "--yes")
    assert asked.exit_code == 0, asked.output
    assert "pending approval" in asked.stdout and "widening:" in asked.stdout
    (line,) = kb(two, "auditor", "approvals", "list", "--key-id", key_id).stdout.splitlines()[1:]
    request_id = line.split()[0]
    assert request_id in asked.stdout

    shown = kb(two, "auditor", "approvals", "show", request_id)
    assert "state:" in shown.stdout and "pending" in shown.stdout
    self_approval = kb(two, "admin", "approvals", "approve", request_id, "--yes")
    assert self_approval.exit_code == 6  # PERMISSION_DENIED
    approved = kb(two, admins[0], "approvals", "approve", request_id, input="y\n")
    assert approved.exit_code == 0, approved.output
    assert "approved and applied" in approved.stdout
    assert list(get_key(two, key_id).policy.allowed_jurisdictions) == ["FR", "US"]
    shown = kb(two, "auditor", "approvals", "list", "--state", "applied", "--key-id", key_id,
               "--json")  # fmt: skip
    assert '"state":"applied"' in shown.stdout


def test_cli_cancels_and_lists_by_state(two: Broker) -> None:
    key_id = create_key(two)
    asked = kb(
        two, "admin", "--json", "keys", "schedule-destruction", key_id, "--pending-window", "2m"
    )
    assert asked.exit_code == 0, asked.output
    request_id = json.loads(asked.stdout)["approval_request"]["request_id"]
    cancelled = kb(two, "admin", "approvals", "cancel", request_id)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    again = kb(two, "admin", "approvals", "cancel", request_id)
    assert again.exit_code == 9  # FAILED_PRECONDITION
    listed = kb(two, "auditor", "approvals", "list", "--state", "cancelled", "--key-id", key_id)
    assert request_id in listed.stdout
