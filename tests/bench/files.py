"""`make bench`, files: throughput of encrypt_file / decrypt_file against raw AES-GCM.

Starts a broker process in a throwaway home, writes a generated 1 GiB file in a temporary
directory, then, pinned to one core, runs rounds of:

- raw encrypt: the same plaintext file read in chunks of the same size into one buffer, each
  chunk sealed with ``cryptography``'s AESGCM ``encrypt_into`` (a counter nonce) and written out,
  one ``readinto`` and one ``write`` per chunk (``--raw-io-size`` moves more chunks per call);
- recipe encrypt: ``KeybrokerClient.encrypt_file`` (GenerateDataKey, header, STREAM chunks,
  temporary file renamed);
- raw decrypt: the chunks that ``encrypt_file`` just wrote, opened with AESGCM ``decrypt_into``
  under that file's key (derived before the clock starts) and written out: the same chunks;
- recipe decrypt: ``decrypt_file`` of that file with a justification (header, IssueToken,
  Decrypt, chunks verified, temporary file renamed).

Raw is the plainest chunked AES-GCM file loop, I/O included. Neither raw nor the recipes call
fsync; both write a new file in the same directory. Every step writes a new file: its previous
output is deleted before the clock starts (freeing a 1 GiB page cache is not what is measured),
then ``sync`` runs so that no step pays for another's writeback; raw and recipe take turns going
first. The broker starts before the benchmark pins itself to one core, so the broker's threads
are not pinned to that core. ``--dir /dev/shm`` takes the disk out of the measurement.

Reports MB/s (10^6 bytes of plaintext per second, wall clock) as the median of the rounds with
min-max, the recipe/raw ratio per round (goal: at least 85 %), the CPU seconds per GiB, and the
in-memory AESGCM speed (no I/O) as the ceiling. Raw figures go to bench-results/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from keybroker_client import ClientSettings, KeybrokerClient, policy_from_grants
from keybroker_client.fileformat import (
    DEFAULT_CHUNK_SIZE,
    IO_SIZE,
    TAG_SIZE,
    Header,
    read_header,
)

from tests.bench.report import replace_section

CTX = {"dataset": "bench"}
GIB = 1 << 30


def start_broker(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "broker", "--home", str(home), "--listen", "127.0.0.1:0",
         "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
    )  # fmt: skip
    addr = home / "listen.addr"
    for _ in range(600):
        if addr.exists() and addr.read_text().strip():
            return server, addr.read_text().strip()
        if server.poll() is not None:
            break
        time.sleep(0.1)
    server.kill()
    raise SystemExit("the broker did not start")


def client(home: Path, target: str, who: str) -> KeybrokerClient:
    pki = home / "pki"
    return KeybrokerClient.from_settings(
        ClientSettings(target, pki / "ca.pem", pki / f"{who}.pem", pki / f"{who}.key")
    )


def generate(path: Path, size: int) -> None:
    block = bytearray(os.urandom(1 << 20))
    with open(path, "wb") as out:
        for i in range(size >> 20):
            block[:8] = i.to_bytes(8, "big")  # no two blocks alike
            out.write(block)


def raw_encrypt(src: Path, dst: Path, key: bytes, chunk: int, per_call: int = 1) -> None:
    """``per_call`` chunks per read and per write (1: one call each per chunk)."""
    aead = AESGCM(key)
    plain = memoryview(bytearray(chunk * per_call))
    sealed = memoryview(bytearray((chunk + TAG_SIZE) * per_call))
    nonce, counter = bytearray(12), 0
    with open(src, "rb", buffering=0) as fin, open(dst, "wb") as fout:
        while got := fin.readinto(plain):
            out = 0
            for start in range(0, got, chunk):
                n = min(chunk, got - start)
                nonce[:8] = counter.to_bytes(8, "big")
                counter += 1
                aead.encrypt_into(
                    nonce, plain[start : start + n], None, sealed[out : out + n + TAG_SIZE]
                )
                out += n + TAG_SIZE
            fout.write(sealed[:out])


def file_key(client: KeybrokerClient, path: Path) -> tuple[AESGCM, bytes, Header]:
    """The AEAD, AAD and header of a keybroker file, found the way decrypt_file does."""
    with open(path, "rb") as fh:
        header = read_header(fh)
    token = client.issue_token(header.key_id, header.context, "benchmark: raw decrypt").token
    data_key = client.decrypt(header.wrapped_key, header.context, token).plaintext
    okm = HKDF(SHA256(), 32, salt=header.salt, info=b"keybroker file v1").derive(data_key)
    return AESGCM(okm), hashlib.sha256(header.raw).digest(), header


def raw_decrypt(
    src: Path, dst: Path, aead: AESGCM, aad: bytes, header: Header, per_call: int = 1
) -> None:
    """``per_call`` chunks per read and per write (1: one call each per chunk)."""
    chunk = header.chunk_size + TAG_SIZE
    plain = memoryview(bytearray(header.chunk_size * per_call))
    sealed = memoryview(bytearray(chunk * per_call))
    nonce, counter = bytearray(header.nonce_prefix + bytes(5)), 0
    with open(src, "rb", buffering=0) as fin, open(dst, "wb") as fout:
        fin.seek(len(header.raw))
        while got := fin.readinto(sealed):
            out = 0
            for start in range(0, got, chunk):
                n = min(chunk, got - start)
                nonce[7:] = struct.pack(">IB", counter, n < chunk)
                counter += 1
                aead.decrypt_into(
                    nonce, sealed[start : start + n], aad, plain[out : out + n - TAG_SIZE]
                )
                out += n - TAG_SIZE
            fout.write(plain[:out])


def in_memory(key: bytes, chunk: int, size: int) -> float:
    """MB/s of AESGCM encrypt_into over ``size`` bytes of chunks, no I/O at all."""
    aead = AESGCM(key)
    plain, sealed = bytearray(os.urandom(chunk)), bytearray(chunk + TAG_SIZE)
    nonce = bytearray(12)
    t0 = time.perf_counter()
    for i in range(size // chunk):
        nonce[:8] = i.to_bytes(8, "big")
        aead.encrypt_into(nonce, plain, None, sealed)
    return size / (time.perf_counter() - t0) / 1e6


def timed(run: Callable[[], object], size: int) -> dict[str, float]:
    """Wall clock and CPU of one step; user and system time apart in the JSON (a difference in
    system time points at the kernel's file and memory paths, one in user time at the loop)."""
    before, cpu0, t0 = os.times(), time.process_time(), time.perf_counter()
    run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = os.times()
    return {
        "mb_s": size / wall / 1e6,
        "wall_s": wall,
        "cpu_s_per_gib": cpu * GIB / size,
        "user_s_per_gib": (after.user - before.user) * GIB / size,
        "system_s_per_gib": (after.system - before.system) * GIB / size,
    }


def cell(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


BEGIN = "<!-- files:begin (written by make bench: tests/bench/files.py) -->"
END = "<!-- files:end -->"


def section(
    args: argparse.Namespace,
    names: list[str],
    results: dict[str, list[dict[str, float]]],
    ratios: dict[str, list[float]],
    ceiling: list[float],
    where: Path,
) -> str:
    """The markdown section of docs/benchmarks.md for this run."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.raw_io_size <= args.chunk_size:
        raw_io = "one `readinto` and one `write` per chunk"
    else:
        raw_io = f"reading and writing {args.raw_io_size // 1024} KiB of whole chunks per call"
    lines = [
        "## File encryption: encrypt_file / decrypt_file against raw AES-GCM",
        "",
        f"Written by `make bench` (`tests/bench/files.py`) on {when}: a generated "
        f"{args.size_mib} MiB file, file to file in `{where}`, {args.chunk_size // 1024} KiB "
        f"chunks, one core (the benchmark pins itself; the broker runs beside it). Median of "
        f"{args.rounds} rounds, min-max in brackets; MB/s are 10^6 plaintext bytes per second of "
        "wall clock; CPU is the benchmark process's user + system time. Raw is cryptography's "
        "AESGCM `encrypt_into` / `decrypt_into` over the same chunks with one reused buffer, "
        f"{raw_io}, into a new file in the same directory "
        '(`open(path, "wb")`; decrypt: the very chunks `encrypt_file` wrote). The recipes add '
        "the broker calls, the header, HKDF, the STREAM nonces and checks, and a temporary file "
        "(mode 0600 for decrypt) renamed into place once the last chunk is done; they read and "
        f"write {IO_SIZE // 1024} KiB of whole chunks per call. Neither calls fsync. Goal: the "
        "recipe at least 85 % of raw.",
        "",
        "| step | MB/s | CPU s/GiB | % of raw |",
        "| --- | --- | --- | --- |",
    ]
    for name in names:
        rounds = results[name]
        op = name.removesuffix("_file")
        pct = cell(ratios[op]) if op in ratios else ""
        lines.append(
            f"| {name} | {cell([r['mb_s'] for r in rounds])} "
            f"| {cell([r['cpu_s_per_gib'] for r in rounds], '{:.2f}')} | {pct} |"
        )
    lines += [
        "",
        f"AESGCM alone, in memory (no I/O, the ceiling): {cell(ceiling)} MB/s.",
        f"Load average at the end: {os.getloadavg()[0]:.2f} (other work may share the 2 cores).",
        "",
        "```",
        f".venv/bin/python -m tests.bench.files {' '.join(sys.argv[1:])}".rstrip(),
        "```",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument(
        "--raw-io-size",
        type=int,
        default=0,
        help="bytes per read and write in the raw loops, in whole chunks (default: one chunk)",
    )
    parser.add_argument("--dir", help="where the files go (default: the system temp dir)")
    parser.add_argument("--doc", type=Path, default=Path("docs") / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="leave docs/benchmarks.md alone")
    args = parser.parse_args()
    size, chunk = args.size_mib << 20, args.chunk_size
    per_call = max(1, args.raw_io_size // chunk)
    home = Path(tempfile.mkdtemp(prefix="kb-bench-files-home-"))
    work = Path(tempfile.mkdtemp(prefix="kb-bench-files-", dir=args.dir))
    # The broker first: a child inherits its parent's CPU affinity, and the broker is not part
    # of what is measured (it runs beside the benchmark, on whichever core is free).
    server, target = start_broker(home)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    results: dict[str, list[dict[str, float]]] = {}
    try:
        admin, producer, consumer = (
            client(home, target, w) for w in ("admin", "producer", "consumer")
        )
        admin.create_key(
            "bench-files", policy=policy_from_grants(["producer:encrypt", "consumer:decrypt"])
        )
        plain = work / "plain.bin"
        generate(plain, size)
        key = os.urandom(32)
        raw_key: list[tuple[AESGCM, bytes, Header]] = []
        steps: dict[str, tuple[Path, Callable[[], object]]] = {
            "raw encrypt": (
                work / "raw.enc",
                lambda: raw_encrypt(plain, work / "raw.enc", key, chunk, per_call),
            ),
            "encrypt_file": (
                work / "file.kbf",
                lambda: producer.encrypt_file(
                    plain, work / "file.kbf", "bench-files", CTX, chunk_size=chunk
                ),
            ),
            "raw decrypt": (
                work / "raw.dec",
                lambda: raw_decrypt(work / "file.kbf", work / "raw.dec", *raw_key[-1], per_call),
            ),
            "decrypt_file": (
                work / "file.dec",
                lambda: consumer.decrypt_file(
                    work / "file.kbf", work / "file.dec", justification="benchmark"
                ),
            ),
        }
        names = list(steps)
        for i in range(args.rounds + 1):  # round 0 warms up: page cache, memory, connections
            for pair in (names[:2], names[2:]):
                if pair[0] == "raw decrypt":
                    raw_key.append(file_key(consumer, work / "file.kbf"))
                # Raw goes first in even rounds, the recipe in odd ones.
                for name in pair if i % 2 == 0 else pair[::-1]:
                    out, run = steps[name]
                    out.unlink(missing_ok=True)
                    os.sync()
                    timing = timed(run, size)
                    if i:
                        results.setdefault(name, []).append(timing)
        with open(plain, "rb") as fh:
            head = fh.read(1 << 20)
        for out in ("file.dec", "raw.dec"):
            with open(work / out, "rb") as fh:
                assert fh.read(1 << 20) == head, f"{out} differs from the plaintext"
        ceiling = [in_memory(key, chunk, size) for _ in range(args.rounds)]
        for c in (admin, producer, consumer):
            c.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    ratios = {
        op: [
            100 * r["mb_s"] / w["mb_s"]
            for r, w in zip(results[f"{op}_file"], results[f"raw {op}"], strict=True)
        ]
        for op in ("encrypt", "decrypt")
    }
    report = {
        "load_average": os.getloadavg(),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": platform.machine(),
            "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
        "size_bytes": size,
        "chunk_size": chunk,
        "results": results,
        "ratios_percent": ratios,
        "in_memory_aesgcm_mb_s": ceiling,
    }
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / f"files-{int(time.time())}.json").write_text(json.dumps(report, indent=2))
    text = section(args, names, results, ratios, ceiling, work.parent)
    print(text)
    if not args.no_doc:
        doc = args.doc.read_text() if args.doc.exists() else None
        args.doc.write_text(replace_section(doc, text, BEGIN, END))
        print(f"written to {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
