"""The sinks' destinations: JSON lines files and streams, syslog (RFC 5424) over UDP, TCP
(octet counting, RFC 6587) and unix sockets; and their `[[audit.sinks]]` settings."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from keybroker_client import evidence

from broker.adapters.audit_sinks import QueuedSink
from broker.adapters.sink_writers import (
    BOM,
    JsonLinesFile,
    JsonLinesStream,
    SyslogWriter,
    encode_record,
    event_record,
    format_rfc5424,
)
from broker.config import ConfigError, load_settings
from broker.domain import Outcome
from broker.sink_settings import AuditSinkConfig
from tests.unit.test_audit_sinks import WAIT, HealthLog, event

#: RFC 5424 section 6: HEADER SP STRUCTURED-DATA [SP MSG], with the fields this broker sends.
SYSLOG = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>1) "
    rb"(?P<timestamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) "
    rb"(?P<hostname>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    rb"(?P<msgid>[!-~]{1,32}) (?P<sd>-) (?P<msg>.*)",
    re.DOTALL,
)


def parse_syslog(message: bytes) -> tuple[dict[str, bytes], dict[str, object]]:
    match = SYSLOG.fullmatch(message)
    assert match, message
    fields = match.groupdict()
    assert fields["msg"].startswith(BOM)
    return fields, json.loads(fields["msg"][len(BOM) :].decode("utf-8"))


def odd_event(sequence: int = 7) -> object:
    """An event whose free-text fields hold what a caller may send: non-ASCII, newlines, ESC."""
    return event(
        sequence,
        outcome=Outcome.DENIED,
        operation="Decrypt",
        key_id="\x1b[2K\rpatients",
        justification="étude n°7\nline two",
        context={"dataset": "cohort-42", "zone": "Île-de-France"},
        reason="key not found",
    )


def test_the_record_is_the_exports_canonical_event_record() -> None:
    ev = odd_event()
    data = encode_record(ev)
    record = json.loads(data)
    assert data == evidence.canonical(record) and b"\n" not in data
    assert evidence.event_problem(record) == ""
    assert record["type"] == "event" and record["sequence"] == 7
    assert (record["chain"], record["chain_sequence"]) == ("kb-local-1", 7)
    assert record["time"] == "2030-01-02T03:04:05.678901Z"
    assert record["key_id"] == "\x1b[2K\rpatients" and record["outcome"] == "denied"
    assert record == event_record(ev)


def test_jsonl_file_appends_lines_with_mode_0600_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = JsonLinesFile(path)
    writer.open()
    writer.write(event(1))
    writer.write(odd_event(2))
    assert (path.stat().st_mode & 0o777) == 0o600
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate's default: rename, then a new file
    writer.write(event(3))
    writer.close()
    old = (tmp_path / "audit.jsonl.1").read_bytes().splitlines()
    assert [json.loads(line)["sequence"] for line in old] == [1, 2]
    assert old[1] == encode_record(odd_event(2))
    assert [json.loads(line)["sequence"] for line in path.read_bytes().splitlines()] == [3]


def test_jsonl_file_whose_directory_is_removed_fails(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    writer = JsonLinesFile(directory / "audit.jsonl")
    writer.open()
    writer.write(event(1))
    (directory / "audit.jsonl").unlink()
    directory.rmdir()
    with pytest.raises(FileNotFoundError):
        writer.write(event(2))
    writer.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_jsonl_file_on_a_full_device_fails_and_the_sink_reports_it() -> None:
    sink = QueuedSink("full", JsonLinesFile(Path("/dev/full")), retry_delay=0.0)
    health = HealthLog()
    sink.watch(health)
    sink.submit([event(1), event(2)])
    health.wait_for(False)
    sink.close()
    stats = sink.stats()
    assert stats.delivered == 0 and stats.failed >= 1
    assert stats.submitted == stats.lost == 2


def test_stream_sink_writes_json_lines() -> None:
    out = io.BytesIO()
    writer = JsonLinesStream(out)
    writer.write(event(1))
    writer.write(odd_event(2))
    assert out.getvalue() == encode_record(event(1)) + b"\n" + encode_record(odd_event(2)) + b"\n"


def test_rfc5424_fields() -> None:
    message = format_rfc5424(odd_event(), 4, "broker-1.example", "keybroker", "4242")
    fields, record = parse_syslog(message)
    assert int(fields["pri"]) == 4 * 8 + 4  # auth, warning (a refusal)
    assert fields["timestamp"] == b"2030-01-02T03:04:05.678901Z"
    assert fields["hostname"] == b"broker-1.example" and fields["app"] == b"keybroker"
    assert fields["procid"] == b"4242" and fields["msgid"] == b"Decrypt"
    assert record == event_record(odd_event())
    allowed = format_rfc5424(event(1), 16, "h", "kb", "1")
    assert allowed.startswith(b"<134>1 ")  # local0 (16) * 8 + informational (6)
    # Header fields keep printable ASCII without spaces, cut to their RFC limits, else "-".
    odd = format_rfc5424(event(1, operation="x" * 40), 4, "bad host\x1b", "", "1")
    fields, _ = parse_syslog(odd)
    assert fields["hostname"] == b"badhost" and fields["app"] == b"-"
    assert fields["msgid"] == b"x" * 32


@pytest.fixture
def udp_receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(WAIT)
    yield sock
    sock.close()


def test_syslog_over_udp(udp_receiver: socket.socket) -> None:
    port = udp_receiver.getsockname()[1]
    sink = QueuedSink("udp", SyslogWriter(f"udp://127.0.0.1:{port}", "auth", "keybroker"))
    sink.submit([event(1), odd_event(2)])
    messages = [udp_receiver.recv(65535) for _ in range(2)]
    sink.close()
    parsed = [parse_syslog(m) for m in messages]
    assert [r["sequence"] for _, r in parsed] == [1, 2]
    fields, record = parsed[1]
    assert int(fields["pri"]) == 4 * 8 + 4 and fields["version"] == b"1"
    assert fields["procid"] == str(os.getpid()).encode()
    assert fields["hostname"] == socket.gethostname().encode()[:255]
    assert record == event_record(odd_event(2))


def read_frames(conn: socket.socket, count: int) -> list[bytes]:
    """Reads RFC 6587 octet-counted frames: `LENGTH SP MESSAGE`."""
    stream = conn.makefile("rb")
    frames = []
    for _ in range(count):
        length = b""
        while not length.endswith(b" "):
            byte = stream.read(1)
            assert byte, "connection closed mid-frame"
            length += byte
        assert re.fullmatch(rb"[1-9]\d* ", length)
        frames.append(stream.read(int(length)))
    return frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_syslog_over_tcp_with_octet_counting() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(WAIT)
        port = server.getsockname()[1]
        sink = QueuedSink("tcp", SyslogWriter(f"tcp://127.0.0.1:{port}"))
        sink.submit([event(1), odd_event(2), event(3)])
        conn, _ = server.accept()
        with conn:
            conn.settimeout(WAIT)
            frames = read_frames(conn, 3)
            sink.close()
    records = [parse_syslog(f)[1] for f in frames]
    assert [r["sequence"] for r in records] == [1, 2, 3]
    assert records[1] == event_record(odd_event(2))


def test_syslog_over_tcp_waits_for_a_receiver_that_is_down_then_delivers() -> None:
    port = free_port()  # nothing listens there yet: connections are refused
    sink = QueuedSink("tcp", SyslogWriter(f"tcp://127.0.0.1:{port}"), retry_delay=0.01)
    health = HealthLog()
    sink.watch(health)
    sink.submit([event(1), event(2)])
    health.wait_for(False)
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(WAIT)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(WAIT)
            frames = read_frames(conn, 2)
            health.wait_for(True)
            sink.close()
    assert [parse_syslog(f)[1]["sequence"] for f in frames] == [1, 2]
    assert sink.stats().lost == 0


def test_syslog_to_a_peer_that_stops_reading_never_blocks_submit() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts (backlog), never reads
        port = server.getsockname()[1]
        sink = QueuedSink("stalled", SyslogWriter(f"tcp://127.0.0.1:{port}"), capacity=16)
        big = event(1, justification="j" * 1024)
        for s in range(1, 2001):
            sink.submit([big if s % 2 else event(s)])
        sink.close(timeout=0.2)
    stats = sink.stats()
    assert stats.submitted == 2000 == stats.delivered + stats.lost
    assert stats.dropped > 0


def test_syslog_over_a_unix_datagram_socket(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(WAIT)
        sink = QueuedSink("local", SyslogWriter(f"unix://{path}", "local3", "kb"))
        sink.submit([event(5)])
        fields, record = parse_syslog(receiver.recv(65535))
        sink.close()
    assert int(fields["pri"]) == 19 * 8 + 6 and fields["app"] == b"kb"
    assert record["sequence"] == 5


def test_syslog_over_a_unix_stream_socket(tmp_path: Path) -> None:
    path = tmp_path / "stream.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(WAIT)
        sink = QueuedSink("local", SyslogWriter(f"unix://{path}"))
        sink.submit([event(1), event(2)])
        conn, _ = server.accept()
        with conn:
            conn.settimeout(WAIT)
            frames = read_frames(conn, 2)
        sink.close()
    assert [parse_syslog(f)[1]["sequence"] for f in frames] == [1, 2]


CONFIG = """
[audit]
[[audit.sinks]]
type = "jsonl"
path = "siem/audit.jsonl"

