"""The Node.js client (clients/node, stubs loaded from protos/ at run time) runs producer ->
token -> consumer against the real broker over mutual TLS. Skipped where node is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from keybroker_client import ClientSettings, KeybrokerClient, Outcome

from tests.broker_fixtures import Broker, new_key_id

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = pytest.mark.skipif(not NODE or not NPM, reason="node and npm are not installed")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    modules = NODE_DIR / "node_modules"
    if (
        not (modules / "@grpc" / "grpc-js").is_dir()
        or not (modules / "@grpc" / "proto-loader").is_dir()
    ):
        subprocess.run(
            [str(NPM), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR, check=True, timeout=300,
        )  # fmt: skip
    return modules


def test_lock_file_pins_versions_without_download_addresses() -> None:
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    package = json.loads((NODE_DIR / "package.json").read_text())
    for name, version in package["dependencies"].items():
        assert version[0].isdigit(), f"{name} is not pinned"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert all("resolved" not in entry for entry in lock["packages"].values())
    assert all("integrity" in entry for path, entry in lock["packages"].items() if path)


def test_node_client_runs_producer_token_consumer(broker: Broker, node_modules: Path) -> None:
    key_id = new_key_id("node")
    run = subprocess.run(
        [str(NODE), "example.js", "--home", str(broker.home), "--target", broker.target,
         "--key-id", key_id],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    result = json.loads(run.stdout)
    assert result["data_key_matches"] is True
    assert (result["key_id"], result["key_version"]) == (key_id, 1)

    pki = broker.home / "pki"
    settings = ClientSettings(
        broker.target, pki / "ca.pem", pki / "auditor.pem", pki / "auditor.key"
    )
    with KeybrokerClient.from_settings(settings) as auditor:
        events = list(auditor.audit_events(key_id=key_id))
    assert [(e.principal, e.operation, e.outcome) for e in events] == [
        ("admin", "CreateKey", Outcome.ALLOWED),
        ("producer", "GenerateDataKey", Outcome.ALLOWED),
        ("consumer", "IssueToken", Outcome.ALLOWED),
        ("consumer", "Decrypt", Outcome.ALLOWED),
    ]
    assert events[2].justification == "survival study 42 (Node.js example)"
    assert events[3].token_id == result["token_id"]
    assert all(e.request_id for e in events)  # the client sends x-request-id


def test_node_client_reports_a_refusal(broker: Broker, node_modules: Path) -> None:
    # A key id the broker rejects: the example fails with the broker's status, exit status 1.
    run = subprocess.run(
        [str(NODE), "example.js", "--home", str(broker.home), "--target", broker.target,
         "--key-id", "Not A Key"],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.startswith("keybroker example: INVALID_ARGUMENT:"), run.stderr
