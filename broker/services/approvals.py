"""The two-person rule: M of N admins approve the changes that could open or end a key's use.

With `approvals.required` = M > 1, `UpdateKeyPolicy`, `EnableKey` of a disabled key and
`ScheduleKeyDestruction` do not change the key: they store a pending `ApprovalRequest` (the
requester's own request counts as the first approval) and answer with it. M - 1 other admins
approve it with `ApproveRequest`; the approval that completes the quorum applies the change, in
one transaction with a compare-and-set on the key's revision at the time of the request, so the
change applies exactly once and never to a key that has changed since (that request fails,
saying why). A request not approved by its expiry time can no longer be approved.
With M = 1 every call goes straight to `KeyService`, exactly as without this service.

Every step is audited under its own operation (docs/lifecycle.md, "Approvals"):
`RequestApproval`, `ApproveRequest`, `ApplyApprovedChange` (allowed, or denied when stale),
`ExpireApprovalRequest`, `CancelApprovalRequest`, and the reads `GetApprovalRequest` and
`ListApprovalRequests`; each event's context names the request (`approval_request`).
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NoReturn

from broker.domain import (
    MAX_CONTEXT_VALUE_BYTES,
    Approval,
    ApprovalOperation,
    ApprovalRequest,
    ApprovalState,
    AuditOperation,
    Caller,
    Key,
    KeyPolicy,
    KeyState,
    Outcome,
    validate_key_id,
)
from broker.errors import (
    ConcurrentModification,
    FailedPrecondition,
    InvalidArgument,
    KeybrokerError,
    PermissionDenied,
    StoreUnavailable,
    Unavailable,
)
from broker.ports import ApprovalStore, Clock, KeyStore
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditDraft, AuditedService, AuditLog
from broker.services.keys import (
    CAS_ATTEMPTS,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    KeyService,
    policy_widening,
    validate_policy,
    widening_context,
)

#: The principal of the events the broker records itself (a request found expired).
APPROVALS_PRINCIPAL = "keybroker-approvals"
REQUEST_ID = re.compile(r"apr-\d{8}-\d{6}-[0-9a-f]{8}")
DEFAULT_EXPIRY = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class ApprovalSettings:
    """Settings `approvals.required` and `approvals.expiry`.

    Attributes:
        required: distinct admins who must approve, the requester counting as the first;
            1 applies changes at once.
        expiry: how long a request waits for its approvals.
    """

    required: int = 1
    expiry: timedelta = DEFAULT_EXPIRY


@dataclass(frozen=True, slots=True)
class Requested:
    """What a call of a gated change did.

    Attributes:
        key: the key as it stands (changed when `pending` is None).
        pending: the request waiting for approval, or None when the change was applied.
    """

    key: Key
    pending: ApprovalRequest | None = None


def new_request_id(now: datetime) -> str:
    """`apr-YYYYMMDD-HHMMSS-<8 hex>`: unguessable enough to be no handle of its own (every
    call is authorised anyway), and sorting by creation time for listings."""
    return f"apr-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


def validate_request_id(request_id: str) -> str:
    if not request_id:
        raise InvalidArgument("request_id is required")
    if not REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(
            "request_id must be an approval request id such as apr-20250301-120000-1a2b3c4d"
        )
    return request_id


def _encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        return validate_request_id(text)
    except (ValueError, InvalidArgument):
        raise InvalidArgument("page_token is not one this broker returned") from None


def _fit(text: str) -> str:
    """`text` cut to what an audit context value holds."""
    raw = text.encode("utf-8")
    if len(raw) <= MAX_CONTEXT_VALUE_BYTES:
        return text
    return raw[: MAX_CONTEXT_VALUE_BYTES - 3].decode("utf-8", "ignore") + "..."


def audit_context(request: ApprovalRequest) -> dict[str, str]:
    """What an approval event's context says of its request: its id, the change, who asked,
    who approved so far, and how a requested policy widens the key's."""
    return {
        "approval_request": request.request_id,
        "change": request.operation.value,
        "requester": _fit(request.requester),
        "approvals": _fit(
            f"{len(request.approvals)}/{request.required}: " + ",".join(request.approvers())
        ),
        **widening_context(request.widening),
    }


def _state_text(request: ApprovalRequest) -> str:
    text = f"approval request {request.request_id} is {request.state.value}"
    return f"{text} ({request.reason})" if request.reason else text


