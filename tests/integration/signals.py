"""Starting a child with SIGINT at its default action.

A shell's background job starts with SIGINT ignored (`make test` runs its two passes side by
side), every child inherits that, and a test that interrupts a child (the CLI's Ctrl-C, strace's
detach) would then wait for nothing. The prefix restores the default, then execs the command.
"""

from __future__ import annotations

import sys

#: Put before a command's argv (its first element an absolute path).
DEFAULT_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]
