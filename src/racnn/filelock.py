"""An exclusive lock on a file for as long as a process holds it open: the training run folder's ``.lock``
and ``racnn predict``'s ``OUT.lock``. ``flock``: the kernel releases it however the process ends."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import BinaryIO


class LockHeld(OSError):
    """:func:`hold_lock`'s file is held by another process; ``who``: ``"PID <n>"`` as that process wrote it
    (``"another process"`` in the instant between its lock and its write)."""

    def __init__(self, path: Path, holder: str) -> None:
        self.who = f"PID {holder}" if holder else "another process"
        super().__init__(f"{path}: locked by {self.who}")


def hold_lock(path: Path) -> BinaryIO:
    """``path`` (created if missing) opened, locked by an exclusive ``flock`` and holding this process's PID.
    The lock lasts until the file is closed or the process ends, however it ends (the kernel releases it);
    :class:`LockHeld` when another process holds it."""
    f = open(path, "a+b")  # noqa: SIM115 - the caller holds it open
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read(32).decode(errors="replace").strip()
        f.close()
        raise LockHeld(path, holder) from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n".encode())
    f.flush()
    return f
