"""The audit trail: one hash-chained event per call, durable before the response leaves."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from socket import gethostname

from keybroker_client.evidence import Report

from broker.domain import (
    AuditEvent,
    AuditFilter,
    AuditOperation,
    Caller,
    Outcome,
    validate_context,
)
from broker.errors import DeadlineExceeded, InvalidArgument, KeybrokerError, Unavailable
from broker.ports import AuditStore, Clock, Hsm
from broker.services import deadline
from broker.services.access import Access, RateLimiter
from broker.services.audit_checkpoints import AuditSigner, Checkpointer, CheckpointPolicy
from broker.services.audit_trail import TrailChecker
from broker.services.audit_writer import AfterCommit, AuditWriter, current_waits

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


def failure_outcome(exc: KeybrokerError) -> Outcome:
    """The outcome of a call that `exc` stopped: ERROR when the broker could not finish it (a
    dependency unavailable, the caller's deadline passed), DENIED when the call was refused."""
    return Outcome.ERROR if isinstance(exc, Unavailable | DeadlineExceeded) else Outcome.DENIED


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """How the trail is kept (settings `broker_id`, `audit.checkpoint_events`, `_seconds`).

    Attributes:
        broker_id: names this broker's chains (`<broker_id>-<12 hex>`) and anchors.
        checkpoint_events: sign the head after this many unsigned events...
        checkpoint_seconds: ... and at least this often while any event is unsigned.
    """

    broker_id: str = "keybroker-local"
    checkpoint_events: int = 1000
    checkpoint_seconds: float = 2.0


def _text(value: str, limit: int | None = None) -> str:
    """`value` as the trail keeps it: at most `limit` characters, and a NUL character (which a
    PostgreSQL text column cannot hold, so one refused request's NUL would fail the whole
    group-commit batch of other calls) as U+FFFD."""
    return value[:limit].replace("\x00", "\ufffd")


def new_chain_id(broker_id: str) -> str:
    """A fresh chain id for one writer process: `<broker_id>-<12 hex>`."""
    return f"{broker_id}-{secrets.token_hex(6)}"


class AuditLog:
    """Writes and reads the audit trail: this process's chain (group commit, signed
    checkpoints, HSM anchor), and verification and export of every chain.

    Opening it opens the process's chain: a signed chain record and its HSM anchor.

    Args:
        store: the audit tables.
        clock: the time source for event times.
        signer: the HSM audit key (`SigningKeys`).
        anchors: the HSM that keeps the chains' anchors (the audit key's); None for none.
        settings: broker id and checkpoint policy.
        after_commit: called by the writer thread with each batch of events once durable
            (the secondary sinks); it must neither block nor raise (what it raises is
            logged and swallowed).

    Raises:
        AuditUnavailable, HsmUnavailable: the chain cannot be opened.
    """

    def __init__(
        self,
        store: AuditStore,
        clock: Clock,
        signer: AuditSigner,
        *,
        anchors: Hsm | None = None,
        settings: AuditSettings | None = None,
        after_commit: AfterCommit | None = None,
    ) -> None:
        settings = settings or AuditSettings()
        self._clock = clock
        self._store = store
        self.chain = new_chain_id(settings.broker_id)
        policy = CheckpointPolicy(settings.checkpoint_events, settings.checkpoint_seconds)
        self.checkpoints = Checkpointer(store, signer, anchors, clock, self.chain, policy)
        self.checkpoints.open_chain(f"{settings.broker_id} pid {os.getpid()} on {gethostname()}")
        self.writer = AuditWriter(
            store, self.chain, after_commit=after_commit, on_durable=self.checkpoints.on_durable
        )
        self.checkpoints.start()
        self._trail = TrailChecker(store, signer, anchors, clock, settings.broker_id)

    def close(self) -> None:
        """Writes what is waiting, then the chain's closing checkpoint (clean shutdown)."""
        self.writer.close()
        self.checkpoints.close(self.writer.head)

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
        record_success: bool = True,
    ) -> Iterator[AuditDraft]:
        """Audits the block as one call.

        An unauthenticated caller is refused (and audited) before the block runs, and so is
        a call whose caller's deadline has already passed (`deadline`: DeadlineExceeded).
        The block fills in the draft as it learns the key, version, token and context. On
        success the event is ALLOWED, on a domain error DENIED (ERROR for an unavailable
        dependency, a passed deadline or an unexpected exception), with the error's
        `audit_reason` (its message, or more than the caller may learn) as the reason.
        The event is durable when the block's caller continues; if it cannot be written,
        `AuditUnavailable` replaces whatever the block produced, so nothing leaves unaudited.
        Inside `audit_writer.deferring` the scope does not wait: the event is counted in the
        call's `AuditWaits`, and the transport holds the response (or the error) until it is
        durable, and answers `AuditUnavailable` instead when it is not.
        With `record_success` false the block records its own events when it succeeds (a
        batch: one event per item); a refusal of the whole call is still recorded here.
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
            deadline.check(deadline.NOT_STARTED)
            yield draft
        except KeybrokerError as exc:
            self._append([self._event(draft, failure_outcome(exc), exc.audit_reason)])
            raise
        except Exception:
            self._append([self._event(draft, Outcome.ERROR, "internal error")])
            raise
        if record_success:
            self._append([self._event(draft, Outcome.ALLOWED, "")])

    def record(self, draft: AuditDraft, outcome: Outcome, reason: str) -> AuditEvent:
        """Appends one event and waits until it is durable, whoever calls (the stored event
        is returned, so no deferral applies).

        Raises:
            AuditUnavailable: it cannot be made durable.
        """
        return self.writer.append(self._event(draft, outcome, reason))

    def record_many(self, outcomes: Sequence[tuple[AuditDraft, Outcome, str]]) -> None:
        """Appends one event per (draft, outcome, reason), all durable on return (one commit
        for the lot when they fit one batch); inside `audit_writer.deferring`, durable before
        the call's response instead.

        Raises:
            AuditUnavailable: they could not all be made durable.
        """
        self._append([self._event(d, outcome, reason) for d, outcome, reason in outcomes])

    def _append(self, events: list[AuditEvent]) -> None:
        """Appends a call's events: waits until durable, or, inside `deferring`, hands them
        over and leaves the wait to the caller of the call (who answers nothing before)."""
        waits = current_waits()
        if waits is None:
            self.writer.append_many(events)
        else:
            self.writer.submit(events, waits)

    def _event(self, draft: AuditDraft, outcome: Outcome, reason: str) -> AuditEvent:
        # Fields come from the request and may be invalid or huge when the call is refused:
        # keep the record bounded, its text storable, and an invalid context out of it.
        return AuditEvent(
            sequence=0,
            time=self._clock.now(),
            principal=_text(draft.caller.principal),
            operation=draft.operation.value,
            key_id=_text(draft.key_id, MAX_ID),
            key_version=draft.key_version,
            token_id=_text(draft.token_id, MAX_ID),
            context=draft.recorded_context(),
            justification=_text(draft.justification, MAX_JUSTIFICATION),
            outcome=outcome,
            reason=_text(reason, MAX_REASON),
            request_id=_text(draft.caller.request_id),
            prev_hash="",
            hash="",
        )

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
        return self._store.events(flt)

    def verify(self) -> Report:
        """Walks every chain, checkpoint and HSM anchor; reports the first bad record (bad
        data is a report, never an exception)."""
        return self._trail.verify()

    def export(self, after_sequence: int) -> Iterator[bytes]:
        """Signs this chain's head, then yields the export lines (docs/audit.md).

        Raises:
            HsmUnavailable, AuditUnavailable: the trail cannot be read or signed.
        """
        self.checkpoints.checkpoint()
        return self._trail.export(after_sequence)


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
        cost: int = 1,
        record_success: bool = True,
    ) -> Iterator[AuditDraft]:
        """Opens the call's audit scope (see `AuditLog.scope`) and applies the rate limit
        inside it, so a call refused by the limit is audited like any other refusal. A batch
        passes its item count as `cost`."""
        with self._audit.scope(
            caller,
            operation,
            key_id=key_id,
            context=context,
            token_id=token_id,
            justification=justification,
            record_success=record_success,
        ) as draft:
            self._limiter.check(caller.principal, cost)
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

    def verify(self, caller: Caller) -> Report:
        with self._log.scope(caller, AuditOperation.VERIFY_AUDIT_LOG):
            self._access.require_reader(caller)
            return self._log.verify()

    def export(self, caller: Caller, after_sequence: int) -> Iterator[bytes]:
        """The export lines; the call is audited when it starts (the export includes it
        only if a later export covers it)."""
        with self._log.scope(caller, AuditOperation.EXPORT_AUDIT_LOG):
            self._access.require_reader(caller)
            if after_sequence >= MAX_SEQUENCE:
                raise InvalidArgument(f"after_sequence must be below {MAX_SEQUENCE}")
            lines = self._log.export(after_sequence)
        return lines
