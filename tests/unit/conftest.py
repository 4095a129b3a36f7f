"""Fixtures shared by the client SDK and CLI unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.client_fakes import KEYBROKER_ENV, FakeBroker, Pki, make_pki, serve_fake_broker


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in KEYBROKER_ENV:
        monkeypatch.delenv(name, raising=False)
    # No profile file of the user running the tests: an empty config directory.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kbhome"))


@pytest.fixture
def fake_broker(client_pki: Pki) -> Iterator[FakeBroker]:
    yield from serve_fake_broker(client_pki)
