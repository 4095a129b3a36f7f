"""The failover rules of the client SDK: the pure bookkeeping with a fake clock, then the
blocking and asyncio clients against fake brokers over mutual TLS (one of them failing)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2, resources_pb2, tokens_pb2
from keybroker_client import (
    ConfigError,
    DeadlineExceeded,
    KeybrokerClient,
    NotFound,
    Unavailable,
)
from keybroker_client.aio import AsyncKeybrokerClient
from keybroker_client.config import load_profile
from keybroker_client.failover import (
    RETRY_RULES,
    Call,
    ChannelWatch,
    Retry,
    TargetPool,
    channel_options,
    decrypt_retry,
    parse_targets,
    resolve_targets,
)

from tests.unit.cli_support import make_home, run
from tests.unit.client_fakes import Abort, FakeBroker, Pki, closed_port, make_key, serve_fake_broker

ROOT = Path(__file__).resolve().parents[2]
DOWN = Abort(grpc.StatusCode.UNAVAILABLE, "audit store unreachable")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def token_with(max_uses: object) -> str:
    """A token-shaped string whose claims carry ``scope.max_uses`` (unsigned: the client only
    reads it, the broker verifies)."""

    def seg(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'ES256'})}.{seg({'scope': {'max_uses': max_uses}})}.c2ln"


# ---------------------------------------------------------------------------------------------
# The table


def _all_rpcs() -> set[str]:
    services = (
        key_admin_pb2.DESCRIPTOR.services_by_name["KeyAdmin"],
        crypto_pb2.DESCRIPTOR.services_by_name["Crypto"],
        tokens_pb2.DESCRIPTOR.services_by_name["Tokens"],
        audit_pb2.DESCRIPTOR.services_by_name["Audit"],
    )
    return {m.name for s in services for m in s.methods}


def test_every_rpc_has_a_rule() -> None:
    assert set(RETRY_RULES) == _all_rpcs()


def test_the_documented_table_is_the_code() -> None:
    text = (ROOT / "docs" / "sdk.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", text, flags=re.MULTILINE)
    documented = {name: rule.strip() for name, rule in rows}
    words = {"next broker": Retry.ON_UNAVAILABLE, "only if not sent": Retry.IF_NOT_SENT}
    assert set(documented) == set(RETRY_RULES)
    for name, rule in documented.items():
        if rule.startswith("depends on the token"):
            # Decided per call by decrypt_retry; the table's own entry is the careful one.
            assert RETRY_RULES[name] is Retry.IF_NOT_SENT, name
        else:
            assert RETRY_RULES[name] is words[rule], name


def test_reads_and_effect_free_calls_go_on_calls_with_effects_do_not() -> None:
    for name in ("GetKey", "ListKeys", "GetSigningKeys", "ListAuditEvents", "ExportAuditLog"):
        assert RETRY_RULES[name] is Retry.ON_UNAVAILABLE
    for name in ("VerifyAuditLog", "GenerateDataKey", "Encrypt"):
        assert RETRY_RULES[name] is Retry.ON_UNAVAILABLE
    for name in ("IssueToken", "CreateKey", "RotateKey", "UpdateKeyPolicy", "DisableKey"):
        assert RETRY_RULES[name] is Retry.IF_NOT_SENT
    assert RETRY_RULES["ScheduleKeyDestruction"] is Retry.IF_NOT_SENT


@pytest.mark.parametrize(
    ("token", "rule"),
    [
        (token_with(0), Retry.ON_UNAVAILABLE),
        (token_with(1), Retry.IF_NOT_SENT),
        (token_with(1000), Retry.IF_NOT_SENT),
        (token_with("0"), Retry.IF_NOT_SENT),
        (token_with(False), Retry.IF_NOT_SENT),
        ("not-a-token", Retry.IF_NOT_SENT),
        ("a.!!!.c", Retry.IF_NOT_SENT),
        ("a.bnVsbA.c", Retry.IF_NOT_SENT),  # payload "null"
    ],
)
def test_decrypt_rule_follows_the_tokens_use_limit(token: str, rule: Retry) -> None:
    assert decrypt_retry(token) is rule


def test_a_batch_is_careful_when_any_token_is_use_counted() -> None:
    assert decrypt_retry(token_with(0), token_with(0)) is Retry.ON_UNAVAILABLE
    assert decrypt_retry(token_with(0), token_with(2)) is Retry.IF_NOT_SENT


# ---------------------------------------------------------------------------------------------
# Targets


def test_targets_from_a_string_or_a_list() -> None:
    assert parse_targets("a:1") == ("a:1",)
    assert parse_targets(" a:1, b:2 ,,") == ("a:1", "b:2")
    assert parse_targets(["a:1", "[::1]:3"]) == ("a:1", "[::1]:3")
    assert resolve_targets(None, ["a:1", "b:2"]) == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("target", "targets", "message"),
    [
        ("", None, "no broker address"),
        (" , ", None, "no broker address"),
        ("a:1,a:1", None, "given twice"),
        (None, None, "one of them"),
        ("a:1", ["b:2"], "one of them"),
    ],
)
def test_bad_targets_are_config_errors(
    target: str | None, targets: list[str] | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_targets(target, targets)


def test_profile_may_list_targets(tmp_path: Path) -> None:
    profile = tmp_path / "config.toml"
    profile.write_text('target = ["a:1", "b:2"]\n')
    assert load_profile({"KEYBROKER_CONFIG": str(profile)})["target"] == "a:1,b:2"
    profile.write_text('target = ["a:1", 2]\n')
    with pytest.raises(ConfigError, match="non-empty strings"):
        load_profile({"KEYBROKER_CONFIG": str(profile)})


def test_channel_options_balance_a_dns_name_and_bound_the_backoff() -> None:
    assert channel_options("a:1", [], several=False) == []
    assert ("grpc.lb_policy_name", "round_robin") in channel_options(
        "dns:///kb.ns.svc:50051", [], several=False
    )
    mine = [("grpc.lb_policy_name", "pick_first")]
    assert channel_options("dns:///kb:1", mine, several=False) == mine
    assert ("grpc.max_reconnect_backoff_ms", 10_000) in channel_options("a:1", [], several=True)


# ---------------------------------------------------------------------------------------------
# Round robin and the bookkeeping of one call


def test_round_robin_starts_one_further_each_call() -> None:
    pool = TargetPool(3, clock=FakeClock())
    assert [pool.plan(3) for _ in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_a_failed_broker_goes_last_until_it_recovers_or_answers() -> None:
    clock = FakeClock()
    pool = TargetPool(3, clock=clock, down_seconds=5)
    pool.mark_down(0)
    assert pool.plan(3) == [1, 2, 0]
    assert pool.plan(3) == [1, 2, 0]
    clock.now += 5
    assert pool.plan(3) == [2, 0, 1]
    pool.mark_down(1)
    pool.mark_up(1)
    assert pool.plan(3) == [0, 1, 2]


def test_a_failing_channel_goes_last_and_attempts_go_round() -> None:
    pool = TargetPool(2, clock=FakeClock())
    assert pool.plan(2, failing=lambda i: i == 0) == [1, 0]
    assert pool.plan(5) == [1, 0, 1, 0, 1]


def _call(retry: Retry, clock: FakeClock, targets: int = 3, timeout: float = 10) -> Call:
    return Call(
        pool=TargetPool(targets, clock=clock),
        targets=[f"kb-{i}:50051" for i in range(targets)],
        retry=retry,
        attempts=targets,
        timeout=timeout,
        connect_timeout=2,
        request_id="rid",
        clock=clock,
    )


def test_effect_free_call_goes_on_after_a_sent_failure() -> None:
    clock = FakeClock()
    call = _call(Retry.ON_UNAVAILABLE, clock)
    first = call.next()
    assert first is not None and first.check_ready and first.index == 0
    call.failed(first, Unavailable("UNAVAILABLE", "reset", request_id="rid"))
    second = call.next()
    assert second is not None and second.index == 1
    call.failed(second, Unavailable("UNAVAILABLE", "reset", request_id="rid"))
    third = call.next()
    assert third is not None and third.index == 2 and not third.check_ready
    call.failed(third, Unavailable("UNAVAILABLE", "refused", request_id="rid"))
    assert call.next() is None
    error = call.error()
    assert isinstance(error, Unavailable)
    assert error.message == "refused (tried kb-0:50051, kb-1:50051, kb-2:50051)"
    assert error.request_id == "rid"


def test_call_with_effects_stops_after_a_sent_failure() -> None:
    call = _call(Retry.IF_NOT_SENT, FakeClock())
    first = call.next()
    assert first is not None
    sent_error = Unavailable("UNAVAILABLE", "connection reset", request_id="rid")
    call.failed(first, sent_error)
    assert call.next() is None
    assert call.error() is sent_error


def test_call_with_effects_goes_on_when_nothing_was_sent() -> None:
    call = _call(Retry.IF_NOT_SENT, FakeClock())
    first = call.next()
    assert first is not None
    call.unreachable(first)
    second = call.next()
    assert second is not None and second.index == 1


def test_answers_other_than_unavailable_end_the_call() -> None:
    call = _call(Retry.ON_UNAVAILABLE, FakeClock())
    first = call.next()
    assert first is not None
    call.failed(first, NotFound("NOT_FOUND", "no key", request_id="rid"))
    assert call.next() is None
    assert isinstance(call.error(), NotFound)


def test_one_deadline_for_all_tries() -> None:
    clock = FakeClock()
    call = _call(Retry.ON_UNAVAILABLE, clock, timeout=10)
    first = call.next()
    assert first is not None and first.timeout == 10 and first.connect_timeout == 2
    clock.now += 9
    call.failed(first, Unavailable("UNAVAILABLE", "reset", request_id="rid"))
    second = call.next()
    assert second is not None and second.timeout == pytest.approx(1)
    assert second.connect_timeout == pytest.approx(1)
    clock.now += 1
    call.unreachable(second)
    assert call.next() is None
    error = call.error()
    assert isinstance(error, DeadlineExceeded)
    assert "within 10s (tried kb-0:50051, kb-1:50051)" in error.message
    assert "last error: UNAVAILABLE" in error.message


# ---------------------------------------------------------------------------------------------
# Reading a channel's connectivity


def test_the_channel_state_can_be_read_with_this_grpc(client_pki: Pki, fake_broker) -> None:
    """If a grpc release drops what ChannelWatch reads, calls with effects stop failing over
    (safely): this test says so first."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=client_pki.read("ca.pem"),
        private_key=client_pki.read("admin.key"),
        certificate_chain=client_pki.read("admin.pem"),
    )
    with grpc.secure_channel(fake_broker.target, creds) as live:
        watch = ChannelWatch(live)
        assert watch.supported
        assert watch.wait_ready(10)
        assert watch.state() is grpc.ChannelConnectivity.READY and not watch.failing
    assert watch.state() is grpc.ChannelConnectivity.SHUTDOWN and watch.failing
    with grpc.secure_channel(f"127.0.0.1:{closed_port()}", creds) as dead:
        watch = ChannelWatch(dead)
        assert not watch.wait_ready(10)
        assert watch.failing


