"""A private Mosquitto broker for the demo, tests, benchmarks and chaos runs.

Starts ``mosquitto`` on a free 127.0.0.1 port with its own config and persistence
directory, so tests can stop, kill and restart it without touching any broker the
machine runs for other purposes. The config is the one the node requires in production
(docs/recharge.md): unlimited queued messages per client (Mosquitto's default of 1000
silently drops QoS 1 messages to a slow or offline subscriber) and persistence on.

``MosquittoBroker(dir).start()`` raises :class:`BrokerUnavailable` when there is no
mosquitto binary; tests use ``tests.mqtt_broker.start_broker_or_skip``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from extrabalance.private_files import open_private

__all__ = ["BrokerUnavailable", "MosquittoBroker", "find_mosquitto"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
AUTOSAVE_INTERVAL_S = 1


class BrokerUnavailable(RuntimeError):
    """No mosquitto binary on this machine, or it would not start."""


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, else in the sbin directories Debian uses."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MosquittoBroker:
    """One private broker; ``restart()`` keeps its port and its persistence file."""

    host = "127.0.0.1"

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        extra_config: tuple[str, ...] = (),
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerUnavailable("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else _free_port()
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "max_queued_messages 0",
            "max_inflight_messages 100",  # matches the node's [mqtt] inflight_max
            "persistence true",
            f"persistence_location {self.directory}/",
            f"autosave_interval {AUTOSAVE_INTERVAL_S}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            *extra_config,
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Started as root, mosquitto switches to its own user, which cannot write a
            # persistence file inside a test's private temporary directory.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> MosquittoBroker:
        if self.running:
            return self
        log = open_private(self.log_path, "ab")
        try:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerUnavailable(
                    f"mosquitto exited with {self._process.returncode}: {self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise BrokerUnavailable(f"mosquitto did not listen within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Graceful stop (SIGTERM): Mosquitto writes its persistence file first."""
        if not self.running:
            return
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: whatever changed since the last autosave is lost, as on a crash."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()

    def restart(self, *, graceful: bool = True) -> None:
        """Stop (or kill) and start again on the same port and persistence directory."""
        if graceful:
            self.stop()
        else:
            self.kill()
        # The listening socket can linger briefly after exit; start() retries for a while.
        self.start()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-500:]
        except OSError:
            return ""
