"""Coverage-guided fuzzing of the parsers under atheris (`make fuzz`).

    python -m tests.fuzz.atheris_targets TARGET [libFuzzer options, e.g. -runs=200000]

Targets: blob, header, file, context, export. Each feeds atheris' bytes to one parser and
lets only that parser's documented error through; anything else is a crash, which atheris
reports with the input that caused it (saved as crash-*). A crash found here becomes an
`@example` in tests/unit/test_fuzz_parsers.py.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from keybroker_client import evidence
    from keybroker_client import fileformat as ff

    from broker import blob as blobs
    from broker.domain import canonical_context, validate_context
    from broker.errors import InvalidArgument

KEY = bytes(range(32))


def blob(data: bytes) -> None:
    try:
        parsed = blobs.parse(data)
    except InvalidArgument:
        return
    assert parsed.encode() == data


def header(data: bytes) -> None:
    try:
        ff.read_header(io.BytesIO(data))
    except ff.InvalidFile:
        return


def file(data: bytes) -> None:
    src = io.BytesIO(data)
    try:
        ff.FileCipher(KEY, ff.read_header(src)).decrypt(src, io.BytesIO())
    except ff.InvalidFile:
        return
    raise AssertionError("a file not made with the key decrypted")


def context(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    ctx = {
        fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 300)): fdp.ConsumeUnicode(
            fdp.ConsumeIntInRange(0, 300)
        )
        for _ in range(fdp.ConsumeIntInRange(0, 20))
    }
    try:
        checked = validate_context(ctx)
    except InvalidArgument:
        return
    canonical_context(checked)


_JWKS = {
    "keys": [
        {
            "kty": "EC",
            "crv": "P-256",
            "kid": "audit-1",
            "keybroker_purpose": "audit",
            "x": "KSexBRK64-3c_kZ4KBKLrSkDJpkZ9whgacjE32xzKDg",
            "y": "x3h5ZOqsAOWSH7FJimD0YGdms9loUAFVjRqXTnNBUT4",
        }
    ]
}


def export(data: bytes) -> None:
    # Never raises for any input once the JWKS is usable: a bad trail is a report.
    report = evidence.verify_export(data.split(b"\n"), _JWKS)
    assert not report.ok or not data.strip()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "blob": blob,
    "header": header,
    "file": file,
    "context": context,
    "export": export,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