# ---------------------------------------------------------------------------------------------
# The blocking client against fake brokers


@pytest.fixture
def second_broker(client_pki: Pki) -> Iterator[FakeBroker]:
    yield from serve_fake_broker(client_pki)


def _client(pki: Pki, *targets: str, identity: str = "admin", **kw: object) -> KeybrokerClient:
    settings = pki.settings(",".join(targets), identity)
    return KeybrokerClient.from_settings(settings, **kw)  # type: ignore[arg-type]


def _request_ids(*brokers: FakeBroker, method: str) -> list[str]:
    return [
        c.metadata["x-request-id"] for b in brokers for c in list(b.calls) if c.method == method
    ]


def test_calls_go_round_robin(client_pki: Pki, fake_broker: FakeBroker, second_broker) -> None:
    fake_broker.responses["GetKey"] = key_admin_pb2.GetKeyResponse(key=make_key("k"))
    second_broker.responses["GetKey"] = key_admin_pb2.GetKeyResponse(key=make_key("k"))
    with _client(client_pki, fake_broker.target, second_broker.target) as kb:
        assert kb.targets == (fake_broker.target, second_broker.target)
        for _ in range(4):
            assert kb.get_key("k").key_id == "k"
    assert len(fake_broker.requests("GetKey")) == 2
    assert len(second_broker.requests("GetKey")) == 2


