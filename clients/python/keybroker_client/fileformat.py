"""The keybroker file format: a whole file as a stream of AES-256-GCM chunks (version 1).

This module is the format alone: no gRPC, no broker call. Given a 32-byte data key and its
wrapped form (the broker's ``GenerateDataKey`` answer) it writes and reads files laid out as
``docs/file-format.md`` describes byte by byte:

    header = magic "KBFS" | version 1 | chunk size exponent | nonce prefix (7) | salt (32)
             | wrapped key (length-prefixed) | encryption context (canonical entries)
    chunks = AES-256-GCM(file key, nonce = prefix | counter (4, big-endian) | last flag (1),
                         AAD = SHA-256(header)), each carrying exactly ``chunk_size`` plaintext
             bytes except the last, which carries fewer (possibly none)

This is the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár ("Online
authenticated-encryption and its nonce-reuse misuse-resistance", CRYPTO 2015): the counter
pins each chunk to its position, the flag marks the end, and the header digest pins every chunk
to its file. The file key is HKDF-SHA256 of the data key with the header's random salt, so a data
key is never used directly, and two files never share a key even under one data key.

Memory stays flat: one plaintext and one ciphertext buffer, reused, each holding the chunks of
one read (:data:`IO_SIZE`, or one chunk when chunks are larger). Reading and writing several
chunks per call takes 14 to 28 % less CPU per GiB, file to file, than one call per 64 KiB
chunk (``docs/benchmarks.md``). Decryption writes a chunk only after it authenticates, but a
stream cut short or altered is only known bad when the bad chunk is reached: the caller must
treat the output as final only when :meth:`FileCipher.decrypt` returns (see
:func:`keybroker_client.recipes.replace_on_success`).

The high-level calls that also talk to the broker are in :mod:`keybroker_client.recipes`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IO_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_HEADER_SIZE",
    "MIN_CHUNK_SIZE",
    "FileCipher",
    "Header",
    "InvalidFile",
    "check_context",
    "chunk_exponent",
    "new_header",
    "read_header",
    "wrapped_key_id",
]

MAGIC = b"KBFS"
VERSION = 1
#: Chunk sizes are powers of two from 2**12 (4 KiB) to 2**24 (16 MiB) plaintext bytes.
MIN_CHUNK_EXPONENT = 12
MAX_CHUNK_EXPONENT = 24
MIN_CHUNK_SIZE = 1 << MIN_CHUNK_EXPONENT
MAX_CHUNK_SIZE = 1 << MAX_CHUNK_EXPONENT
DEFAULT_CHUNK_SIZE = 64 * 1024
NONCE_PREFIX_SIZE = 7
SALT_SIZE = 32
TAG_SIZE = 16
DATA_KEY_SIZE = 32
#: A wrapped data key from the broker is 4 + n + 4 + 12 + 32 + 16 bytes (n <= 63); room to spare.
MAX_WRAPPED_KEY_SIZE = 1024
MAX_CONTEXT_ENTRIES = 16
MAX_CONTEXT_KEY_SIZE = 64
MAX_CONTEXT_VALUE_SIZE = 256
#: The counter is 4 bytes: at most 2**32 chunks per file (256 TiB at the default chunk size).
MAX_CHUNKS = 1 << 32
HKDF_INFO = b"keybroker file v1"
#: Plaintext bytes read or written per call: whole chunks, as many as fit (at least one). Fewer,
#: larger calls mean fewer system calls and larger page-cache folios; 1 MiB measured no better
#: than 512 KiB, and 4 MiB worse (docs/benchmarks.md), so memory stays at two such buffers.
IO_SIZE = 512 * 1024

# magic, version, chunk size exponent, nonce prefix, salt, wrapped key length
_FIXED = struct.Struct(">4sBB7s32sH")
_LENGTH = struct.Struct(">H")
_NONCE_TAIL = struct.Struct(">IB")
MAX_HEADER_SIZE = (
    _FIXED.size
    + MAX_WRAPPED_KEY_SIZE
    + 1
    + MAX_CONTEXT_ENTRIES * (2 * _LENGTH.size + MAX_CONTEXT_KEY_SIZE + MAX_CONTEXT_VALUE_SIZE)
)

Progress = Callable[[int], object]


class Reader(Protocol):
    """A binary input: ``open(path, "rb")``, ``sys.stdin.buffer``, ``io.BytesIO``."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Writer(Protocol):
    """A binary output: ``open(path, "wb")``, ``sys.stdout.buffer``, ``io.BytesIO``."""

    def write(self, data: memoryview, /) -> int | None: ...


