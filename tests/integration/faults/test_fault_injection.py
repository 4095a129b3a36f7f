"""The fault injector itself (`hsm_sim.faulty`) and how a broker selects it: a spec string,
random faults with a seed, faults after the call, and the configuration that refuses to start
unless the environment allows injection."""

from __future__ import annotations

from pathlib import Path

import PyKCS11
import pytest

from broker.config import FAULT_INJECTION_ENV, ConfigError, HsmConfig, load_settings
from broker.errors import HsmUnavailable
from broker.fault_injection import with_faults
from hsm_sim.faulty import FaultyHsm, from_spec, parse_spec
from tests.fakes.hsm import FakeHsm
from tests.integration.faults.procs import BrokerProcess, config_file, server_env


def outcomes(hsm: FaultyHsm, calls: int) -> list[bool]:
    """Which of `calls` random() calls went through."""
    went = []
    for _ in range(calls):
        try:
            hsm.random(8)
            went.append(True)
        except HsmUnavailable as exc:
            assert "CKR_DEVICE_ERROR" in exc.message
            went.append(False)
    return went


def test_random_faults_repeat_with_their_seed() -> None:
    spec = "random p=0.3 seed=7 ckr=CKR_DEVICE_ERROR"
    first, again = (
        outcomes(from_spec(FakeHsm(), spec), 60),
        outcomes(from_spec(FakeHsm(), spec), 60),
    )
    other = outcomes(from_spec(FakeHsm(), spec.replace("seed=7", "seed=8")), 60)
    assert first == again
    assert first != other
    assert 0 < first.count(False) < 60
    faulty = FaultyHsm(FakeHsm())
    faulty.fail_at_random(PyKCS11.CKR_DEVICE_ERROR, 0.3, seed=7, methods={"random"})
    assert outcomes(faulty, 60) == first


def test_a_fault_after_the_call_leaves_its_effect() -> None:
    fake = FakeHsm()
    faulty = from_spec(fake, "generate_kek after ckr=CKR_DEVICE_ERROR; sign nth=2 delay=0.01")
    with pytest.raises(HsmUnavailable, match="CKR_DEVICE_ERROR"):
        faulty.generate_kek("kek:k:v1:00")
    assert "kek:k:v1:00" in fake.keks  # made; the caller never heard
    faulty.generate_kek("kek:k:v2:00")  # one call only (times defaults to 1 for errors)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("decrypt", "needs ckr="),
        ("decyrpt ckr=CKR_DEVICE_ERROR", "no such HSM method"),
        ("* ckr=CKR_NOT_A_CODE", "unknown CKR code"),
        ("* p=2 ckr=DEVICE_ERROR", "between 0 and 1"),
        ("* hang=soon", "'hang=soon'"),
        ("* nth=0 hang", "count from 1"),
        ("sign sometimes", "unknown word"),
    ],
)
def test_a_malformed_spec_is_one_clear_line(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match="fault rule") as refused:
        parse_spec(spec)
    assert words in str(refused.value)


def test_spec_lines_files_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "faults.txt"
    path.write_text(
        "# the device dies now and then\n* p=0.01 seed=1 ckr=DEVICE_ERROR\n\nsign hang=2\n"
    )
    rules = parse_spec(f"@{path}")
    assert [sorted(r.methods) for r in rules] == [[], ["sign"]]
    assert rules[0].ckr == PyKCS11.CKR_DEVICE_ERROR and rules[1].hang == 2.0
    assert len(parse_spec("decrypt ckr=0x30; encrypt delay=0.1")) == 2


def test_the_configuration_refuses_injection_unless_the_environment_allows_it(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    cfg = config_file(home, "faulty", "decrypt nth=2 ckr=CKR_DEVICE_ERROR")
    with pytest.raises(ConfigError) as refused:
        load_settings(home=home, config_file=cfg, env={})
    (line,) = refused.value.problems
    assert "hsm[0].fault_injection is for tests only" in line and FAULT_INJECTION_ENV in line
    settings = load_settings(home=home, config_file=cfg, env={FAULT_INJECTION_ENV: "1"})
    assert settings.hsms[0].fault_injection == "hsm_sim.faulty:from_spec"
    lone_spec = HsmConfig("x", "FR", "o", pin_env="P", fault_spec="decrypt ckr=DEVICE_ERROR")
    with pytest.raises(ConfigError, match="fault_spec is set but fault_injection is not"):
        load_settings(home=home, env={"KEYBROKER_HSM_0_FAULT_SPEC": lone_spec.fault_spec})
    # The loader checks again (settings built in code skip load_settings).
    injected = HsmConfig("x", "FR", "o", pin_env="P", fault_injection="hsm_sim.faulty:from_spec")
    with pytest.raises(ConfigError, match="for tests only"):
        with_faults(FakeHsm(), injected, env={})
    with pytest.raises(ConfigError, match="cannot load fault injector"):
        with_faults(
            FakeHsm(),
            HsmConfig("x", "FR", "o", fault_injection="no.such:thing"),
            env={FAULT_INJECTION_ENV: "1"},
        )
    assert isinstance(with_faults(FakeHsm(), injected, env={FAULT_INJECTION_ENV: "1"}), FaultyHsm)


def test_a_server_with_injection_but_not_allowed_refuses_to_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg = config_file(home, "faulty", "decrypt nth=2 ckr=CKR_DEVICE_ERROR")
    env = server_env()
    del env[FAULT_INJECTION_ENV]
    broker = BrokerProcess.start(home, "--config", str(cfg), env=env)
    assert broker.proc.wait(timeout=60) == 2
    broker.stop()
    assert broker.lines == [
        "keybroker-server: hsm[0].fault_injection is for tests only: it makes HSM calls fail "
        f"on purpose; remove it, or set {FAULT_INJECTION_ENV}=1 in a test environment"
    ]
    assert not (home / "keybroker.db").exists()  # refused before anything was opened
