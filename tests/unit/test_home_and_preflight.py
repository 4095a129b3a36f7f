"""The home's lock and modes (`broker.home`) and the checks before a start (`broker.preflight`):
the TLS material never includes a CA's private key, a busy port is named in words."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import Settings, load_settings
from broker.devpki import ensure_dev_pki
from broker.home import HomeInUse, holder, lock_home, tighten_home
from broker.preflight import check_files, check_tls, listen_problem


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_lock_is_exclusive_names_its_holder_and_goes_with_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = lock_home(home)
    assert mode(home) == 0o700 and mode(home / "broker.lock") == 0o600
    assert (home / "broker.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(HomeInUse) as info:
        lock_home(home)
    assert info.value.pid == os.getpid()
    assert info.value.command is not None and "pytest" in info.value.command
    assert str(info.value).startswith(f"home {home} is in use by another broker: pid {os.getpid()}")
    seen = holder(home)
    assert seen is not None and seen.pid == os.getpid()
    first.release()
    assert holder(home) is None
    lock_home(home).release()


def test_no_lock_file_means_no_holder(tmp_path: Path) -> None:
    assert holder(tmp_path) is None
    assert not (tmp_path / "broker.lock").exists()


def test_tighten_restricts_the_brokers_state_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "pki").mkdir(parents=True)
    (home / "tokens" / "t1").mkdir(parents=True)
    for name in ("keybroker.db", "keybroker.db-wal", "keybroker.db-shm", "listen.addr"):
        (home / name).write_text("x")
    (home / "pki" / "ca.key").write_text("k")
    (home / "tokens" / "t1" / "token.object").write_text("t")
    (home / "notes.txt").write_text("mine")
    outside = tmp_path / "elsewhere.db"
    outside.write_text("db")
    (tmp_path / "elsewhere.db-wal").write_text("wal")
    (home / "pki" / "link").symlink_to(tmp_path / "notes-target")
    (tmp_path / "notes-target").write_text("t")
    for path in [home, *home.rglob("*"), outside, tmp_path / "elsewhere.db-wal"]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    (tmp_path / "notes-target").chmod(0o644)

    changed = tighten_home(home, [outside])

    for path in [home, home / "pki", home / "tokens", home / "tokens" / "t1"]:
        assert mode(path) == 0o700, path
    for path in [
        home / "keybroker.db", home / "keybroker.db-wal", home / "keybroker.db-shm",
        home / "listen.addr", home / "pki" / "ca.key", home / "tokens" / "t1" / "token.object",
        outside, tmp_path / "elsewhere.db-wal",
    ]:  # fmt: skip
        assert mode(path) == 0o600, path
    assert mode(home / "notes.txt") == 0o644  # not the broker's: left alone
    assert mode(tmp_path / "notes-target") == 0o644  # a link is not followed
    assert home / "keybroker.db-wal" in changed
    assert tighten_home(home, [outside]) == []


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    ensure_dev_pki(directory, ("admin",))
    return directory


def tls_settings(tmp_path: Path, cert: Path, key: Path, ca: Path) -> Settings:
    text = f'[tls]\ncert = "{cert}"\nkey = "{key}"\nclient_ca = "{ca}"\n'
    (tmp_path / "kb.toml").write_text(text)
    return load_settings(tmp_path / "home", config_file=tmp_path / "kb.toml", env={})


@pytest.fixture
def separate(pki: Path, tmp_path: Path) -> Iterator[Path]:
    """The server's files and the client CA certificate, without the CA's key."""
    directory = tmp_path / "tls"
    directory.mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki / name, directory / name)
    yield directory


def test_proper_tls_material_passes(tmp_path: Path, separate: Path) -> None:
    s = tls_settings(
        tmp_path, separate / "server.pem", separate / "server.key", separate / "ca.pem"
    )
    assert check_files(s, {}) == []
    assert check_tls(s) == ([], [])


def test_the_client_cas_key_as_the_server_key_is_refused(tmp_path: Path, pki: Path) -> None:
    s = tls_settings(tmp_path, pki / "ca.pem", pki / "ca.key", pki / "ca.pem")
    problems, _ = check_tls(s)
    assert any(
        p.startswith("tls.key: it is the private key of the client CA")
        and "whoever reads it can mint client identities" in p
        for p in problems
    ), problems
    assert any(
        p.startswith("tls.cert: the server certificate is a CA certificate") for p in problems
    )


def test_a_private_key_in_the_ca_bundle_is_refused(tmp_path: Path, pki: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((pki / "ca.pem").read_bytes() + (pki / "ca.key").read_bytes())
    s = tls_settings(tmp_path, pki / "server.pem", pki / "server.key", bundle)
    problems, _ = check_tls(s)
    assert f"tls.client_ca: {bundle} holds a private key" in problems[0]


def test_a_key_of_another_certificate_is_refused(tmp_path: Path, pki: Path) -> None:
    s = tls_settings(tmp_path, pki / "server.pem", pki / "admin.key", pki / "ca.pem")
    problems, _ = check_tls(s)
    assert problems == ["tls.key: the key does not belong to the first certificate of tls.cert"]


def test_a_client_cas_key_beside_the_tls_files_is_a_warning(tmp_path: Path, pki: Path) -> None:
    s = tls_settings(tmp_path, pki / "server.pem", pki / "server.key", pki / "ca.pem")
    problems, warnings = check_tls(s)
    assert problems == []
    assert warnings == [
        f"{pki / 'ca.key'} is the private key of a client CA (tls.client_ca) and sits beside "
        "the broker's TLS files: whoever can read them can mint client identities; "
        "keep it off this host"
    ]


def test_the_development_pki_says_what_its_ca_key_means(tmp_path: Path) -> None:
    s = load_settings(tmp_path / "home", env={})
    assert check_tls(s)[1][0].startswith(
        f"development PKI: its CA key {s.home / 'pki' / 'ca.key'} can issue a client certificate"
    )


def test_pin_files_are_checked_without_showing_the_pin(tmp_path: Path) -> None:
    pin = tmp_path / "a.pin"
    pin.write_text("9876")
    pin.chmod(0o644)
    text = f'[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin_file = "{pin}"\n'
    (tmp_path / "kb.toml").write_text(text)
    s = load_settings(tmp_path / "home", config_file=tmp_path / "kb.toml", env={})
    (problem,) = check_files(s, {})
    assert problem.startswith(f"hsm[0].pin_file: PIN file {pin} has mode 0644")
    assert "9876" not in problem
    pin.chmod(0o600)
    assert check_files(s, {}) == []


def test_the_embedded_pin_file_may_be_missing_before_the_first_start(tmp_path: Path) -> None:
    assert check_files(load_settings(tmp_path / "home", env={}), {}) == []


def test_a_missing_softhsm_module_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBROKER_PKCS11_MODULE", str(tmp_path / "libnone.so"))
    assert check_files(load_settings(tmp_path / "home", env={}), {}) == [
        f"hsm: KEYBROKER_PKCS11_MODULE={tmp_path / 'libnone.so'} names no file"
    ]


def test_a_busy_port_is_said_in_words() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert (
            listen_problem(f"127.0.0.1:{port}")
            == f"cannot listen on 127.0.0.1:{port}: address already in use"
        )
    assert listen_problem("127.0.0.1:0") == ""
    assert listen_problem("no-such-host.invalid:1").startswith(
        "cannot listen on no-such-host.invalid:1: cannot resolve"
    )