def test_a_read_goes_to_the_next_broker(
    client_pki: Pki, fake_broker: FakeBroker, second_broker: FakeBroker
) -> None:
    fake_broker.responses["GetKey"] = DOWN
    second_broker.responses["GetKey"] = key_admin_pb2.GetKeyResponse(key=make_key("k"))
    with _client(client_pki, fake_broker.target, second_broker.target) as kb:
        assert kb.get_key("k").key_id == "k"
    ids = _request_ids(fake_broker, second_broker, method="GetKey")
    assert len(ids) == 2 and ids[0] == ids[1]


def test_a_call_with_effects_reaching_a_failing_broker_is_not_repeated(
    client_pki: Pki, fake_broker: FakeBroker, second_broker: FakeBroker
) -> None:
    fake_broker.responses["IssueToken"] = DOWN
    with (
        _client(client_pki, fake_broker.target, second_broker.target, identity="consumer") as kb,
        pytest.raises(Unavailable, match="audit store unreachable") as caught,
    ):
        kb.issue_token("k", {"dataset": "d"}, "study")
    assert len(fake_broker.requests("IssueToken")) == 1
    assert second_broker.requests("IssueToken") == []
    assert caught.value.request_id == _request_ids(fake_broker, method="IssueToken")[0]


def test_a_call_with_effects_skips_a_broker_it_cannot_connect_to(
    client_pki: Pki, fake_broker: FakeBroker
) -> None:
    fake_broker.responses["CreateKey"] = key_admin_pb2.CreateKeyResponse(key=make_key("k"))
    dead = f"127.0.0.1:{closed_port()}"
    with _client(client_pki, dead, fake_broker.target) as kb:
        assert kb.create_key("k").key_id == "k"
        assert kb.rotate_key("k") is not None  # the dead one now goes last
    assert len(fake_broker.requests("CreateKey")) == 1
    assert len(fake_broker.requests("RotateKey")) == 1


