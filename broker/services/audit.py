"""The audit trail: one hash-chained event per call, durable before the response leaves."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace

from broker.domain import (
    AuditEvent,
    AuditFilter,
    AuditOperation,
    Caller,
    Outcome,
    audit_digest,
    validate_context,
)
from broker.errors import InvalidArgument, KeybrokerError, Unavailable
from broker.ports import AuditStore, Clock
from broker.services.access import Access, RateLimiter

log = logging.getLogger(__name__)

MAX_REASON = 512
MAX_ID = 64
MAX_SEQUENCE = 2**63 - 1
MAX_JUSTIFICATION = 1024


@dataclass(slots=True)
class AuditDraft:
    """What a service learns about a call while it runs; becomes the call's audit event.

    `context` is the request's encryption context as received; `validated_context()` checks
    it, once per call, and the event keeps that checked copy.
    """

    caller: Caller
    operation: AuditOperation
    key_id: str = ""
    key_version: int = 0
    token_id: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    justification: str = ""
    _checked: dict[str, str] | None = field(default=None, init=False, repr=False)
    _invalid: bool = field(default=False, init=False, repr=False)

    def validated_context(self) -> dict[str, str]:
        """The request's context, checked against the limits the first time it is asked for.

        Raises:
            InvalidArgument: the context breaks a limit (see `validate_context`).
        """
        if self._checked is None:
            try:
                self._checked = validate_context(self.context)
            except InvalidArgument:
                self._invalid = True
                raise
        return self._checked

    def recorded_context(self) -> dict[str, str]:
        """What the event keeps: the checked context, or nothing when it is invalid."""
        if self._checked is None and not self._invalid:
            with suppress(InvalidArgument):
                self.validated_context()
        return self._checked or {}


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    events_checked: int
    first_bad_sequence: int
    error: str
    head_hash: str


class AuditLog:
    """Writes and reads the audit trail.

    Args:
        store: the append-only event table.
        clock: the time source for event times.
    """

    def __init__(self, store: AuditStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    @contextmanager
    def scope(
        self,
        caller: Caller,
        operation: AuditOperation,
        *,
        key_id: str = "",
        context: Mapping[str, str] | None = None,
        token_id: str = "",
        justification: str = "",
    ) -> Iterator[AuditDraft]:
        """Audits the block as one call.

        An unauthenticated caller is refused (and audited) before the block runs.
        The block fills in the draft as it learns the key, version, token and context. On
        success the event is ALLOWED, on a domain error DENIED (ERROR for an unavailable
        dependency or an unexpected exception), with the error's message as the reason.
        The event is durable when the block's caller continues; if it cannot be written,
        `AuditUnavailable` replaces whatever the block produced, so nothing leaves unaudited.
        """
        draft = AuditDraft(
            caller=caller,
            operation=operation,
            key_id=key_id,
            token_id=token_id,
            context=context if context is not None else {},
            justification=justification,
        )
        try:
            caller.require_authenticated()
            yield draft
        except KeybrokerError as exc:
            outcome = Outcome.ERROR if isinstance(exc, Unavailable) else Outcome.DENIED
            self.record(draft, outcome, exc.message)
            raise
        except Exception:
            self.record(draft, Outcome.ERROR, "internal error")
            raise
        self.record(draft, Outcome.ALLOWED, "")

    def record(self, draft: AuditDraft, outcome: Outcome, reason: str) -> AuditEvent:
        """Appends one event; raises AuditUnavailable when it cannot be made durable."""
        now = self._clock.now()
        # Fields come from the request and may be invalid or huge when the call is refused:
        # keep the record bounded, and an invalid context out of it.
        context = draft.recorded_context()

        def build(sequence: int, prev_hash: str) -> AuditEvent:
            event = AuditEvent(
                sequence=sequence,
                time=now,
                principal=draft.caller.principal,
                operation=draft.operation.value,
                key_id=draft.key_id[:MAX_ID],
                key_version=draft.key_version,
                token_id=draft.token_id[:MAX_ID],
                context=context,
                justification=draft.justification[:MAX_JUSTIFICATION],
                outcome=outcome,
                reason=reason[:MAX_REASON],
                request_id=draft.caller.request_id,
                prev_hash=prev_hash,
                hash="",
            )
            return replace(event, hash=audit_digest(event))

        return self._store.append(build)

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
        return self._store.events(flt)

    def verify(self) -> VerifyResult:
        """Walks the whole chain: contiguous sequence numbers from 1, each prev_hash equal
        to the previous event's hash, each hash recomputed. Stops at the first bad record.
        """
        expected_seq = 1
        prev = "0" * 64
        checked = 0
        for event in self._store.all_events():
            problem = ""
            if event.sequence != expected_seq:
                problem = f"sequence {event.sequence} where {expected_seq} was expected"
            elif event.prev_hash != prev:
                problem = "prev_hash does not match the previous event's hash"
            elif audit_digest(event) != event.hash:
                problem = "hash does not match the event's content"
            if problem:
                return VerifyResult(False, checked, expected_seq, problem, prev)
            prev = event.hash
            expected_seq += 1
            checked += 1
        return VerifyResult(True, checked, 0, "", prev)


class AuditedService:
    """Base of the services whose every call is audited and rate-limited.

    Args:
        audit: the audit trail.
        limiter: per-principal rate limit.
    """

    def __init__(self, audit: AuditLog, limiter: RateLimiter) -> None:
        self._audit = audit
        self._limiter = limiter

    @contextmanager
    def _call(
        self,
        caller: Caller,
        operation: AuditOperation,
        *,
        key_id: str = "",
        context: Mapping[str, str] | None = None,
        token_id: str = "",
        justification: str = "",
    ) -> Iterator[AuditDraft]:
        """Opens the call's audit scope (see `AuditLog.scope`) and applies the rate limit
        inside it, so a call refused by the limit is audited like any other refusal."""
        with self._audit.scope(
            caller,
            operation,
            key_id=key_id,
            context=context,
            token_id=token_id,
            justification=justification,
        ) as draft:
            self._limiter.check(caller.principal)
            yield draft


class AuditReader:
    """ListAuditEvents and VerifyAuditLog for auditors and admins; each read is audited.

    Args:
        log: the audit trail.
        access: role checks.
    """

    def __init__(self, log: AuditLog, access: Access) -> None:
        self._log = log
        self._access = access

    def list(self, caller: Caller, flt: AuditFilter) -> Iterator[AuditEvent]:
        with self._log.scope(caller, AuditOperation.LIST_AUDIT_EVENTS):
            self._access.require_reader(caller)
            if flt.start_time and flt.end_time and flt.start_time > flt.end_time:
                raise InvalidArgument("start_time is after end_time")
            if flt.after_sequence >= MAX_SEQUENCE:
                raise InvalidArgument(f"after_sequence must be below {MAX_SEQUENCE}")
        return self._log.events(flt)

    def verify(self, caller: Caller) -> VerifyResult:
        with self._log.scope(caller, AuditOperation.VERIFY_AUDIT_LOG):
            self._access.require_reader(caller)
            return self._log.verify()
