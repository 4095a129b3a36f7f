"""Several brokers behind one client: which one to try next, and when a failed call may go on.

Brokers are stateless replicas (they share the database and the HSM), so any of them can serve
any call. What a client cannot always know is whether a call that failed with ``UNAVAILABLE``
was carried out before the failure: a reset connection may have delivered the request and lost
the answer. So each RPC has a retry rule (:data:`RETRY_RULES`):

- :attr:`Retry.ON_UNAVAILABLE`: repeating the call has no effect beyond the first (reads; new
  data keys and ciphertexts that nothing refers to yet; a revocation), so any ``UNAVAILABLE``
  sends it to the next broker.
- :attr:`Retry.IF_NOT_SENT`: the call changes something that a repetition would change again
  (a new key version, one more issued token, one more use of a use-counted token). It goes to
  the next broker only when this client never handed it to gRPC: before each attempt that has
  another broker behind it, the client waits (at most ``connect_timeout``) for that broker's
  channel to be ``READY``; a channel that fails to connect (refused, reset during the TLS
  handshake, unreachable, draining broker that closed its port) or stays not ready is skipped
  without sending anything. Once a request is handed to a ``READY`` channel it may have
  reached the broker, and a failure is raised to the caller.

Inside one channel gRPC adds its own transparent retry: a request that never left the client,
or that the server refused before reading it (``REFUSED_STREAM``, or a stream above the last one
a ``GOAWAY`` accepted), is retried by gRPC on the same channel. Calls are made with
``wait_for_ready=False``, so a channel that cannot connect fails the call at once.

This module holds the rules and the bookkeeping; :mod:`keybroker_client.client` and
:mod:`keybroker_client.aio` make the calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from keybroker_client.errors import ConfigError, DeadlineExceeded, KeybrokerError, Unavailable

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DOWN_SECONDS",
    "RETRY_RULES",
    "Attempt",
    "Call",
    "ChannelWatch",
    "Retry",
    "TargetPool",
    "attempts_for",
    "channel_options",
    "decrypt_retry",
    "failing_async",
    "parse_targets",
    "resolve_targets",
    "wait_ready_async",
]

#: Longest wait for a not-yet-connected broker before the next one is tried, in seconds.
DEFAULT_CONNECT_TIMEOUT = 2.0
#: How long a broker that failed a call is put behind the others, in seconds.
DOWN_SECONDS = 5.0


class Retry(enum.Enum):
    """When a call that failed with ``UNAVAILABLE`` may be repeated on the next broker."""

    ON_UNAVAILABLE = "on-unavailable"
    IF_NOT_SENT = "if-not-sent"


#: The retry rule of every keybroker.v1 RPC (docs/sdk.md explains each). ``Decrypt`` and
#: ``BatchDecrypt`` depend on the tokens: see :func:`decrypt_retry`.
RETRY_RULES: Mapping[str, Retry] = {
    # KeyAdmin
    "GetKey": Retry.ON_UNAVAILABLE,
    "ListKeys": Retry.ON_UNAVAILABLE,
    "CreateKey": Retry.IF_NOT_SENT,
    "RotateKey": Retry.IF_NOT_SENT,
    "UpdateKeyPolicy": Retry.IF_NOT_SENT,
    "EnableKey": Retry.IF_NOT_SENT,
    "DisableKey": Retry.IF_NOT_SENT,
    "ScheduleKeyDestruction": Retry.IF_NOT_SENT,
    "CancelKeyDestruction": Retry.IF_NOT_SENT,
    "SetMinDecryptionVersion": Retry.IF_NOT_SENT,
    "GetKeyUsage": Retry.ON_UNAVAILABLE,
    "GetDestructionReceipt": Retry.ON_UNAVAILABLE,
    "GetApprovalRequest": Retry.ON_UNAVAILABLE,
    "ListApprovalRequests": Retry.ON_UNAVAILABLE,
    "ApproveRequest": Retry.IF_NOT_SENT,
    "CancelApprovalRequest": Retry.IF_NOT_SENT,
    # Crypto
    "GenerateDataKey": Retry.ON_UNAVAILABLE,
    "GenerateDataKeys": Retry.ON_UNAVAILABLE,
    "Encrypt": Retry.ON_UNAVAILABLE,
    "ReWrap": Retry.ON_UNAVAILABLE,
    "Decrypt": Retry.IF_NOT_SENT,
    "BatchDecrypt": Retry.IF_NOT_SENT,
    # Each item is audited and the input is read as it goes: never repeated once sent.
    "ReWrapStream": Retry.IF_NOT_SENT,
    # Tokens
    "IssueToken": Retry.IF_NOT_SENT,
    "RevokeToken": Retry.ON_UNAVAILABLE,
    "GetSigningKeys": Retry.ON_UNAVAILABLE,
    # Audit (streams: only before their first event)
    "ListAuditEvents": Retry.ON_UNAVAILABLE,
    "ExportAuditLog": Retry.ON_UNAVAILABLE,
    "VerifyAuditLog": Retry.ON_UNAVAILABLE,
}


def decrypt_retry(*tokens: str) -> Retry:
    """The rule of a ``Decrypt`` (or ``BatchDecrypt``) presenting ``tokens``.

    A token without a use limit can be presented again at no cost, so the call is retried on
    any ``UNAVAILABLE``. A use-counted token loses a use at every broker the call reaches, so
    the call goes on only if it was never sent. The claims are read, not verified (the broker
    verifies them); a token that cannot be read counts as use-counted.
    """
    for token in tokens:
        if _max_uses(token) != 0:
            return Retry.IF_NOT_SENT
    return Retry.ON_UNAVAILABLE


def _max_uses(token: str) -> int | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    scope = payload.get("scope") if isinstance(payload, dict) else None
    uses = scope.get("max_uses") if isinstance(scope, dict) else None
    return uses if isinstance(uses, int) and not isinstance(uses, bool) else None


def parse_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """The broker addresses of ``"a:1,b:2"`` or ``["a:1", "b:2"]``, in order, without blanks.

    Raises:
        ConfigError: no address, or the same address twice.
    """
    items = target.split(",") if isinstance(target, str) else list(target)
    targets = tuple(item.strip() for item in items if item and item.strip())
    if not targets:
        raise ConfigError("no broker address: give a target such as 127.0.0.1:50051")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"a broker address is given twice: {', '.join(targets)}")
    return targets


def resolve_targets(
    target: str | Sequence[str] | None, targets: Sequence[str] | None
) -> tuple[str, ...]:
    """The brokers a client was given, as ``target`` (a string or list) or ``targets``.

    Raises:
        ConfigError: neither or both given, no address, or an address twice.
    """
    if (target is None) == (targets is None):
        raise ConfigError("give the broker address as target or targets (one of them)")
    return parse_targets(target if target is not None else targets or ())


def attempts_for(max_attempts: int | None, targets: Sequence[str]) -> int:
    """How many tries one call gets: ``max_attempts``, by default one per target.

    Raises:
        ConfigError: ``max_attempts`` below 1.
    """
    if max_attempts is None:
        return len(targets)
    if max_attempts < 1:
        raise ConfigError(f"max_attempts must be at least 1, not {max_attempts}")
    return max_attempts


def channel_options(
    target: str, options: Sequence[tuple[str, object]], several: bool
) -> list[tuple[str, object]]:
    """The options of one target's channel: the caller's, plus defaults it did not set.

    A ``dns:///`` target names every address of a name (a Kubernetes headless Service): it is
    balanced over all of them with ``round_robin``. With several targets, a broker that went
    away is tried again at least every 10 s (gRPC's default backoff grows to 120 s).
    """
    chosen = list(options)
    names = {name for name, _ in chosen}
    if target.startswith("dns:") and "grpc.lb_policy_name" not in names:
        chosen.append(("grpc.lb_policy_name", "round_robin"))
    if several and "grpc.max_reconnect_backoff_ms" not in names:
        chosen.append(("grpc.max_reconnect_backoff_ms", 10_000))
    return chosen


class TargetPool:
    """Round robin over the brokers, healthy ones first.

    Each call starts one broker further than the previous call. A broker that failed a call
    (or whose channel reports ``TRANSIENT_FAILURE``) moves behind the healthy ones for
    :data:`DOWN_SECONDS`; it is still tried when the others fail. Thread-safe.

    Args:
        size: the number of brokers.
        clock: monotonic seconds (injected for tests).
        down_seconds: how long a failed broker stays behind the others.
    """

    def __init__(
        self,
        size: int,
        clock: Callable[[], float] = time.monotonic,
        down_seconds: float = DOWN_SECONDS,
    ) -> None:
        self._size = size
        self._clock = clock
        self._down_seconds = down_seconds
        self._lock = threading.Lock()
        self._next = 0
        self._down_until = [0.0] * size

    def plan(self, attempts: int, failing: Callable[[int], bool] = lambda _i: False) -> list[int]:
        """The brokers (indexes) to try, in order, for one call of at most ``attempts`` tries.

        Args:
            attempts: how many tries; more than the number of brokers goes round again.
            failing: whether a broker's channel currently reports a connection failure.
        """
        now = self._clock()
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % self._size
            down = list(self._down_until)
        rotation = [(start + k) % self._size for k in range(self._size)]
        healthy = [i for i in rotation if down[i] <= now and not failing(i)]
        others = sorted((i for i in rotation if i not in healthy), key=lambda i: down[i])
        order = healthy + others
        return [order[k % self._size] for k in range(max(attempts, 1))]

    def mark_down(self, index: int) -> None:
        """Puts a broker behind the others for a while: it failed a call or did not connect."""
        with self._lock:
            self._down_until[index] = self._clock() + self._down_seconds

    def mark_up(self, index: int) -> None:
        """Brings a broker back among the healthy ones: it answered."""
        with self._lock:
            self._down_until[index] = 0.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of a call: which broker, and the time it may take.

    Attributes:
        index: the broker's index among the targets.
        timeout: seconds left of the call's deadline.
        connect_timeout: how long to wait for the broker's channel to be ``READY`` first.
        check_ready: whether to wait for ``READY`` before sending (only when another broker
            remains to be tried; the last try is sent as it is, so its error is gRPC's own).
    """

    index: int
    timeout: float
    connect_timeout: float
    check_ready: bool


@dataclass
class Call:
    """The tries of one call: the next broker, whether a failure goes on, the error to raise.

    Used the same way by the blocking and the asyncio client::

        call = Call(...)
        while (attempt := call.next()) is not None:
            if attempt.check_ready and not ready(attempt):
                call.unreachable(attempt)
                continue
            try:
                response = send(attempt)
            except grpc.RpcError as exc:
                call.failed(attempt, error_from_rpc(exc, request_id=...))
                continue
            call.succeeded(attempt)
            return response
        raise call.error()

    Args:
        pool: the brokers' round robin.
        targets: the brokers' addresses (for messages).
        retry: the call's rule.
        attempts: at most this many tries.
        timeout: the deadline of the whole call, across tries, in seconds.
        connect_timeout: per-try limit on waiting for a channel to be ``READY``.
        request_id: the call's ``x-request-id`` (the same on every try, so the audit trail
            shows each try of one call under one id).
        failing: whether a broker's channel currently reports a connection failure.
        clock: monotonic seconds.
    """

    pool: TargetPool
    targets: Sequence[str]
    retry: Retry
    attempts: int
    timeout: float
    connect_timeout: float
    request_id: str
    failing: Callable[[int], bool] = lambda _i: False
    clock: Callable[[], float] = time.monotonic
    _plan: list[int] = field(init=False)
    _deadline: float = field(init=False)
    _step: int = field(init=False, default=0)
    _tried: list[str] = field(init=False, default_factory=list)
    _last: KeybrokerError | None = field(init=False, default=None)
    _stop: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._deadline = self.clock() + self.timeout
        self._plan = self.pool.plan(self.attempts, self.failing)

    def next(self) -> Attempt | None:
        """The next try, or None when the call must end (then raise :meth:`error`)."""
        if self._stop or self._step >= len(self._plan):
            return None
        remaining = self._deadline - self.clock()
        if remaining <= 0:
            return None
        index = self._plan[self._step]
        self._step += 1
        return Attempt(
            index=index,
            timeout=remaining,
            connect_timeout=min(remaining, self.connect_timeout),
            check_ready=self._step < len(self._plan),
        )

    def unreachable(self, attempt: Attempt) -> None:
        """The broker's channel did not become ``READY``: nothing was sent, try the next."""
        self.pool.mark_down(attempt.index)
        self._tried.append(self.targets[attempt.index])
        self._last = Unavailable(
            "UNAVAILABLE",
            f"failed to connect to {self.targets[attempt.index]} (connection failed, or not "
            f"ready within {attempt.connect_timeout:g}s); nothing was sent to it",
            request_id=self.request_id,
        )

    def failed(self, attempt: Attempt, error: KeybrokerError) -> None:
        """A sent try failed: go on only if the call's rule allows it for this error."""
        self._tried.append(self.targets[attempt.index])
        self._last = error
        if isinstance(error, Unavailable):
            self.pool.mark_down(attempt.index)
            if self.retry is Retry.ON_UNAVAILABLE:
                return
        self._stop = True

    def succeeded(self, attempt: Attempt) -> None:
        self.pool.mark_up(attempt.index)

    def error(self) -> KeybrokerError:
        """What to raise once :meth:`next` returned None."""
        last = self._last
        if (not self._stop and self._step < len(self._plan)) or last is None:
            # The deadline ran out between tries (or before the first).
            cause = f"; last error: {last}" if last is not None else ""
            return DeadlineExceeded(
                "DEADLINE_EXCEEDED",
                f"no broker answered within {self.timeout:g}s{self._tried_text()}{cause}",
                request_id=self.request_id,
            )
        if len(self._tried) > 1:
            return type(last)(
                last.code_name, f"{last.message}{self._tried_text()}", request_id=last.request_id
            )
        return last

    def _tried_text(self) -> str:
        if not self._tried:
            return ""
        return f" (tried {', '.join(self._tried)})"


_ENDS = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)
_BY_NUMBER = {state.value[0]: state for state in grpc.ChannelConnectivity}


