"""SoftHSM2 token set-up (`broker.devhsm`), PIN files and the one-module-per-process rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm, Pkcs11Library
from broker.config import ConfigError, read_pin_file
from broker.devhsm import SoftHsmToken, ensure_token, find_softhsm_module, write_softhsm_conf
from tests.hsm_fixtures import unique_label
from tests.integration.hsm.common import AAD, IV, Softhsm


def test_ensure_token_is_idempotent(softhsm: Softhsm) -> None:
    library, token = softhsm
    home = token.conf_path.parent
    pin = token.pin()
    slot = library.slot_for_token(token.label)
    again = ensure_token(home, token.label, token.pin_file, library=library)
    assert again.pin() == pin
    assert library.slot_for_token(token.label) == slot
    assert list(library.tokens()).count(token.label) == 1
    # Without a library argument the one already loaded in this process is reused.
    third = ensure_token(home, token.label, token.pin_file)
    assert third.library is library
    assert (token.pin_file.stat().st_mode & 0o777) == 0o600
    assert token.conf_path == write_softhsm_conf(home)
    assert (home / "tokens").stat().st_mode & 0o777 == 0o700
    conf = token.conf_path.read_text()
    assert f"directories.tokendir = {home / 'tokens'}" in conf
    assert "objectstore.backend = file" in conf
    assert os.environ["SOFTHSM2_CONF"] == str(token.conf_path)


def test_second_token_shares_the_conf(softhsm: Softhsm, softhsm_second: SoftHsmToken) -> None:
    library, token = softhsm
    assert softhsm_second.conf_path == token.conf_path
    assert softhsm_second.library is library
    assert softhsm_second.pin() != token.pin()
    assert library.slot_for_token("us-east") != library.slot_for_token("keybroker")
    assert (softhsm_second.pin_file.stat().st_mode & 0o777) == 0o600
    # No SO PIN, nor anything else, is left beside the PIN files.
    leftovers = [p.name for p in token.conf_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_pin_never_on_a_command_line() -> None:
    import broker.devhsm as module

    source = Path(module.__file__).read_text()
    for spawn in ("subprocess", "os.system", "os.spawn", "os.exec", "Popen"):
        assert spawn not in source


def test_read_pin_refuses_unsafe_files(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\n")
    pin_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_pin_file(pin_file)
    pin_file.chmod(0o640)
    with pytest.raises(ConfigError, match="group or others"):
        read_pin_file(pin_file)
    pin_file.chmod(0o600)
    assert read_pin_file(pin_file) == "1234"
    pin_file.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_pin_file(pin_file)
    with pytest.raises(ConfigError, match="does not exist"):
        read_pin_file(tmp_path / "missing")


def test_existing_token_without_its_pin_file_is_refused(softhsm: Softhsm, tmp_path: Path) -> None:
    library, token = softhsm
    with pytest.raises(RuntimeError, match="does not exist"):
        ensure_token(token.conf_path.parent, token.label, tmp_path / "no-such.pin", library=library)


def test_one_conf_and_one_load_per_process(softhsm: Softhsm, tmp_path: Path) -> None:
    library, _token = softhsm
    with pytest.raises(RuntimeError, match=r"only one softhsm2\.conf"):
        ensure_token(tmp_path / "other-home", "keybroker", tmp_path / "pin", library=library)
    with pytest.raises(RuntimeError, match="already loaded"):
        Pkcs11Library(library.module_path)
    assert Pkcs11Library.shared(library.module_path) is library
    assert find_softhsm_module()


def test_library_refuses_a_forked_child(softhsm: Softhsm) -> None:
    library, _token = softhsm
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            library.tokens()
        except RuntimeError:
            os._exit(0)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_adapter_refuses_a_forked_child_even_with_its_key_handle_cached(hsm: Pkcs11Hsm) -> None:
    """The fork check runs on every call, also when nothing new is looked up on the token."""
    label = unique_label("fork")
    hsm.generate_kek(label)
    ciphertext = hsm.encrypt(label, IV, b"k" * 32, AAD)
    assert hsm.decrypt(label, IV, ciphertext, AAD) == b"k" * 32  # the handle is now cached
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            hsm.decrypt(label, IV, ciphertext, AAD)
        except RuntimeError as exc:
            os._exit(0 if "fork" in str(exc) else 3)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hsm.decrypt(label, IV, ciphertext, AAD) == b"k" * 32  # the parent goes on
