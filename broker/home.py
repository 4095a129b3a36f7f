"""The broker's home directory: one broker at a time, and nobody else reading it.

The home holds the PIN file, the development PKI (with its CA's private key), the database
and its write-ahead log (audit justifications among them). Two rules follow:

- One broker per home. A second broker on the same home would overwrite `listen.addr` and
  delete it when it stops, and race the first over first-start set-up. `lock_home` takes an
  exclusive `flock` on HOME/broker.lock, which holds the holder's pid for the message a second
  start prints. The kernel drops the lock with the last descriptor of the process that took it,
  even on SIGKILL, so a crash never leaves a stale lock behind. Worker processes (`--workers`)
  are forked after the supervisor took the lock, inherit its descriptor and never ask again.
- Owner only. `tighten_home` makes every directory of the broker's state mode 0700 and every
  file 0600, whatever modes an older version, a restore or a hand-made home left; the server
  also sets its umask to 0o077 so that what it creates later (SQLite's -wal and -shm files
  among them) starts that way. The PIN file is the exception: one that others could read
  stops the start (`broker.config.read_pin_file`), since its PIN must then be changed, which
  a silent chmod would hide.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "broker.lock"
#: What the broker keeps directly in its home; `tighten_home` walks these (and the database).
STATE_NAMES = (
    LOCK_NAME,
    ".softhsm-init.lock",
    "listen.addr",
    "softhsm2.conf",
    "keybroker.db",
    "keybroker.db-wal",
    "keybroker.db-shm",
    "keybroker.db-journal",
    "pki",
    "tokens",
)
#: The files SQLite keeps beside a database.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


class HomeInUse(Exception):
    """Another process holds the home's lock.

    Attributes:
        home: the home directory.
        pid: the holder's pid, None when it had not written it yet.
        command: its command line from /proc, None when that cannot be read.
    """

    def __init__(self, home: Path, pid: int | None, command: str | None) -> None:
        self.home, self.pid, self.command = home, pid, command
        who = "another process" if pid is None else f"pid {pid}"
        if command:
            who += f" ({command})"
        super().__init__(
            f"home {home} is in use by another broker: {who}; stop it first, "
            "or give this one another --home"
        )


@dataclass(slots=True)
class HomeLock:
    """The home's lock, held while the descriptor is open."""

    path: Path
    fd: int

    def release(self) -> None:
        """Empties the pid and closes the descriptor (the file stays: removing it would let
        a starting broker lock a file that the next one no longer sees)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1


def lock_home(home: Path) -> HomeLock:
    """Creates `home` (mode 0700) if needed and takes its lock for this process.

    Raises:
        HomeInUse: another process holds it.
        OSError: the home or the lock file cannot be created.
    """
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / LOCK_NAME
    # O_CLOEXEC (Python's default): a program the broker would exec does not keep the lock;
    # forked workers do, which is the point.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise HomeInUse(home, pid, command_of(pid)) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return HomeLock(path, fd)


def holder(home: Path) -> HomeInUse | None:
    """Who holds the home's lock now, without taking it for long (for `--check-config`)."""
    try:
        fd = os.open(home / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        return HomeInUse(home, pid, command_of(pid))
    finally:
        os.close(fd)
    return None


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def command_of(pid: int | None) -> str | None:
    """The command line of process `pid` from /proc, quoted for a shell; None if unreadable."""
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return shlex.join(args) if args else None


def tighten_home(home: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """Removes group and other permissions from the broker's state: the home itself, what
    `STATE_NAMES` lists in it (recursively) and `extra` (a database kept elsewhere, with its
    SQLite companions). Directories become 0700, files lose every group and other bit (0644
    becomes 0600). Symbolic links are not followed.

    Only the broker's own names are touched, so a home that is also some other directory
    keeps its other files as they are.

    Returns:
        The paths whose mode changed (a non-empty list means they were exposed until now).
    """
    roots = [home / name for name in STATE_NAMES]
    for path in extra:
        roots += [path, *(path.with_name(path.name + s) for s in SQLITE_COMPANIONS)]
    changed = [home] if _tighten(home) else []
    for root in roots:
        changed += [p for p in _walk(root) if _tighten(p)]
    return changed


def _walk(root: Path) -> Iterator[Path]:
    if not root.exists() and not root.is_symlink():
        return
    yield root
    if root.is_dir() and not root.is_symlink():
        for directory, dirs, files in os.walk(root):
            for name in (*dirs, *files):
                yield Path(directory) / name


def _tighten(path: Path) -> bool:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False  # gone meanwhile (SQLite's -shm, a temporary file)
    if stat.S_ISLNK(info.st_mode):
        return False
    mode = stat.S_IMODE(info.st_mode)
    wanted = 0o700 if stat.S_ISDIR(info.st_mode) else mode & 0o700
    if mode == wanted:
        return False
    try:
        path.chmod(wanted)
    except OSError as exc:
        log.warning("cannot restrict %s to its owner: %s", path, exc.strerror)
        return False
    return True
