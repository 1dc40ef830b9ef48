"""Running ``lmstream`` with stdout or stderr on a pseudo-terminal, as a person's terminal is."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time


def _on_a_terminal(args: tuple[str, ...], stream: str, timeout: float) -> tuple[int, bytes, bytes]:
    """(status, what the terminal showed with its control sequences, the other stream piped)."""
    leader, follower = os.openpty()
    tty_out = stream == "stdout"
    with subprocess.Popen(
        [sys.executable, "-m", "lmstream_nb", *args],
        stdout=follower if tty_out else subprocess.PIPE,
        stderr=subprocess.PIPE if tty_out else follower,
    ) as proc:
        os.close(follower)
        seen = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([leader], [], [], 0.5)
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                try:
                    data = os.read(leader, 4096)
                except OSError:  # the program ended and closed the terminal
                    break
                if not data:
                    break
                seen += data
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            os.close(leader)
    return proc.returncode, seen, (err if tty_out else out) or b""


def read_stderr_on_a_terminal(*args: str, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Run ``lmstream ARGS`` with stderr on a pseudo-terminal: (status, stdout, what stderr
    showed, control sequences included)."""
    status, shown, out = _on_a_terminal(args, "stderr", timeout)
    return status, out, shown


def read_stdout_on_a_terminal(*args: str, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Run ``lmstream ARGS`` with stdout on a pseudo-terminal: (status, what stdout showed,
    control sequences included, stderr)."""
    return _on_a_terminal(args, "stdout", timeout)
