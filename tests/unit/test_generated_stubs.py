"""The committed gRPC stubs are exactly what `protos/` generates (`make proto` refreshes them).

Clients in other languages generate from `protos/` alone; the Python SDK ships committed stubs.
A proto change without `make proto` would make the two disagree on the wire contract.
"""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "clients" / "python" / "keybroker" / "v1"


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    protos = sorted(str(p) for p in (ROOT / "protos" / "keybroker" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{include}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ]
    )
    assert rc == 0
    fresh = tmp_path / "keybroker" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated, "protoc generated nothing"
    stale = [
        name
        for name in generated
        if not (COMMITTED / name).exists()
        or (COMMITTED / name).read_bytes() != (fresh / name).read_bytes()
    ]
    assert not stale, f"generated stubs are out of date: {', '.join(stale)}; run `make proto`"