def test_decrypt_goes_on_only_with_a_token_without_use_limit(
    client_pki: Pki, fake_broker: FakeBroker, second_broker: FakeBroker
) -> None:
    fake_broker.responses["Decrypt"] = DOWN
    second_broker.responses["Decrypt"] = crypto_pb2.DecryptResponse(plaintext=b"pt", key_id="k")
    targets = (fake_broker.target, second_broker.target)
    with _client(client_pki, *targets, identity="consumer") as kb:
        assert kb.decrypt(b"blob", {}, token_with(0)).plaintext == b"pt"
    with _client(client_pki, *targets, identity="consumer") as kb, pytest.raises(Unavailable):
        kb.decrypt(b"blob", {}, token_with(1))
    assert len(fake_broker.requests("Decrypt")) == 2
    assert len(second_broker.requests("Decrypt")) == 1


def test_a_stream_goes_on_before_its_first_event_only(
    client_pki: Pki, fake_broker: FakeBroker, second_broker: FakeBroker
) -> None:
    event = audit_pb2.ListAuditEventsResponse(event=resources_pb2.AuditEvent(sequence=7))
    fake_broker.responses["ListAuditEvents"] = DOWN
    second_broker.responses["ListAuditEvents"] = [event]
    targets = (fake_broker.target, second_broker.target)
    with _client(client_pki, *targets, identity="auditor") as kb:
        assert [e.sequence for e in kb.audit_events()] == [7]

    with _client(client_pki, *targets, identity="auditor") as kb:
        # After an event has arrived a new stream would repeat it: the error is raised.
        kb._rpcs[0]["ListAuditEvents"] = lambda *_a, **_kw: BrokenStream(event)
        seen = []
        with pytest.raises(Unavailable, match="reset"):
            for e in kb.audit_events():
                seen.append(e.sequence)
        assert seen == [7]
    assert len(second_broker.requests("ListAuditEvents")) == 1


class StreamReset(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"


class BrokenStream:
    """A server stream that delivers one message, then fails as a reset connection does."""

    def __init__(self, first: object) -> None:
        self._items: list[object] = [first]
        self.cancelled = False

    def __iter__(self) -> BrokenStream:
        return self

    def __next__(self) -> object:
        if self._items:
            return self._items.pop()
        raise StreamReset()

    def cancel(self) -> None:
        self.cancelled = True


def test_the_deadline_covers_every_try(
    client_pki: Pki, fake_broker: FakeBroker, second_broker: FakeBroker
) -> None:
    def slow_then_down(_request: object) -> Abort:
        time.sleep(1.0)
        return DOWN

    fake_broker.responses["GetKey"] = slow_then_down
    second_broker.responses["GetKey"] = key_admin_pb2.GetKeyResponse(key=make_key("k"))
    with _client(client_pki, fake_broker.target, second_broker.target, timeout=5.0) as kb:
        kb.get_key("k")
    (first,) = [c for c in fake_broker.calls if c.method == "GetKey"]
    (second,) = [c for c in second_broker.calls if c.method == "GetKey"]
    assert first.time_remaining is not None and second.time_remaining is not None
    # The second try had what the first left, not a fresh 5 s: the first took a second.
    assert second.time_remaining <= first.time_remaining - 0.5


def test_every_broker_down_names_them_all(client_pki: Pki) -> None:
    dead = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]
    with _client(client_pki, *dead) as kb, pytest.raises(Unavailable) as caught:
        kb.get_key("k")
    tried = re.search(r"\(tried (.*)\)$", caught.value.message)
    assert tried is not None and sorted(tried[1].split(", ")) == sorted(dead)