class ApprovalService(AuditedService):
    """Gated key changes and the approval requests they make.

    Args:
        store: the approval requests.
        keys: key metadata (read to check and apply changes).
        key_service: the key rules: what each change does and when it is refused.
        access: role checks.
        audit: the audit trail.
        clock: the time source.
        limiter: per-principal rate limit.
        settings: M and the expiry.
    """

    def __init__(
        self,
        store: ApprovalStore,
        keys: KeyStore,
        key_service: KeyService,
        access: Access,
        audit: AuditLog,
        clock: Clock,
        limiter: RateLimiter,
        settings: ApprovalSettings | None = None,
    ) -> None:
        super().__init__(audit, limiter)
        self._store = store
        self._keys = keys
        self._key_service = key_service
        self._access = access
        self._clock = clock
        self._settings = settings or ApprovalSettings()

    @property
    def required(self) -> int:
        return self._settings.required

    # The gated changes ---------------------------------------------------------------------

    def update_policy(self, caller: Caller, key_id: str, policy: KeyPolicy) -> Requested:
        """`UpdateKeyPolicy`: applied at once with M = 1, else a pending request that says
        how the policy widens the key's (`policy_widening`)."""
        if self.required <= 1:
            return Requested(self._key_service.update_policy(caller, key_id, policy))
        with self._call(caller, AuditOperation.UPDATE_KEY_POLICY, key_id=key_id) as draft:
            self._access.require_admin(caller)
            validate_policy(policy)
            key = self._keys.get_key(validate_key_id(key_id))
            # Refused now rather than after the approvals: the same check runs again then.
            self._key_service.policy_change(key_id, policy)(key)
            pending = self._open(
                draft,
                caller,
                key,
                ApprovalOperation.UPDATE_KEY_POLICY,
                policy=policy,
                widening=policy_widening(key.policy, policy),
            )
            return Requested(key, pending)

    def enable(self, caller: Caller, key_id: str) -> Requested:
        """`EnableKey`: with M > 1 enabling a disabled key is a pending request; an enabled
        key stays as it is (nothing to approve)."""
        if self.required <= 1:
            return Requested(self._key_service.set_enabled(caller, key_id, True))
        with self._call(caller, AuditOperation.ENABLE_KEY, key_id=key_id) as draft:
            self._access.require_admin(caller)
            key = self._keys.get_key(validate_key_id(key_id))
            KeyService.enabled_change(key_id, True)(key)
            if key.state is KeyState.ENABLED:
                return Requested(key)
            return Requested(key, self._open(draft, caller, key, ApprovalOperation.ENABLE_KEY))

    def schedule_destruction(
        self, caller: Caller, key_id: str, pending_window: timedelta | None
    ) -> Requested:
        """`ScheduleKeyDestruction`: with M > 1 a pending request; once applied, the key is
        destroyed `pending_window` after the application (not after the request)."""
        if self.required <= 1:
            key = self._key_service.schedule_destruction(caller, key_id, pending_window)
            return Requested(key)
        operation = AuditOperation.SCHEDULE_KEY_DESTRUCTION
        with self._call(caller, operation, key_id=key_id) as draft:
            self._access.require_admin(caller)
            window = self._key_service.destruction_window(pending_window)
            key = self._keys.get_key(validate_key_id(key_id))
            self._key_service.destruction_change(key_id, window)(key)
            pending = self._open(
                draft, caller, key, ApprovalOperation.SCHEDULE_KEY_DESTRUCTION, window=window
            )
            return Requested(key, pending)

    def _open(
        self,
        draft: AuditDraft,
        caller: Caller,
        key: Key,
        operation: ApprovalOperation,
        *,
        policy: KeyPolicy | None = None,
        window: timedelta | None = None,
        widening: tuple[str, ...] = (),
    ) -> ApprovalRequest:
        """Stores a new pending request against `key` as it stands, and makes the call's
        audit event its `RequestApproval` event."""
        now = self._clock.now()
        request = ApprovalRequest(
            request_id=new_request_id(now),
            operation=operation,
            key_id=key.key_id,
            requester=caller.principal,
            create_time=now,
            expire_time=now + self._settings.expiry,
            required=self.required,
            key_revision=key.revision,
            policy=policy,
            pending_window=window,
            widening=widening,
            approvals=(Approval(caller.principal, now),),
        )
        self._store.create_approval(request)
        draft.operation = AuditOperation.REQUEST_APPROVAL
        draft.context = audit_context(request)
        return request

    # Approving -----------------------------------------------------------------------------

    def approve(self, caller: Caller, request_id: str) -> tuple[ApprovalRequest, Key]:
        """Adds the caller's approval; the one that completes the quorum applies the change.

        Returns:
            The request as stored (APPLIED, or still PENDING) and the key as it stands.

        Raises:
            PermissionDenied: the caller is no admin, or is the requester.
            FailedPrecondition: the request is not pending (applied, failed, cancelled,
                expired), the caller approved it already, or the key changed since the
                request (the request is then FAILED, with that reason).
            NotFound: there is no such request.
        """
        with self._call(caller, AuditOperation.APPROVE_REQUEST) as draft:
            draft.context = {"approval_request": validate_request_id(request_id)}
            self._access.require_admin(caller)
            for _ in range(CAS_ATTEMPTS):
                request = self._store.get_approval(request_id)
                draft.key_id = request.key_id
                if caller.principal == request.requester:
                    raise PermissionDenied(
                        f"{caller.principal!r} asked for approval request {request_id} and "
                        "cannot approve it too: another admin must"
                    )
                self._require_pending(caller, request)
                if caller.principal in request.approvers():
                    raise FailedPrecondition(
                        f"{caller.principal!r} has already approved request {request_id}; "
                        f"it needs {request.required - len(request.approvals)} more admin(s)"
                    )
                now = self._clock.now()
                approved = request.evolve(
                    approvals=(*request.approvals, Approval(caller.principal, now))
                )
                draft.context = audit_context(approved)
                try:
                    if len(approved.approvals) < approved.required:
                        stored = self._store.update_approval(approved, request.revision)
                        return stored, self._keys.get_key(request.key_id)
                    return self._apply(caller, approved, request.revision, now)
                except ConcurrentModification:
                    continue  # another approval, a cancel or a key change: look again
            raise StoreUnavailable(
                f"approval request {request_id} is being changed by others; retry"
            )

    def _apply(
        self, caller: Caller, approved: ApprovalRequest, expected_revision: int, now: datetime
    ) -> tuple[ApprovalRequest, Key]:
        """Applies the approved change to the key at the request's revision, with the
        request's completion, in one transaction; a stale request fails instead.

        Raises:
            ConcurrentModification: the request or the key changed meanwhile (nothing stored).
            FailedPrecondition: the key changed since the request, or the change is no longer
                allowed; the request is stored as FAILED.
        """
        key = self._keys.get_key(approved.key_id)
        if key.revision != approved.key_revision:
            self._fail(
                caller,
                approved,
                expected_revision,
                now,
                f"key {key.key_id!r} has changed since the request was made: the change was "
                "not applied; ask again against the key as it stands",
            )
        try:
            changed = self._change_of(approved)(key)
        except Unavailable:
            raise
        except KeybrokerError as exc:
            self._fail(
                caller, approved, expected_revision, now, f"no longer allowed: {exc.message}"
            )
        applied = approved.evolve(
            state=ApprovalState.APPLIED, close_time=now, closed_by=caller.principal
        )
        stored, stored_key = self._store.apply_approval(
            applied, expected_revision, changed, key.revision
        )
        self._record(caller, AuditOperation.APPLY_APPROVED_CHANGE, stored, Outcome.ALLOWED, "")
        return stored, stored_key

    def _fail(
        self,
        caller: Caller,
        approved: ApprovalRequest,
        expected_revision: int,
        now: datetime,
        reason: str,
    ) -> NoReturn:
        """Stores the request as FAILED, audits it, and raises FailedPrecondition(reason)."""
        failed = approved.evolve(
            state=ApprovalState.FAILED, reason=reason, close_time=now, closed_by=caller.principal
        )
        stored = self._store.update_approval(failed, expected_revision)
        self._record(caller, AuditOperation.APPLY_APPROVED_CHANGE, stored, Outcome.DENIED, reason)
        raise FailedPrecondition(f"approval request {approved.request_id} failed: {reason}")

    def _change_of(self, request: ApprovalRequest) -> Callable[[Key], Key]:
        """The change a request holds, as `KeyService` makes it."""
        if request.operation is ApprovalOperation.UPDATE_KEY_POLICY:
            assert request.policy is not None
            return self._key_service.policy_change(request.key_id, request.policy)
        if request.operation is ApprovalOperation.ENABLE_KEY:
            return KeyService.enabled_change(request.key_id, True)
        assert request.pending_window is not None
        return self._key_service.destruction_change(request.key_id, request.pending_window)

    # Reading and cancelling ----------------------------------------------------------------

    def get(self, caller: Caller, request_id: str) -> ApprovalRequest:
        """One request (a pending one past its expiry is expired first). Admin or auditor."""
        with self._call(caller, AuditOperation.GET_APPROVAL_REQUEST) as draft:
            draft.context = {"approval_request": validate_request_id(request_id)}
            self._access.require_reader(caller)
            request = self._store.get_approval(request_id)
            draft.key_id = request.key_id
            return self._current(caller, request)

    def list(
        self,
        caller: Caller,
        state: ApprovalState | None,
        key_id: str,
        page_size: int,
        page_token: str,
    ) -> tuple[list[ApprovalRequest], str]:
        """A page of requests in creation order, of one state and one key when given.
        Admin or auditor.

        A page may hold fewer than `page_size` requests when some were found expired on the
        way (a pending request past its expiry is expired, and listed as such); the token
        still leads to the rest.
        """
        with self._call(caller, AuditOperation.LIST_APPROVAL_REQUESTS, key_id=key_id):
            self._access.require_reader(caller)
            if key_id:
                validate_key_id(key_id)
            if page_size < 0:
                raise InvalidArgument("page_size must not be negative")
            size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            after = _decode_page_token(page_token)
            rows = self._store.list_approvals(after, size + 1, _stored_states(state), key_id)
            more = len(rows) > size
            rows = rows[:size]
            current = [self._current(caller, r) for r in rows]
            if state is not None:
                current = [r for r in current if r.state is state]
            return current, _encode_page_token(rows[-1].request_id) if more else ""

    def cancel(self, caller: Caller, request_id: str) -> ApprovalRequest:
        """Withdraws a pending request. Its requester, or an admin.

        Raises:
            PermissionDenied: the caller is neither.
            FailedPrecondition: the request is no longer pending.
        """
        with self._call(caller, AuditOperation.CANCEL_APPROVAL_REQUEST) as draft:
            draft.context = {"approval_request": validate_request_id(request_id)}
            for _ in range(CAS_ATTEMPTS):
                request = self._store.get_approval(request_id)
                draft.key_id = request.key_id
                if caller.principal != request.requester:
                    self._access.require_admin(caller)
                self._require_pending(caller, request)
                cancelled = request.evolve(
                    state=ApprovalState.CANCELLED,
                    reason=f"cancelled by {caller.principal}",
                    close_time=self._clock.now(),
                    closed_by=caller.principal,
                )
                draft.context = audit_context(cancelled)
                try:
                    return self._store.update_approval(cancelled, request.revision)
                except ConcurrentModification:
                    continue
            raise StoreUnavailable(
                f"approval request {request_id} is being changed by others; retry"
            )

    # Expiry --------------------------------------------------------------------------------

    def _require_pending(self, caller: Caller, request: ApprovalRequest) -> None:
        """Raises FailedPrecondition unless the request is pending and not past its expiry
        (then it is expired first, and audited)."""
        current = self._current(caller, request)
        if current.state is not ApprovalState.PENDING:
            raise FailedPrecondition(_state_text(current))

    def _current(self, caller: Caller, request: ApprovalRequest) -> ApprovalRequest:
        """The request as it stands now: a pending one past its expiry becomes EXPIRED (stored
        and audited once, by whichever call notices first)."""
        if not request.past_expiry(self._clock.now()):
            return request
        expired = request.evolve(
            state=ApprovalState.EXPIRED,
            reason=(
                f"expired at {request.expire_time.isoformat()} with {len(request.approvals)} "
                f"of {request.required} approvals"
            ),
            close_time=self._clock.now(),
            closed_by=APPROVALS_PRINCIPAL,
        )
        try:
            stored = self._store.update_approval(expired, request.revision)
        except ConcurrentModification:
            return self._store.get_approval(request.request_id)
        system = Caller(APPROVALS_PRINCIPAL, "", caller.request_id)
        self._record(
            system, AuditOperation.EXPIRE_APPROVAL_REQUEST, stored, Outcome.ALLOWED, stored.reason
        )
        return stored

    def _record(
        self,
        caller: Caller,
        operation: AuditOperation,
        request: ApprovalRequest,
        outcome: Outcome,
        reason: str,
    ) -> None:
        """An event of its own beside the call's (the application, the expiry), durable on
        return."""
        draft = AuditDraft(
            caller=caller,
            operation=operation,
            key_id=request.key_id,
            context=audit_context(request),
        )
        self._audit.record(draft, outcome, reason)


def _stored_states(state: ApprovalState | None) -> Sequence[ApprovalState]:
    """The stored states a listing of `state` reads: expired requests may still be stored as
    pending until a call notices them."""
    if state is None:
        return ()
    if state is ApprovalState.EXPIRED:
        return (ApprovalState.PENDING, ApprovalState.EXPIRED)
    return (state,)
