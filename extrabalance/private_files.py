"""Files that hold money or personal data belong to the node's user alone.

The ledger (and SQLite's WAL and shared-memory files beside it), EDR files (full
MSISDNs), backups, reports and the logs the node writes are created 0600, and the
directories the node creates for them 0700, whatever the umask the process was started
with (a cron job or a container often has 022). An existing file of these kinds that
others could read is narrowed to 0600 when the node opens it; an existing directory is
left as the operator made it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """`mkdir -p` where every directory created here is 0700."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            directory.mkdir(mode=DIR_MODE)
            os.chmod(directory, DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def narrow(path: str | Path) -> None:
    """An existing file readable or writable by others than its owner → 0600."""
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077 or mode & FILE_MODE != FILE_MODE:
            os.chmod(path, FILE_MODE)


def private_file(path: str | Path) -> Path:
    """Create `path` empty and 0600 if it does not exist; narrow it if it does."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        narrow(path)
        return path
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def open_private(path: str | Path, mode: str = "a", **kwargs: Any) -> IO[Any]:
    """`open(path, mode)` for writing, the file created (or narrowed to) 0600 first."""
    private_file(path)
    return open(path, mode, **kwargs)