class ChannelWatch:
    """Reads a blocking channel's connectivity, so that a call can tell without sending
    anything whether the broker is connected.

    The blocking API's only public way to follow connectivity is ``Channel.subscribe``, whose
    polling thread races with ``Channel.close`` and may print a ``Channel closed!`` traceback
    from its thread (grpc issue 18995). So this reads the state the way ``grpc.aio``'s public
    ``get_state`` does, through the channel's core object, from the calling thread. Should a
    grpc release no longer offer it, the state reads as unknown: calls are then sent without
    waiting, and a failed call with effects is raised instead of moving on (safe, less
    available); ``tests/unit/test_failover.py`` notices such a release.

    Args:
        channel: the channel to read (it stays the caller's).
    """

    def __init__(self, channel: grpc.Channel) -> None:
        core = getattr(channel, "_channel", None)
        self._check: Callable[[bool], int] | None = getattr(core, "check_connectivity_state", None)
        self._watch: Callable[[int, float], object] | None = getattr(
            core, "watch_connectivity_state", None
        )
        self.state(try_to_connect=True)

    @property
    def supported(self) -> bool:
        """Whether this grpc release lets the state be read."""
        return self._check is not None and self._watch is not None

    def state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity | None:
        """The channel's connectivity (None when it cannot be read); ``try_to_connect``
        asks an idle channel to connect."""
        if self._check is None:
            return None
        try:
            return _BY_NUMBER.get(self._check(try_to_connect))
        except ValueError:  # the channel is closed
            return grpc.ChannelConnectivity.SHUTDOWN

    @property
    def failing(self) -> bool:
        """Whether the channel's last connection attempt failed (or it is closed)."""
        return self.state() in _ENDS

    def wait_ready(self, timeout: float) -> bool:
        """Waits until the channel is ``READY``, connecting it if it is idle.

        Returns:
            True when ``READY`` (or when the state cannot be read: the call is then sent as
            it would be with one broker); False when the connection failed or ``timeout``
            seconds went by first. Nothing is sent either way.
        """
        if self._watch is None:
            return True
        deadline = time.monotonic() + timeout
        state = self.state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            left = deadline - time.monotonic()
            if state is None or state in _ENDS or left <= 0:
                return state is None
            try:
                # Returns at the next change of state, or at the (wall clock) deadline.
                self._watch(state.value[0], time.time() + left)
            except ValueError:  # closed meanwhile
                return False
            state = self.state(try_to_connect=True)
        return True


async def wait_ready_async(channel: grpc.aio.Channel, timeout: float) -> bool:
    """:meth:`ChannelWatch.wait_ready` for a ``grpc.aio`` channel."""
    state = channel.get_state(try_to_connect=True)
    try:
        async with asyncio.timeout(timeout):
            while state is not grpc.ChannelConnectivity.READY:
                if state in _ENDS:
                    return False
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return True


def failing_async(channel: grpc.aio.Channel) -> bool:
    """Whether an asyncio channel's last connection attempt failed (or it is closed)."""
    return channel.get_state(try_to_connect=False) in _ENDS