class InvalidFile(ValueError):
    """The input is not a keybroker file, or it does not authenticate.

    One class for every failure, as with ``cryptography.exceptions.InvalidTag``: whether a file
    was truncated, reordered, spliced with another file's chunks, extended or edited, it is
    refused the same way. The message says where the reading stopped, never anything secret.
    """


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed or newly made file header.

    Attributes:
        chunk_size: plaintext bytes per chunk (a power of two, 4 KiB to 16 MiB).
        nonce_prefix: the 7 random bytes that start every chunk nonce.
        salt: the 32 random bytes of the file key derivation.
        wrapped_key: the broker's blob of the data key; it names its key and version.
        context: the encryption context the wrapped key was made with.
        raw: the header's bytes as written; their SHA-256 is every chunk's AAD.
    """

    chunk_size: int
    nonce_prefix: bytes
    salt: bytes
    wrapped_key: bytes
    context: Mapping[str, str]
    raw: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        """The key id named by the wrapped key."""
        return wrapped_key_id(self.wrapped_key)


def check_context(context: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Checks a context against the broker's limits; returns its entries encoded and sorted.

    Raises:
        ValueError: too many entries, an empty, oversize or NUL-carrying key or value.
    """
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise ValueError(f"a context has at most {MAX_CONTEXT_ENTRIES} entries")
    entries = []
    for key, value in context.items():
        k, v = key.encode("utf-8"), value.encode("utf-8")
        if not 1 <= len(k) <= MAX_CONTEXT_KEY_SIZE or b"\0" in k:
            raise ValueError(f"context key {key!r}: 1 to {MAX_CONTEXT_KEY_SIZE} bytes, no NUL")
        if len(v) > MAX_CONTEXT_VALUE_SIZE or b"\0" in v:
            raise ValueError(f"context value of {key!r}: at most {MAX_CONTEXT_VALUE_SIZE} bytes")
        entries.append((k, v))
    return sorted(entries)


def chunk_exponent(chunk_size: int) -> int:
    """``e`` such that ``chunk_size == 2**e``.

    Raises:
        ValueError: not a power of two from 4 KiB to 16 MiB.
    """
    exponent = chunk_size.bit_length() - 1
    if not MIN_CHUNK_EXPONENT <= exponent <= MAX_CHUNK_EXPONENT or chunk_size != 1 << exponent:
        raise ValueError(
            f"chunk size must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes"
        )
    return exponent


