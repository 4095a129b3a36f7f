"""The deployment files under deploy/: the Kubernetes manifests parse and hold what
docs/deployment.md promises (probes, non-root, PIN from a Secret, no secret in the clear, a
headless Service), the configuration they carry is one the broker accepts, and the systemd
unit passes `systemd-analyze verify` (where systemd-analyze exists)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from broker.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
PLACEHOLDER = "CHANGE-ME"
SECRET_WORDS = re.compile(r"PIN|PASSWORD|SECRET|TOKEN|PRIVATE", re.IGNORECASE)


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document under deploy/kubernetes, by file name."""
    docs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S.glob("*.y*ml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for docs in manifests().values() for d in docs if d["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (found,) = by_kind(kind)
    return found


def container() -> dict[str, Any]:
    (found,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def config_text() -> str:
    return str(one("ConfigMap")["data"]["keybroker.toml"])


@pytest.fixture(scope="module")
def settings(config_text: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    where = tmp_path_factory.mktemp("k8s")
    (where / "keybroker.toml").write_text(config_text)
    # The PIN arrives from the Secret at run time; any value stands in for it here.
    env = {"KEYBROKER_HSM_PIN": "stand-in", "KEYBROKER_DATABASE_PASSWORD": "stand-in"}
    return load_settings(home=where / "home", config_file=where / "keybroker.toml", env=env)


# ---------------------------------------------------------------------------------------------
# Kubernetes


def test_every_manifest_parses_and_is_listed() -> None:
    docs = manifests()
    assert docs, "no manifest under deploy/kubernetes"
    for name, items in docs.items():
        assert items, f"{name} is empty"
        for doc in items:
            assert doc.get("apiVersion") and doc.get("kind"), name
    # Everything but the Secrets, whose placeholders must never overwrite the real values.
    listed = set(one("Kustomization")["resources"])
    secrets = {name for name, items in docs.items() if items[0]["kind"] == "Secret"}
    assert secrets and listed == set(docs) - {"kustomization.yaml"} - secrets


def test_the_kinds_a_deployment_needs_are_there() -> None:
    kinds = [d["kind"] for docs in manifests().values() for d in docs]
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "NetworkPolicy"):
        assert kind in kinds
    assert kinds.count("Secret") == 2


def test_three_replicas_non_root_read_only_without_privileges() -> None:
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    ctx = container()["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    resources = container()["resources"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[bound])


def test_probes_use_grpc_health_on_the_health_listener_only(settings: Any) -> None:
    c = container()
    health_port = port_of(settings.insecure_listen)
    assert c["readinessProbe"]["grpc"]["port"] == health_port
    assert c["startupProbe"]["grpc"]["port"] == health_port
    assert c["livenessProbe"]["tcpSocket"]["port"] == health_port
    # The mutual-TLS listener is the one the Service publishes; the health one is not.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": port_of(settings.listen), "health": health_port}
    service = one("Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
    # And no pod of the cluster is admitted to it.
    policy = one("NetworkPolicy")
    admitted = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert admitted == [port_of(settings.listen)]


def test_the_service_is_headless_and_selects_the_replicas() -> None:
    service = one("Service")
    assert service["spec"]["clusterIP"] == "None"
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["spec"]["minAvailable"] < one("Deployment")["spec"]["replicas"]
    policy = one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_the_pin_and_the_password_come_from_secrets(settings: Any) -> None:
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    env = {e["name"]: e for e in container()["env"]}
    assert settings.hsms[0].pin_env == "KEYBROKER_HSM_PIN"
    for name in ("KEYBROKER_HSM_PIN", "KEYBROKER_DATABASE_PASSWORD"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]["stringData"]
    # Every variable that could carry a secret takes it from a Secret, never a literal.
    for name, entry in env.items():
        if SECRET_WORDS.search(name):
            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name


def test_no_secret_in_the_clear(config_text: str) -> None:
    for secret in by_kind("Secret"):
        assert "data" not in secret, "secrets in files are placeholders in stringData"
        assert set(secret["stringData"].values()) == {PLACEHOLDER}
    # The configuration names no PIN or password (the broker refuses them in the file too).
    assert not re.search(r"^\s*(pin|password)\s*=", config_text, re.MULTILINE)
    for path in [*K8S.iterdir(), *SYSTEMD.iterdir()]:
        text = path.read_text()
        assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text, path.name


def test_mounts_match_the_configuration(settings: Any) -> None:
    c = container()
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    config_path = Path(c["args"][c["args"].index("--config") + 1])
    assert config_path == Path(mounts["config"]) / "keybroker.toml"
    assert Path(c["args"][c["args"].index("--home") + 1]) == Path(mounts["home"])
    for path in (settings.tls_cert, settings.tls_key, settings.client_ca):
        assert Path(path).parent == Path(mounts["tls"])
    # A writable home and /tmp under a read-only root file system.
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["home"] and "emptyDir" in volumes["tmp"]
    assert volumes["tls"]["secret"]["secretName"] == "keybroker-tls"


def test_replicas_share_one_database_and_one_broker_id(settings: Any) -> None:
    url = urlsplit(settings.store_url)
    assert url.scheme == "postgresql" and url.username and url.password is None
    assert settings.broker_id != "keybroker-local"


# ---------------------------------------------------------------------------------------------
# systemd


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def test_systemd_unit_is_hardened_and_takes_the_pin_as_a_credential() -> None:
    service = unit_entries(SYSTEMD / "keybroker.service")["Service"]
    assert service["User"] == ["keybroker"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["Restart"] == ["on-failure"]
    assert int(service["LimitNOFILE"][0]) >= 4096
    (exec_start,) = service["ExecStart"]
    argv = exec_start.split()
    assert argv[0].endswith("/keybroker-server") and "--config" in argv
    home = argv[argv.index("--home") + 1]
    assert home in service["ReadWritePaths"]
    assert not any(SECRET_WORDS.search(v) for v in service.get("Environment", []))
    credentials = dict(v.split(":", 1) for v in service["LoadCredential"])
    # deploy/systemd/keybroker.toml is the file the unit names, as installed.
    assert argv[argv.index("--config") + 1] == "/etc/keybroker/keybroker.toml"
    settings = load_settings(home=Path(home), config_file=SYSTEMD / "keybroker.toml", env={})
    run = Path("/run/credentials/keybroker.service")
    assert settings.hsms[0].pin_file == run / "hsm-pin"
    assert settings.store_password_file == run / "db-password"
    assert {"hsm-pin", "db-password"} == set(credentials)
    assert all(source.startswith("/etc/keybroker/credentials/") for source in credentials.values())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: a stand-in takes the installed path's place.
    program = tmp_path / "keybroker-server"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    text = (SYSTEMD / "keybroker.service").read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={program}", text, flags=re.MULTILINE)
    unit = tmp_path / "keybroker.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys or bad values too, and says so: any line is a finding.
    findings = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    assert result.returncode == 0 and findings == [], findings
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in security.stderr and "unrecognized" in security.stderr:
        pytest.skip("this systemd-analyze cannot rate a unit offline")
    assert security.returncode == 0, security.stdout[-2000:]
