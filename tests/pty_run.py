"""Running ``lmstream`` with its stderr on a pseudo-terminal, as a person's terminal would be."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time


def read_stderr_on_a_terminal(*args: str, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Run ``lmstream ARGS`` with stderr on a pseudo-terminal: (status, stdout, what stderr
    showed, control sequences included)."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmstream_nb", *args],
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(leader)
    return proc.returncode, out, seen


def read_stdout_on_a_terminal(*args: str, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Run ``lmstream ARGS`` with stdout on a pseudo-terminal: (status, what stdout showed,
    control sequences included, stderr)."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmstream_nb", *args],
        stdout=follower,
        stderr=subprocess.PIPE,
    )
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
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(leader)
    return proc.returncode, seen, err
