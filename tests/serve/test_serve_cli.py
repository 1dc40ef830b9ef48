"""``lmstream serve`` as a command: a real process on a free port, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serve_helpers import TIMEOUT, read_events, text_of

from lmstream_nb import PromptStore, simulator


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the process's stderr, waiting at most ``timeout`` seconds."""
    assert proc.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no output from lmstream serve within {timeout} s")
    return proc.stderr.readline()


def test_lmstream_serve_serves_until_ctrl_c(tmp_path: Path, sim: simulator.SimServer) -> None:
    db = tmp_path / "prompts.db"
    PromptStore(db).save("plain", "Tell me about rivers.")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmstream_nb",
            "serve",
            "--port",
            "0",
            "--base-url",
            sim.base_url,
            "--db",
            str(db),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, 20)
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        with httpx.Client(base_url=match[1], timeout=TIMEOUT) as client:
            run = client.post("/api/prompts/plain/runs", json={}).json()
            events, _ = read_events(client, run["events_url"])
        assert events[-1].event == "done"
        assert text_of(events) == PromptStore(db).get_run(run["run_id"]).text
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