[[audit.sinks]]
type = "stdout"
queue_size = 500

[[audit.sinks]]
name = "siem"
type = "syslog"
address = "tcp://siem.example:6514"
facility = "local4"
app_name = "kb-paris"
"""


def load(tmp_path: Path, text: str) -> object:
    config = tmp_path / "kb.toml"
    config.write_text(text)
    return load_settings(home=tmp_path / "home", config_file=config, env={})


def test_sinks_from_the_configuration_file(tmp_path: Path) -> None:
    settings = load(tmp_path, CONFIG)
    home = (tmp_path / "home").resolve()
    assert settings.audit_sinks == (  # type: ignore[attr-defined]
        AuditSinkConfig("jsonl", path=home / "siem" / "audit.jsonl"),
        AuditSinkConfig("stdout", queue_size=500),
        AuditSinkConfig(
            "syslog",
            name="siem",
            address="tcp://siem.example:6514",
            facility="local4",
            app_name="kb-paris",
        ),
    )
    assert [s.sink_name for s in settings.audit_sinks] == ["jsonl", "stdout", "siem"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[audit.sinks]]\ntype = "jsonl"\npaht = "a"\n',
         "unknown key 'audit.sinks[0].paht'; did you mean 'audit.sinks[0].path'?"),
        ('[[audit.sinks]]\npath = "a"\n', "audit.sinks[0].type is required"),
        ('[[audit.sinks]]\ntype = "kafka"\n',
         "audit.sinks[0]: type 'kafka': use one of jsonl, stdout, syslog"),
        ('[[audit.sinks]]\ntype = "jsonl"\n',
         "audit.sinks[0]: path is required for type jsonl, and only for it"),
        ('[[audit.sinks]]\ntype = "syslog"\naddress = "siem:514"\n',
         "audit.sinks[0]: address 'siem:514': use udp://HOST:PORT, tcp://HOST:PORT or "
         "unix:///PATH"),
        ('[[audit.sinks]]\ntype = "syslog"\naddress = "udp://siem:99999"\n',
         "audit.sinks[0]: address 'udp://siem:99999': give a host and a port from 1 to 65535"),
        ('[[audit.sinks]]\ntype = "syslog"\naddress = "udp://siem:514"\nfacility = "audit"\n',
         "audit.sinks[0]: facility 'audit': use one of kern, user, mail, daemon, auth, syslog, "
         "lpr, news, uucp, cron, authpriv, ftp, local0, local1, local2, local3, local4, local5, "
         "local6, local7"),
        ('[[audit.sinks]]\ntype = "stdout"\nqueue_size = 0\n',
         "audit.sinks[0]: queue_size must be between 1 and 1000000"),
        ('[[audit.sinks]]\ntype = "stdout"\nname = "Bad Name"\n',
         "audit.sinks[0]: name 'Bad Name': use a-z, 0-9, '.', '_', '-'"),
        ('[[audit.sinks]]\ntype = "stdout"\n[[audit.sinks]]\ntype = "stdout"\n',
         "audit.sinks: give each sink a distinct name (it defaults to its type)"),
        ("[audit]\nsinks = 3\n",
         "audit.sinks must be an array of tables ([[audit.sinks]])"),
        ('[[audit.sinks]]\ntype = "stdout"\nqueue_size = "big"\n',
         "audit.sinks[0].queue_size must be an integer, not a string"),
    ],
)  # fmt: skip
def test_bad_sink_settings_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    text_of = str(info.value)
    assert text_of.removeprefix(f"{tmp_path / 'kb.toml'}: ") == message
    assert "\n" not in text_of


def test_watch_reports_from_another_thread_in_order() -> None:
    """Health changes made by the request threads (drops) and the sink's thread (recovery)
    reach the watchers in the order they happened."""
    gate = threading.Event()

    class Slow:
        def open(self) -> None: ...
        def write(self, ev: object) -> None:
            gate.wait(WAIT)

        def close(self) -> None:
            gate.set()

    sink = QueuedSink("slow", Slow(), capacity=1)
    health = HealthLog()
    sink.watch(health)
    sink.submit([event(1), event(2), event(3)])
    health.wait_for(False)
    gate.set()
    health.wait_for(True)
    sink.close()
    assert health.states == [True, False, True]
