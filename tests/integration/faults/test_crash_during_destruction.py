"""D.23: a broker process SIGKILLed at each step of a scheduled destruction.

A destruction is: the scheduler claims the due key (a lease written into its record), the HSM
destroys the object of every version, a search must find none, the `DestroyKey` event is made
durable and the unsigned receipt stored in the key record, then the HSM audit key signs the
receipt and the key is stored DESTROYED. The process is killed (a) before any object is
destroyed, (b) once the first version's object is gone but not the second's, (c) once every
object is gone and the event is durable but before the receipt is signed. Each next process
takes the task over once the dead holder's lease (`keys.lease_seconds`) has expired; the last
one runs without faults. Then the key is DESTROYED, no object of either version is left, the
trail holds exactly one allowed `DestroyKey`, the receipt verifies offline, the old
ciphertexts are refused and the audit trail verifies.

The steps are reached through injected faults (`hsm_sim.faulty`, chosen by the configuration
file): a `destroy`, or the receipt's `sign`, that hangs until the process is killed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from keybroker.v1 import audit_pb2, key_admin_pb2, resources_pb2, tokens_pb2
from keybroker_client import evidence

from broker.services.scheduler import SCHEDULER_PRINCIPAL
from tests.integration.faults.procs import ROOT, BrokerProcess, config_file, running, server_env
from tests.integration.flows import code_of, create_key, datakey, decrypt, issue

#: A pass every half second, a dead holder's claim taken over after two, due one second
#: after scheduling: the takeovers below need no clock of the test's own.
FAST = {
    "KEYBROKER_KEYS_SCHEDULER_INTERVAL": "0.5",
    "KEYBROKER_KEYS_LEASE_SECONDS": "2",
    "KEYBROKER_KEYS_MIN_DESTRUCTION_WINDOW": "1",
}
#: The receipt must be the only signature after the chain's: no timed checkpoint meanwhile.
NO_TIMED_CHECKPOINT = {"KEYBROKER_AUDIT_CHECKPOINT_SECONDS": "3600"}
HUNG_DESTROY = r"injected fault: .*hang on destroy"
HUNG_SIGN = r"injected fault: .*hang on sign"

#: Lists the labels starting with argv[2] on the token "keybroker" of the home argv[1], from
#: a process of its own (one process loads one softhsm2.conf), logged in with its PIN.
SEARCH = """
import os, sys
import PyKCS11
from broker.devhsm import find_softhsm_module
home, prefix = sys.argv[1], sys.argv[2]
os.environ["SOFTHSM2_CONF"] = os.path.join(home, "softhsm2.conf")
lib = PyKCS11.PyKCS11Lib()
lib.load(find_softhsm_module())
(slot,) = [s for s in lib.getSlotList(tokenPresent=True)
           if lib.getTokenInfo(s).label.strip() == "keybroker"]
session = lib.openSession(slot)
with open(os.path.join(home, "hsm.pin")) as fh:
    session.login(fh.read().strip())
for handle in session.findObjects([]):
    (label,) = session.getAttributeValue(handle, [PyKCS11.CKA_LABEL])
    label = bytes(label).decode() if not isinstance(label, str) else label
    if label.startswith(prefix):
        print(label)
