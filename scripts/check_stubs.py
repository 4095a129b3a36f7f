"""Fails when the committed gRPC stubs differ from what protos/ generates (run `make proto`)."""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "clients" / "python" / "keybroker" / "v1"


def main() -> int:
    protos = sorted(str(p) for p in (ROOT / "protos" / "keybroker" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'protos'}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                *protos,
            ]
        )
        if rc != 0:
            return rc
        fresh = Path(out) / "keybroker" / "v1"
        stale = [
            p.name
            for p in sorted(fresh.iterdir())
            if not (COMMITTED / p.name).exists()
            or not filecmp.cmp(p, COMMITTED / p.name, shallow=False)
        ]
    if stale:
        print(f"generated stubs are out of date: {', '.join(stale)}; run `make proto`")
        return 1
    print("generated stubs match protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
