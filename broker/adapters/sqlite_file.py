"""A start-up look at the SQLite file itself, before SQLite opens it.

SQLite notices a truncated file only when it reads a missing page, and never notices bytes
written past the last page: its next checkpoint cuts them off. Either is damage an operator
must hear of (a disk that lost a write, a copy cut short, someone appending to the file), and
neither may be repaired by the broker on its own. When no connection has the file open (no
`-wal`, `-shm` or `-journal` beside it), its length must be exactly the page count its header
gives times the page size; the broker refuses to start otherwise and leaves the file as it is.
"""

from __future__ import annotations

from pathlib import Path

from broker.errors import StoreUnavailable

_MAGIC = b"SQLite format 3\x00"


def check_file(path: Path) -> None:
    """Raises `StoreUnavailable` when `path` is not a whole SQLite database.

    Nothing is checked while another connection may be using the file (a WAL, shared-memory
    or rollback journal file exists): SQLite's own recovery then applies.
    """
    beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]
    if not path.exists() or any(p.exists() for p in beside):
        return
    size = path.stat().st_size
    with path.open("rb") as file:
        header = file.read(100)
    if size == 0:
        return  # created empty: SQLite makes it a database
    if len(header) < 100 or not header.startswith(_MAGIC):
        raise StoreUnavailable(_damaged(path, "it is not a SQLite database"))
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The page count is valid only when written by the same change as the change counter.
    if pages == 0 or header[92:96] != header[24:28]:
        return
    expected = pages * page_size
    if size != expected:
        what = "cut short" if size < expected else "written past its end"
        raise StoreUnavailable(
            _damaged(
                path,
                f"it is {size} bytes long where its header says {pages} pages of {page_size} "
                f"bytes ({expected}): it was {what}",
            )
        )


def _damaged(path: Path, why: str) -> str:
    return (
        f"the database file {path} is damaged: {why}. It was left as it is; restore it from "
        f"a backup, or inspect it with `sqlite3 {path} 'PRAGMA integrity_check'`"
    )
