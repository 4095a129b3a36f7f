"""The file recipes over an in-memory stand-in for the broker: which calls they make, the token
they ask for, the data key wiped, and outputs that appear only when the input is genuine.
(The same recipes against the real broker: tests/integration/test_file_recipes.py.)"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from keybroker_client import (
    DataKey,
    Decrypted,
    InvalidArgument,
    InvalidFile,
    IssuedToken,
    fileformat,
)
from keybroker_client import recipes as recipes_module
from keybroker_client._async_recipes import AsyncFileRecipes
from keybroker_client.fileformat import FileCipher
from keybroker_client.recipes import FileRecipes

CTX = {"dataset": "cohort-42"}


class Broker(FileRecipes):
    """GenerateDataKey, IssueToken and Decrypt, kept in dicts; every call is logged."""

    def __init__(self) -> None:
        self.keys: dict[bytes, tuple[bytes, dict[str, str]]] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []

    def generate_data_key(self, key_id: str, context: Mapping[str, str] | None = None) -> DataKey:
        self.calls.append("GenerateDataKey")
        key = os.urandom(32)
        wrapped = b"KB\x01" + bytes([len(key_id)]) + key_id.encode() + os.urandom(64)
        self.keys[wrapped] = (key, dict(context or {}))
        return DataKey(key, wrapped, key_id, 1)

    def issue_token(
        self,
        key_id: str,
        context: Mapping[str, str] | None,
        justification: str,
        *,
        max_uses: int = 0,
    ) -> IssuedToken:
        self.calls.append("IssueToken")
        token = f"token-{len(self.tokens)}"
        self.tokens[token] = {
            "key_id": key_id,
            "context": dict(context or {}),
            "justification": justification,
            "max_uses": max_uses,
        }
        return IssuedToken(token, token, None, max_uses)

    def decrypt(
        self, ciphertext: bytes, context: Mapping[str, str] | None, token: str
    ) -> Decrypted:
        self.calls.append("Decrypt")
        key, bound = self.keys[ciphertext]
        if token not in self.tokens or dict(context or {}) != bound:
            raise InvalidArgument("INVALID_ARGUMENT", "ciphertext or context does not match")
        return Decrypted(key, ciphertext[4 : 4 + ciphertext[3]].decode(), 1)


class AsyncBroker(AsyncFileRecipes):
    def __init__(self, sync: Broker) -> None:
        self.sync = sync

    async def generate_data_key(self, key_id: str, context: Any = None) -> DataKey:
        return self.sync.generate_data_key(key_id, context)

    async def issue_token(self, *args: Any, **kw: Any) -> IssuedToken:
        return self.sync.issue_token(*args, **kw)

    async def decrypt(self, *args: Any) -> Decrypted:
        return self.sync.decrypt(*args)


@pytest.fixture
def fake() -> Broker:
    return Broker()


def encrypted(fake: Broker, data: bytes, context: dict[str, str] = CTX) -> bytes:
    out = io.BytesIO()
    info = fake.encrypt_stream(io.BytesIO(data), out, "patients", context, chunk_size=4096)
    assert (info.key_id, info.key_version, info.plaintext_size) == ("patients", 1, len(data))
    return out.getvalue()


def test_decrypting_asks_for_a_single_use_token_with_the_justification(fake: Broker) -> None:
    data = os.urandom(10_000)
    blob = encrypted(fake, data)
    out = io.BytesIO()
    info = fake.decrypt_stream(io.BytesIO(blob), out, justification="survival study 42")
    assert out.getvalue() == data and info.context == CTX
    assert fake.calls == ["GenerateDataKey", "IssueToken", "Decrypt"]
    (issued,) = fake.tokens.values()
    assert issued == {
        "key_id": "patients",
        "context": CTX,
        "justification": "survival study 42",
        "max_uses": 1,
    }


def test_a_given_token_is_used_as_is(fake: Broker) -> None:
    blob = encrypted(fake, b"record")
    token = fake.issue_token("patients", CTX, "study").token
    out = io.BytesIO()
    fake.decrypt_stream(io.BytesIO(blob), out, token=token)
    assert out.getvalue() == b"record"
    assert fake.calls == ["GenerateDataKey", "IssueToken", "Decrypt"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [({}, "needs a token"), ({"token": "t", "justification": "j"}, "not both")],
)
def test_neither_or_both_token_and_justification(
    fake: Broker, tmp_path: Path, kw: dict[str, str], match: str
) -> None:
    reader = io.BytesIO(encrypted(fake, b"x"))
    with pytest.raises(ValueError, match=match):
        fake.decrypt_stream(reader, io.BytesIO(), **kw)
    assert reader.tell() == 0  # refused before reading anything
    with pytest.raises(ValueError, match=match):
        fake.decrypt_file(tmp_path / "missing", tmp_path / "out", **kw)
    assert fake.calls == ["GenerateDataKey"]


def test_another_context_is_refused_before_any_call(fake: Broker) -> None:
    blob = encrypted(fake, b"x")
    with pytest.raises(InvalidFile, match="another context: dataset=cohort-42"):
        fake.decrypt_stream(
            io.BytesIO(blob), io.BytesIO(), context={"dataset": "cohort-43"}, justification="j"
        )
    assert fake.calls == ["GenerateDataKey"]
    out = io.BytesIO()
    fake.decrypt_stream(io.BytesIO(blob), out, context=CTX, justification="j")
    assert out.getvalue() == b"x"


def test_the_data_key_copy_is_zeroed_once_the_cipher_is_made(
    fake: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytearray] = []

    class Spy(FileCipher):
        def __init__(self, data_key: bytearray, header: Any) -> None:
            assert any(data_key)
            seen.append(data_key)
            super().__init__(data_key, header)

    monkeypatch.setattr(recipes_module, "FileCipher", Spy)
    blob = encrypted(fake, b"secret rows")
    fake.decrypt_stream(io.BytesIO(blob), io.BytesIO(), justification="j")
    assert len(seen) == 2
    assert all(isinstance(k, bytearray) and k == bytearray(32) for k in seen)


def test_files_round_trip_and_plaintext_is_private(fake: Broker, tmp_path: Path) -> None:
    data = os.urandom(70_000)
    (tmp_path / "in.csv").write_bytes(data)
    fake.encrypt_file(tmp_path / "in.csv", tmp_path / "in.kbf", "patients", CTX)
    info = fake.decrypt_file(tmp_path / "in.kbf", tmp_path / "out.csv", justification="j")
    assert (tmp_path / "out.csv").read_bytes() == data and info.plaintext_size == len(data)
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "in.kbf", "out.csv"]


@pytest.mark.parametrize("cut", [1, 17, 4096 + 16])
def test_a_truncated_or_tampered_file_leaves_no_output(
    fake: Broker, tmp_path: Path, cut: int
) -> None:
    data = os.urandom(3 * 4096)
    (tmp_path / "in.kbf").write_bytes(encrypted(fake, data)[:-cut])
    with pytest.raises(InvalidFile):
        fake.decrypt_file(tmp_path / "in.kbf", tmp_path / "out.csv", justification="j")
    # Chunks before the cut authenticated, but no plausible output is left, nor a temp file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.kbf"]
    (tmp_path / "out.csv").write_bytes(b"older output")
    with pytest.raises(InvalidFile):
        fake.decrypt_file(tmp_path / "in.kbf", tmp_path / "out.csv", justification="j")
    assert (tmp_path / "out.csv").read_bytes() == b"older output"


def test_a_tampered_chunk_after_many_writes_leaves_no_output(
    fake: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reads and writes of 2 chunks: chunks 0 to 9 are written to the temporary file before
    # chunk 10 fails; neither they nor the temporary file may be left.
    monkeypatch.setattr(fileformat, "IO_SIZE", 2 * 4096)
    blob = bytearray(encrypted(fake, os.urandom(12 * 4096 + 5)))
    blob[-(2 * 4112 + 21) + 100] ^= 0x80  # inside chunk 10 (of 13, the last one 21 bytes)
    (tmp_path / "in.kbf").write_bytes(bytes(blob))
    (tmp_path / "out.csv").write_bytes(b"older output")
    with pytest.raises(InvalidFile, match="chunk 10 does not authenticate"):
        fake.decrypt_file(tmp_path / "in.kbf", tmp_path / "out.csv", justification="j")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.kbf", "out.csv"]
    assert (tmp_path / "out.csv").read_bytes() == b"older output"


def test_a_failed_encryption_leaves_no_output(fake: Broker, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_bytes(b"rows")
    with pytest.raises(ValueError, match="power of two"):
        fake.encrypt_file(tmp_path / "in.csv", tmp_path / "in.kbf", "patients", chunk_size=5000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
    assert fake.calls == []  # refused before asking the broker for a data key


def test_async_recipes_match_the_sync_ones(fake: Broker, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    (tmp_path / "in.csv").write_bytes(data)
    abroker = AsyncBroker(fake)

    async def run() -> None:
        await abroker.encrypt_file(tmp_path / "in.csv", tmp_path / "in.kbf", "patients", CTX)
        await abroker.decrypt_file(tmp_path / "in.kbf", tmp_path / "out.csv", justification="j")

    asyncio.run(run())
    assert (tmp_path / "out.csv").read_bytes() == data
    # The async file is readable by the sync recipes: one format.
    out = io.BytesIO()
    with open(tmp_path / "in.kbf", "rb") as src:
        fake.decrypt_stream(src, out, justification="j")
    assert out.getvalue() == data
