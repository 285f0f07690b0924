"""`extrabalance sim in` on a terminal stops on Ctrl-C at once: the console's pending
read of stdin must not hold the exit until the user presses Enter."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXIT_WAIT_S = 30.0  # generous for a loaded machine; without the fix it never exits


def test_sim_in_exits_on_ctrl_c_without_enter() -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extrabalance", "sim", "in", "--no-node-peer",
         "--node", "in1,127.0.0.1,in.example,0,2010*"],
        stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(terminal)
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + EXIT_WAIT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            seen.append(line)
            if "type help for commands" in line or not line:
                break
        assert any("type help" in line for line in seen), seen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=EXIT_WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
