"""The raw PyKCS11 rate on SoftHSM2: what one process gets with no broker around it.

    python -m tests.bench.pkcs11raw SECONDS

One process, one logged-in session, a token key made with the broker's KEK template (AES-256,
GCM only). Measures, each for SECONDS: AES-GCM decrypt of a 32-byte data key (48 bytes with
the tag), and a data key as the broker makes one (GenerateRandom of key + IV, then AES-GCM
encrypt). Prints one JSON line: operations per second and CPU milliseconds per operation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PyKCS11

from broker.adapters.pkcs11.templates import KEK
from broker.devhsm import ensure_token

DATA_KEY_BYTES = 32
IV_BYTES = 12
TAG_BITS = 128
AAD = b'{"dataset":"bench"}'


def rate(op: Callable[[], object], seconds: float) -> dict[str, float]:
    for _ in range(200):  # warm-up
        op()
    n = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(100):
            op()
        n += 100
        now = time.perf_counter()
        if now >= deadline:
            break
    cpu = time.process_time() - cpu0
    return {"ops": n / (now - t0), "cpu_ms": cpu / n * 1000}


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 2.0
    home = Path(tempfile.mkdtemp(prefix="p11-bench-"))
    os.environ.pop("SOFTHSM2_CONF", None)
    token = ensure_token(home, "bench", home / "hsm.pin")
    lib = token.library.pykcs11
    session = lib.openSession(
        token.library.slot_for_token("bench"), PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
    )
    session.login(token.pin())
    template = [(k, v) for k, v in KEK.items()] + [(PyKCS11.CKA_LABEL, "bench-kek")]
    key = session.generateKey(template, PyKCS11.MechanismAESGENERATEKEY)
    iv = bytes(session.generateRandom(IV_BYTES))
    wrapped = bytes(
        session.encrypt(
            key, os.urandom(DATA_KEY_BYTES), PyKCS11.AES_GCM_Mechanism(iv, AAD, TAG_BITS)
        )
    )

    def decrypt() -> Any:
        return session.decrypt(key, wrapped, PyKCS11.AES_GCM_Mechanism(iv, AAD, TAG_BITS))

    def data_key() -> Any:
        material = bytes(session.generateRandom(DATA_KEY_BYTES + IV_BYTES))
        mech = PyKCS11.AES_GCM_Mechanism(material[DATA_KEY_BYTES:], AAD, TAG_BITS)
        return session.encrypt(key, material[:DATA_KEY_BYTES], mech)

    if len(bytes(decrypt())) != DATA_KEY_BYTES or len(bytes(data_key())) != len(wrapped):
        raise RuntimeError("the raw PKCS#11 calls did not give the expected sizes")
    result = {"decrypt": rate(decrypt, seconds), "datakey": rate(data_key, seconds)}
    session.logout()
    session.closeSession()
    shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
