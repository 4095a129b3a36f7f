"""The HTTP load generator used when `wrk` is missing: keep-alive POSTs from threads.

    python -m tests.bench.httpgen URL TOKEN_FILE BODY_HEX INFLIGHT

Speaks the protocol of `gen.py` (warm up, `ready`, window from stdin, one JSON line); a non-2xx
answer counts as an error. Slower per request than wrk: the report names the generator used.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from tests.bench.pygen import Tally


def main(argv: list[str]) -> int:
    url, token_file, body_hex, inflight = argv
    parts = urllib.parse.urlsplit(url)
    token = Path(token_file).read_text().strip()
    body = bytes.fromhex(body_hex)
    headers = {"X-Vault-Token": token, "Content-Type": "application/json"}
    tally = Tally(int(inflight))

    def loop() -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        going = True
        while going:
            start = time.monotonic_ns()
            conn.request("POST", parts.path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            failure = f"HTTP {resp.status}" if resp.status >= 300 else ""
            going = tally.record(start, time.monotonic_ns(), failure)
        conn.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(tally.inflight)]
    for t in threads:
        t.start()
    tally.ready.wait()
    print("ready", flush=True)
    tally.set_window(sys.stdin.readline())
    for t in threads:
        t.join()
    print(tally.result(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