def new_header(
    wrapped_key: bytes, context: Mapping[str, str], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Header:
    """A header for a new file, with a fresh random nonce prefix and salt.

    Args:
        wrapped_key: ``DataKey.wrapped_key`` from the broker.
        context: the context the data key was generated with.
        chunk_size: plaintext bytes per chunk: a power of two from 4 KiB to 16 MiB.

    Raises:
        ValueError: a bad chunk size, wrapped key or context.
    """
    exponent = chunk_exponent(chunk_size)
    if not 1 <= len(wrapped_key) <= MAX_WRAPPED_KEY_SIZE:
        raise ValueError(f"a wrapped key has 1 to {MAX_WRAPPED_KEY_SIZE} bytes")
    entries = check_context(context)
    prefix, salt = os.urandom(NONCE_PREFIX_SIZE), os.urandom(SALT_SIZE)
    parts = [
        _FIXED.pack(MAGIC, VERSION, exponent, prefix, salt, len(wrapped_key)),
        wrapped_key,
        bytes([len(entries)]),
    ]
    for k, v in entries:
        parts += [_LENGTH.pack(len(k)), k, _LENGTH.pack(len(v)), v]
    return Header(chunk_size, prefix, salt, bytes(wrapped_key), dict(context), b"".join(parts))


def _read_exact(reader: Reader, size: int, what: str, raw: bytearray) -> bytes:
    buffer = bytearray(size)
    if _read_full(reader, memoryview(buffer)) != size:
        raise InvalidFile(f"not a keybroker file: it ends inside the header ({what})")
    raw += buffer
    return bytes(buffer)


def read_header(reader: Reader) -> Header:
    """Reads and checks a header, leaving ``reader`` at the first chunk.

    Every length is checked against its cap before anything is read or allocated, so a hostile
    header costs at most :data:`MAX_HEADER_SIZE` bytes.

    Raises:
        InvalidFile: not a keybroker file, an unsupported version, or a malformed header.
    """
    raw = bytearray()
    fixed = _read_exact(reader, _FIXED.size, "fixed fields", raw)
    magic, version, exponent, prefix, salt, wrapped_size = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise InvalidFile("not a keybroker file (no KBFS magic)")
    if version != VERSION:
        raise InvalidFile(f"unsupported file format version {version}; this client reads {VERSION}")
    if not MIN_CHUNK_EXPONENT <= exponent <= MAX_CHUNK_EXPONENT:
        raise InvalidFile(f"malformed header: chunk size exponent {exponent} is out of range")
    if not 1 <= wrapped_size <= MAX_WRAPPED_KEY_SIZE:
        raise InvalidFile(f"malformed header: wrapped key length {wrapped_size} is out of range")
    wrapped_key = _read_exact(reader, wrapped_size, "wrapped key", raw)
    (count,) = _read_exact(reader, 1, "context", raw)
    if count > MAX_CONTEXT_ENTRIES:
        raise InvalidFile(f"malformed header: {count} context entries (at most 16)")
    context: dict[str, str] = {}
    previous = b""
    for _ in range(count):
        key = _read_field(reader, 1, MAX_CONTEXT_KEY_SIZE, "context key", raw)
        value = _read_field(reader, 0, MAX_CONTEXT_VALUE_SIZE, "context value", raw)
        # Canonical form only (sorted, unique keys), so one context has one encoding.
        if key <= previous:
            raise InvalidFile("malformed header: context keys are not sorted and unique")
        previous = key
        try:
            context[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidFile("malformed header: a context entry is not UTF-8") from None
        if b"\0" in key or b"\0" in value:
            raise InvalidFile("malformed header: a context entry holds a NUL byte")
    return Header(1 << exponent, prefix, salt, wrapped_key, context, bytes(raw))


def _read_field(reader: Reader, low: int, high: int, what: str, raw: bytearray) -> bytes:
    (size,) = _LENGTH.unpack(_read_exact(reader, _LENGTH.size, what, raw))
    if not low <= size <= high:
        raise InvalidFile(f"malformed header: {what} length {size} is out of range")
    return _read_exact(reader, size, what, raw)


def wrapped_key_id(blob: bytes) -> str:
    """The key id a broker blob names (docs/blob-format.md: ``KB``, 0x01, length, key id).

    Raises:
        InvalidFile: the bytes are not a broker blob.
    """
    if len(blob) < 4 or blob[:3] != b"KB\x01" or not 1 <= blob[3] <= 63 or len(blob) < 4 + blob[3]:
        raise InvalidFile("the file's wrapped key is not a keybroker blob")
    try:
        return blob[4 : 4 + blob[3]].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidFile("the file's wrapped key is not a keybroker blob") from None


def _file_aead(data_key: bytes | bytearray, header: Header) -> AESGCM:
    """The file's AEAD: AES-256-GCM under HKDF-SHA256(data key, salt, "keybroker file v1")."""
    if len(data_key) != DATA_KEY_SIZE:
        raise ValueError(f"a data key has {DATA_KEY_SIZE} bytes")
    file_key = bytearray(DATA_KEY_SIZE)
    try:
        hkdf = HKDF(SHA256(), DATA_KEY_SIZE, salt=header.salt, info=HKDF_INFO)
        hkdf.derive_into(data_key, file_key)
        # AESGCM keeps its own copy of the key; ours is wiped below.
        return AESGCM(file_key)
    finally:
        file_key[:] = bytes(DATA_KEY_SIZE)


def _read_full(reader: Reader, view: memoryview) -> int:
    """Fills ``view`` unless the input ends first; returns how many bytes were read."""
    got = reader.readinto(view) or 0
    while got < len(view):
        more = reader.readinto(view[got:])
        if not more:
            break
        got += more
    return got


def _batch(chunk_size: int) -> int:
    """How many chunks one read or write moves."""
    return max(1, IO_SIZE // chunk_size)


def _pieces(got: int, piece: int, ended: bool) -> list[int]:
    """The lengths of the chunks in ``got`` bytes read: full ones, then, at the end of the
    input, the remainder (possibly empty: a missing or empty final chunk)."""
    full, rest = divmod(got, piece)
    return [piece] * full + ([rest] if ended else [])


def _write_all(writer: Writer, view: memoryview) -> None:
    written = writer.write(view)
    # Raw (unbuffered) files may take part of a write; buffered ones return the full length.
    while written is not None and written < len(view):
        view = view[written:]
        written = writer.write(view)


class FileCipher:
    """The AEAD of one file: encrypts or decrypts its chunks.

    The file key is derived at construction, so the caller can wipe its copy of the data key at
    once; the AES context keeps the derived key until the object is dropped.

    Args:
        data_key: the 32-byte plaintext data key that ``header.wrapped_key`` wraps.
        header: from :func:`new_header` to encrypt (a new one for every file), or from
            :func:`read_header` to decrypt.
    """

    def __init__(self, data_key: bytes | bytearray, header: Header) -> None:
        self.header = header
        self._aead = _file_aead(data_key, header)
        self._aad = hashlib.sha256(header.raw).digest()

    def _nonce(self) -> bytearray:
        nonce = bytearray(12)
        nonce[:NONCE_PREFIX_SIZE] = self.header.nonce_prefix
        return nonce

    def encrypt(self, reader: Reader, writer: Writer, *, progress: Progress | None = None) -> int:
        """Writes the header then the chunks of everything ``reader`` yields until its end.

        Args:
            reader: the plaintext.
            writer: where the file goes.
            progress: called with the number of plaintext bytes of each chunk.

        Returns:
            The number of plaintext bytes encrypted.
        """
        size = self.header.chunk_size
        batch = _batch(size)
        plain = memoryview(bytearray(batch * size))
        sealed = memoryview(bytearray(batch * (size + TAG_SIZE)))
        nonce, aead, aad = self._nonce(), self._aead, self._aad
        _write_all(writer, memoryview(self.header.raw))
        total = counter = 0
        while True:
            got = _read_full(reader, plain)
            # A short read is the end of the input: its remainder (possibly empty) is the
            # final chunk, the only one with fewer than ``size`` bytes.
            ended = got < len(plain)
            lengths = _pieces(got, size, ended)
            out = 0
            for i, n in enumerate(lengths):
                final = ended and i == len(lengths) - 1
                if not final and counter == MAX_CHUNKS - 1:
                    raise ValueError("input too large: a file holds at most 2**32 chunks")
                _NONCE_TAIL.pack_into(nonce, NONCE_PREFIX_SIZE, counter, final)
                start = i * size
                aead.encrypt_into(
                    nonce, plain[start : start + n], aad, sealed[out : out + n + TAG_SIZE]
                )
                out += n + TAG_SIZE
                counter += 1
            _write_all(writer, sealed[:out])
            total += got
            if progress is not None:
                for n in lengths:
                    progress(n)
            if ended:
                return total

    def decrypt(self, reader: Reader, writer: Writer, *, progress: Progress | None = None) -> int:
        """Reads the chunks after the header; writes each one's plaintext once it authenticates.

        Chunks are read and written several at a time (:data:`IO_SIZE`); a write holds only
        chunks that all authenticated.

        Args:
            reader: positioned after the header (see :func:`read_header`).
            writer: where the plaintext goes, chunk by chunk.
            progress: called with the number of file bytes of each chunk.

        Returns:
            The number of plaintext bytes written.

        Raises:
            InvalidFile: a chunk does not authenticate, the file ends before its final chunk,
                or bytes follow the final chunk. Output written before the error is not to be
                used.
        """
        size = self.header.chunk_size
        batch = _batch(size)
        sealed = memoryview(bytearray(batch * (size + TAG_SIZE)))
        plain = memoryview(bytearray(batch * size))
        nonce, aead, aad = self._nonce(), self._aead, self._aad
        total = counter = 0
        while True:
            got = _read_full(reader, sealed)
            # Only the final chunk is short, so the length alone tells which flag to expect:
            # a short read is the end of the file, and its remainder the final chunk.
            ended = got < len(sealed)
            lengths = _pieces(got, size + TAG_SIZE, ended)
            out = 0
            for i, n in enumerate(lengths):
                if counter == MAX_CHUNKS:
                    raise InvalidFile("the file has more chunks than the format allows")
                if n < TAG_SIZE:
                    raise InvalidFile(
                        f"the file is truncated: it ends before its final chunk ({counter})"
                    )
                final = ended and i == len(lengths) - 1
                _NONCE_TAIL.pack_into(nonce, NONCE_PREFIX_SIZE, counter, final)
                start = i * (size + TAG_SIZE)
                try:
                    aead.decrypt_into(
                        nonce, sealed[start : start + n], aad, plain[out : out + n - TAG_SIZE]
                    )
                except InvalidTag:
                    raise InvalidFile(
                        f"chunk {counter} does not authenticate: the file was truncated, "
                        "reordered, altered or mixed with another file"
                    ) from None
                out += n - TAG_SIZE
                counter += 1
            if ended and _read_full(reader, memoryview(bytearray(1))):
                raise InvalidFile("bytes follow the final chunk: the file was extended")
            _write_all(writer, plain[:out])
            total += out
            if progress is not None:
                for n in lengths:
                    progress(n)
            if ended:
                return total