session.logout()
"""


def hsm_labels(home: Path, prefix: str) -> list[str]:
    """A PKCS#11 search of the broker's token: the labels of the objects starting with
    `prefix`, sorted."""
    done = subprocess.run(
        [sys.executable, "-c", SEARCH, str(home), prefix],
        capture_output=True,
        text=True,
        env=server_env(),
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    return sorted(done.stdout.split())


def versions_on_hsm(home: Path, key_id: str) -> list[int]:
    """The versions of `key_id` whose KEK object the token still holds."""
    return [v for v in (1, 2) if hsm_labels(home, f"kek:{key_id}:v{v}:")]


def state_of(broker: BrokerProcess, key_id: str) -> int:
    request = key_admin_pb2.GetKeyRequest(key_id=key_id)
    return int(broker.keys().GetKey(request).key.state)


def destroy_events(broker: BrokerProcess, key_id: str) -> list[resources_pb2.AuditEvent]:
    request = audit_pb2.ListAuditEventsRequest(key_id=key_id, operation="DestroyKey")
    return [r.event for r in broker.audit().ListAuditEvents(request, timeout=60)]


def jwks_of(broker: BrokerProcess) -> dict[str, Any]:
    response = broker.tokens("auditor").GetSigningKeys(tokens_pb2.GetSigningKeysRequest())
    jwks: dict[str, Any] = json.loads(response.jwks_json)
    return jwks


def start(home: Path, config: Path, **env: str) -> BrokerProcess:
    return BrokerProcess.start(
        home, "--config", str(config), env=server_env(**FAST, **env)
    ).wait_ready()


def test_sigkill_at_each_step_of_a_destruction(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    before_any = config_file(home, "before-any", "destroy hang")
    before_second = config_file(home, "before-second", "destroy nth=2 hang")
    # The chain's own record is the process's first signature; the receipt is the second.
    before_receipt = config_file(home, "before-receipt", "sign nth=2 hang")
    plain = config_file(home, "plain")
    PENDING = resources_pb2.KEY_STATE_PENDING_DESTRUCTION

    # A key with two versions, a data key wrapped under each, then its destruction is due.
    first = start(home, before_any)
    key_id = create_key(first)  # type: ignore[arg-type]
    blobs = [datakey(first, key_id).wrapped_key]  # type: ignore[arg-type]
    first.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
    blobs.append(datakey(first, key_id).wrapped_key)  # type: ignore[arg-type]
    bearer = issue(first, key_id).token  # type: ignore[arg-type]
    assert versions_on_hsm(home, key_id) == [1, 2]
    first.keys().ScheduleKeyDestruction(
        key_admin_pb2.ScheduleKeyDestructionRequest(
            key_id=key_id, pending_window=Duration(seconds=1)
        )
    )

    # (a) Killed while the first destroy waits for the HSM: both objects are still there.
    first.wait_line(HUNG_DESTROY)
    assert versions_on_hsm(home, key_id) == [1, 2]
    first.kill()

    # (b) The next broker takes the claim over; killed with version 1 gone, version 2 not.
    second = start(home, before_second)
    second.wait_line(HUNG_DESTROY)
    assert versions_on_hsm(home, key_id) == [2]
    assert state_of(second, key_id) == PENDING
    second.kill()

    # (c) Killed once every object is gone and the event is durable, while the receipt is
    # being signed: the key is not DESTROYED yet.
    third = start(home, before_receipt, **NO_TIMED_CHECKPOINT)
    third.wait_line(HUNG_SIGN)
    assert versions_on_hsm(home, key_id) == []
    assert state_of(third, key_id) == PENDING
    assert len(destroy_events(third, key_id)) == 1
    third.kill()

    # Without faults, the destruction completes from where it stopped.
    with running(home, "--config", str(plain), env=server_env(**FAST)) as fourth:
        destroyed = resources_pb2.KEY_STATE_DESTROYED
        fourth.wait_for(lambda: state_of(fourth, key_id) == destroyed, "the key destroyed")
        assert hsm_labels(home, f"kek:{key_id}:") == []
        (event,) = destroy_events(fourth, key_id)  # nothing lost, nothing twice
        assert event.outcome == resources_pb2.OUTCOME_ALLOWED
        assert event.principal == SCHEDULER_PRINCIPAL

        request = key_admin_pb2.GetDestructionReceiptRequest(key_id=key_id)
        text = fourth.keys("auditor").GetDestructionReceipt(request).receipt_json
        receipt = evidence.verify_receipt(text + "\n", jwks_of(fourth), key_id=key_id)
        assert [v.version for v in receipt.versions] == [1, 2]
        assert (receipt.audit_sequence, receipt.audit_hash) == (event.sequence, event.hash)

        for blob in blobs:
            code, message = code_of(lambda b=blob: decrypt(fourth, b, bearer))  # type: ignore[misc,arg-type]
            assert code == grpc.StatusCode.FAILED_PRECONDITION, message
        report = fourth.verify()
        assert report.ok, report.error
        assert fourth.stop() == 0

    secret = (home / "hsm.pin").read_text().strip()
    for broker in (first, second, third, fourth):
        assert "Traceback" not in broker.output
        assert secret not in broker.output
