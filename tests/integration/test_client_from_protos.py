"""A client generated from protos/ alone, with the development certificates, runs the whole
producer -> consumer flow against a broker process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from grpc_tools import protoc

from tests.integration.test_server_process import start, stop, wait_ready

ROOT = Path(__file__).resolve().parents[2]

CLIENT = textwrap.dedent(
    """
    import sys
    import grpc
    from keybroker.v1 import (audit_pb2, audit_pb2_grpc, crypto_pb2, crypto_pb2_grpc,
                              key_admin_pb2, key_admin_pb2_grpc, resources_pb2,
                              tokens_pb2, tokens_pb2_grpc)
    import keybroker.v1
    gen_dir, target, pki = sys.argv[1], sys.argv[2], sys.argv[3]
    assert keybroker.v1.__path__[0].startswith(gen_dir), keybroker.v1.__path__

    def channel(name):
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(
            open(f"{pki}/ca.pem", "rb").read(), open(f"{pki}/{name}.key", "rb").read(),
            open(f"{pki}/{name}.pem", "rb").read()))

    ctx = {"dataset": "cohort-42"}
    policy = resources_pb2.KeyPolicy(grants=[
        resources_pb2.Grant(principal="producer", operations=[resources_pb2.OPERATION_ENCRYPT]),
        resources_pb2.Grant(principal="consumer", operations=[resources_pb2.OPERATION_DECRYPT],
                            context=ctx)])
    key_admin_pb2_grpc.KeyAdminStub(channel("admin")).CreateKey(
        key_admin_pb2.CreateKeyRequest(key_id="generated", policy=policy))
    dk = crypto_pb2_grpc.CryptoStub(channel("producer")).GenerateDataKey(
        crypto_pb2.GenerateDataKeyRequest(key_id="generated", context=ctx))
    consumer = channel("consumer")
    tok = tokens_pb2_grpc.TokensStub(consumer).IssueToken(tokens_pb2.IssueTokenRequest(
        key_id="generated", context=ctx, justification="generated client check"))
    out = crypto_pb2_grpc.CryptoStub(consumer).Decrypt(crypto_pb2.DecryptRequest(
        ciphertext=dk.wrapped_key, context=ctx, token=tok.token))
    assert out.plaintext == dk.plaintext_key
    verify = audit_pb2_grpc.AuditStub(channel("auditor")).VerifyAuditLog(
        audit_pb2.VerifyAuditLogRequest())
    assert verify.ok and verify.events_checked >= 4
    print("FLOW OK")
    """
)


def test_generated_client_runs_the_flow(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    protos = sorted(str(p) for p in (ROOT / "protos" / "keybroker" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{include}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            *protos,
        ]
    )
    assert rc == 0
    for pkg in (gen / "keybroker", gen / "keybroker" / "v1"):
        (pkg / "__init__.py").touch()
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    home = tmp_path / "home"
    proc = start(home)
    try:
        target = wait_ready(proc, home)
        # The generated stubs go first on sys.path; the client asserts it imported them.
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(gen)!r}); "
                f"sys.argv = ['client', {str(gen)!r}, {target!r}, {str(home / 'pki')!r}]; "
                f"exec(open({str(script)!r}).read())",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    finally:
        stop(proc)
    assert result.returncode == 0, result.stderr
    assert "FLOW OK" in result.stdout
