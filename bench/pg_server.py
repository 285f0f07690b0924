"""A PostgreSQL server of the run's own, for the runs and tests that restart it.

What this file owns: `PgServer`, a throw-away cluster made with `initdb` in a temporary
directory and run with `pg_ctl` on a free loopback port (fsync and synchronous_commit
on, as in production), stopped and started again on demand — a fast shutdown (`-m
fast`: clients disconnected, a clean checkpoint) or a crash (`-m immediate`: every
process killed, WAL replay at the next start) — and removed at the end.

The machine's shared server is never restarted: the chaos run (`extrabalance chaos
--storage postgresql`) and the restart test start one of these instead.

`initdb` refuses to run as root. Run as root (a fresh machine where `make` runs as
root), the cluster belongs to the `postgres` account the server packages create: the
commands run through `runuser -u postgres` and the directory is made over to it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

BIN_GLOB = "/usr/lib/postgresql/*/bin"
BIN_ENV = "EB_PG_BIN"  # a directory holding initdb and pg_ctl (default: the newest found)
SERVER_USER = "postgres"  # who owns the cluster when we run as root
START_TIMEOUT_S = 60
STOP_MODES = ("smart", "fast", "immediate")


class PgServerUnavailable(RuntimeError):
    """No initdb/pg_ctl on this machine, or the cluster would not start."""


def find_bin_dir() -> Path:
    """The directory of `initdb` and `pg_ctl`: $EB_PG_BIN, else the newest server
    installed under /usr/lib/postgresql, else whatever is on PATH."""
    chosen = os.environ.get(BIN_ENV)
    if chosen:
        return Path(chosen)
    found = sorted(glob.glob(BIN_GLOB), key=lambda p: [int(x) for x in p.split("/")[-2].split(".")
                                                         if x.isdigit()] or [0])
    for candidate in reversed(found):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PgServerUnavailable(
        f"no initdb under {BIN_GLOB} nor on PATH: install the PostgreSQL server "
        f"(apt-get install postgresql) or set {BIN_ENV}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """`with PgServer() as pg:` a fresh cluster; `pg.dsn` reaches it as `postgres`
    (trust on loopback); `pg.restart("fast" | "immediate")`; removed on exit."""

    def __init__(self, *, port: int | None = None, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.port = port or free_port()
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="eb-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.restarts: list[str] = []  # the stop modes used, in order

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise PgServerUnavailable(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                f"; server log {self.log}")
        return done

    def init(self) -> Self:
        if self.as_root:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PgServerUnavailable(
                    f"running as root, and initdb refuses root: no '{SERVER_USER}' account to "
                    "run the cluster as (the PostgreSQL server package creates it)") from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--locale=C")
        conf = self.data / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as out:
            out.write(
                "\n# extrabalance: a private test cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = on\nsynchronous_commit = on\n"
                "max_connections = 100\nshared_buffers = 64MB\n"
                "logging_collector = off\n")
        return self

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(START_TIMEOUT_S), "start")

    def stop(self, mode: str = "fast") -> None:
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode {mode!r}: one of {', '.join(STOP_MODES)}")
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast", down_s: float = 0.0) -> None:
        """Stop (`fast` or `immediate` = a crash), stay down `down_s`, start again."""
        self.stop(mode)
        if down_s > 0:
            time.sleep(down_s)
        self.start()
        self.restarts.append(mode)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def remove(self) -> None:
        if self.data.exists() and self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                      check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.init().start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