def test_one_target_is_one_try(client_pki: Pki, fake_broker: FakeBroker) -> None:
    fake_broker.responses["GetKey"] = DOWN
    with _client(client_pki, fake_broker.target) as kb, pytest.raises(Unavailable) as caught:
        kb.get_key("k")
    assert len(fake_broker.requests("GetKey")) == 1
    assert caught.value.message == "audit store unreachable"


def test_more_attempts_than_targets_go_round(client_pki: Pki, fake_broker: FakeBroker) -> None:
    answers = iter([DOWN, key_admin_pb2.GetKeyResponse(key=make_key("k"))])
    fake_broker.responses["GetKey"] = lambda _request: next(answers)
    with _client(client_pki, fake_broker.target, max_attempts=2) as kb:
        assert kb.get_key("k").key_id == "k"
        assert kb.max_attempts == 2
    assert len(fake_broker.requests("GetKey")) == 2


def test_bad_max_attempts_is_a_config_error(client_pki: Pki, fake_broker: FakeBroker) -> None:
    with pytest.raises(ConfigError, match="max_attempts"):
        _client(client_pki, fake_broker.target, max_attempts=0)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_takes_several_targets(
    tmp_path: Path, client_pki: Pki, fake_broker: FakeBroker, second_broker: FakeBroker
) -> None:
    home = make_home(tmp_path, client_pki, fake_broker)
    fake_broker.responses["CreateKey"] = key_admin_pb2.CreateKeyResponse(key=make_key("k"))
    dead = f"127.0.0.1:{closed_port()}"
    result = run(home, "--target", f"{dead},{fake_broker.target}", "keys", "create", "k")
    assert result.exit_code == 0, result.output
    assert len(fake_broker.requests("CreateKey")) == 1
    # Every broker down: one line naming them, with the hint for brokers on this machine.
    dead2 = f"127.0.0.1:{closed_port()}"
    result = run(home, "--target", f"{dead},{dead2}", "keys", "show", "k")
    assert result.exit_code != 0
    assert f"cannot reach the broker at {dead},{dead2}" in result.output
    assert "make run" in result.output


# ---------------------------------------------------------------------------------------------
# The asyncio client against fake brokers


def test_async_client_follows_the_same_rules(
    client_pki: Pki, fake_broker: FakeBroker, second_broker: FakeBroker
) -> None:
    fake_broker.responses["GenerateDataKey"] = DOWN
    fake_broker.responses["IssueToken"] = DOWN
    second_broker.responses["GenerateDataKey"] = crypto_pb2.GenerateDataKeyResponse(
        plaintext_key=b"k" * 32, wrapped_key=b"w", key_id="k", key_version=1
    )
    dead = f"127.0.0.1:{closed_port()}"

    async def scenario() -> None:
        settings = client_pki.settings(f"{fake_broker.target},{second_broker.target}", "producer")
        async with AsyncKeybrokerClient.from_settings(settings) as kb:
            assert (await kb.generate_data_key("k")).wrapped_key == b"w"
        async with AsyncKeybrokerClient.from_settings(settings) as kb:
            with pytest.raises(Unavailable):
                await kb.issue_token("k", {}, "study")
        settings = client_pki.settings(f"{dead},{second_broker.target}", "producer")
        async with AsyncKeybrokerClient.from_settings(settings) as kb:
            await kb.issue_token("k", {}, "study")

    asyncio.run(scenario())
    assert len(fake_broker.requests("GenerateDataKey")) == 1
    assert len(second_broker.requests("GenerateDataKey")) == 1
    assert len(fake_broker.requests("IssueToken")) == 1
    assert len(second_broker.requests("IssueToken")) == 1  # the one after the dead broker
