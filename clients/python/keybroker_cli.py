"""Entry point of the `keybroker` console script.

It lives outside the `keybroker_client` package on purpose: gRPC core reads `GRPC_VERBOSITY`
when `grpc` is first imported, and importing any module of the package imports `grpc` (through
`keybroker_client/__init__.py`). Only here, before that import, can the CLI ask gRPC core to log
errors only: it prints TLS handshake failures on stderr, which the CLI reports in its own one
error line. A `GRPC_VERBOSITY` set by the user still wins. The SDK never touches the
environment.
"""

from __future__ import annotations

import os


def main() -> None:
    """Console-script entry point of `keybroker`."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from keybroker_client.cli.app import main as run

    run()


if __name__ == "__main__":
    main()
