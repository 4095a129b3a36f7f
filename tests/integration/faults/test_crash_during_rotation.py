"""D.23: a broker process SIGKILLed at each step of a rotation.

A rotation is: the HSM generates the new version's key, then the store records it as the
primary version, then the call's audit event is written and the answer sent. The process is
killed (1) while the HSM is being asked, (2) once the HSM made the key but before the store
knows of it, (3) right after the answer. After each restart the key has exactly one primary
version, every ciphertext made before still decrypts, and the object left by (2) is reported
at start, by label, and never deleted.

The steps are reached through injected faults (`hsm_sim.faulty`, chosen by the configuration
file): a `generate_kek` that hangs before, or after, the wrapped HSM did its work.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import grpc
from keybroker.v1 import key_admin_pb2

from tests.integration.faults.procs import BrokerProcess, config_file, running
from tests.integration.flows import create_key, datakey, decrypt, issue

ORPHANS = r"holds (\d+) object\(s\) that no key of the store refers to"


def rotate_in_background(broker: BrokerProcess, key_id: str) -> list[BaseException]:
    """Starts a RotateKey that the fault will stop; returns where its error will land."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            broker.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id), timeout=120)
        except grpc.RpcError as exc:
            errors.append(exc)

    threading.Thread(target=call, daemon=True).start()
    return errors


def key_of(broker: BrokerProcess, key_id: str) -> key_admin_pb2.GetKeyResponse:
    return broker.keys().GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)).key


def assert_one_primary(broker: BrokerProcess, key_id: str, versions: list[int]) -> None:
    key = key_of(broker, key_id)
    assert [v.version for v in key.versions] == versions
    assert key.primary_version == versions[-1]


def assert_decrypts(broker: BrokerProcess, key_id: str, blobs: dict[bytes, int]) -> None:
    """Each wrapped data key opens again, under the version it was made with."""
    token = issue(broker, key_id).token  # type: ignore[arg-type]
    for blob, version in blobs.items():
        opened = decrypt(broker, blob, token)  # type: ignore[arg-type]
        assert (opened.key_id, opened.key_version) == (key_id, version)


def orphan_lines(broker: BrokerProcess) -> list[str]:
    return [line for line in broker.lines if re.search(ORPHANS, line)]


def test_sigkill_at_each_step_of_a_rotation(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    # Key creation is the first generate_kek of a process: the rotation is the second.
    before_hsm = config_file(home, "before", "generate_kek nth=2 hang")
    after_hsm = config_file(home, "after", "generate_kek hang after")
    plain = config_file(home, "plain")
    blobs: dict[bytes, int] = {}

    # (1) Killed while waiting for the HSM: nothing was made.
    first = BrokerProcess.start(home, "--config", str(before_hsm)).wait_ready()
    key_id = create_key(first)  # type: ignore[arg-type]
    blobs[datakey(first, key_id).wrapped_key] = 1  # type: ignore[arg-type]
    rotate_in_background(first, key_id)
    first.wait_line(r"injected fault: .*hang.* on generate_kek")
    first.kill()

    # (2) Killed once the HSM made the new key, before the store records it.
    second = BrokerProcess.start(home, "--config", str(after_hsm)).wait_ready()
    assert orphan_lines(second) == []  # the HSM was never asked in (1)
    assert_one_primary(second, key_id, [1])
    assert_decrypts(second, key_id, blobs)
    rotate_in_background(second, key_id)
    second.wait_line(r"injected fault: .*hang after on generate_kek")
    second.kill()

    # (3) The key made in (2) is reported, the key is as before; a rotation now goes
    # through, and the process is killed right after its answer.
    with running(home, "--config", str(plain)) as third:
        (reported,) = orphan_lines(third)
        assert "1 object(s)" in reported
        (orphan,) = re.findall(rf"kek:{re.escape(key_id)}:v2:[0-9a-f]+", reported)
        assert_one_primary(third, key_id, [1])
        assert_decrypts(third, key_id, blobs)
        third.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
        blobs[datakey(third, key_id).wrapped_key] = 2  # type: ignore[arg-type]
        third.kill()

    with running(home, "--config", str(plain)) as fourth:
        assert_one_primary(fourth, key_id, [1, 2])
        assert_decrypts(fourth, key_id, blobs)
        # The orphan is still there (never deleted), and still the only one: the version
        # the store does know of is not reported.
        (reported,) = orphan_lines(fourth)
        assert re.findall(r"kek:[^ ,]+", reported) == [orphan]
        report = fourth.verify()
        assert report.ok, report.error
        assert fourth.stop() == 0
    secrets = [(home / "hsm.pin").read_text().strip()]
    for output in (first.output, second.output, fourth.output):
        assert "Traceback" not in output
        assert not any(s in output for s in secrets)
