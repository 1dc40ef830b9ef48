"""``lmstream serve`` as a command: a real process on a free port, stopped with Ctrl-C (SIGINT),
and killed (SIGKILL) mid-run, then restarted on the same database."""

from __future__ import annotations

import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serve_helpers import SSE, TIMEOUT, read_events, text_of

from lmstream_nb import PromptStore, simulator

MODEL = "lmstream-sim-8b"
# 20 tokens a second for 100 s: still running when the service is killed.
CRAWL = '[[sim {"gen_tps": 20, "output_tokens": 2000, "jitter": 0}]] '


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the process's stderr, waiting at most ``timeout`` seconds."""
    assert proc.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no output from lmstream serve within {timeout} s")
    return proc.stderr.readline()


@contextmanager
def lmstream_serve(
    db: Path, base_url: str, *options: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``lmstream serve`` on a free port as a child process; yields it and its URL, and
    makes sure it is gone at the end (killed if it is still running)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmstream_nb",
            "serve",
            "--port",
            "0",
            "--base-url",
            base_url,
            "--db",
            str(db),
            *options,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, 20)
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        yield proc, match[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_connection_limits_and_extra_host_names_come_from_the_command_line(
    tmp_path: Path, sim: simulator.SimServer
) -> None:
    """--allow-host adds a name the Host header may carry; --request-timeout cuts a client that
    never finishes its request (a 408, then the connection closes)."""
    db = tmp_path / "prompts.db"
    PromptStore(db).save("plain", "Tell me about rivers.")
    options = ("--allow-host", "lmstream.test", "--request-timeout", "1", "--max-connections", "8")
    with lmstream_serve(db, sim.base_url, *options) as (_, url):
        port = url.rsplit(":", 1)[1]
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            named = client.get("/api/prompts", headers={"Host": f"lmstream.test:{port}"})
            other = client.get("/api/prompts", headers={"Host": f"evil.test:{port}"})
        assert named.status_code == 200
        assert other.status_code == 421
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as slow:
            slow.sendall(b"GET /api/prompts HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
            answer = b""
            while chunk := slow.recv(4096):  # bounded: the server closes within ~1 s
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--request-timeout", "0"), ("--request-timeout", "none"), ("--max-connections", "0")],
)
def test_a_bad_connection_limit_is_one_line_and_exit_2(option: str, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lmstream_nb", "serve", "--port", "0", option, value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert option in done.stderr
    assert "Traceback" not in done.stderr


def test_lmstream_serve_serves_until_ctrl_c(tmp_path: Path, sim: simulator.SimServer) -> None:
    db = tmp_path / "prompts.db"
    PromptStore(db).save("plain", "Tell me about rivers.")
    with lmstream_serve(db, sim.base_url) as (proc, url):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            run = client.post("/api/prompts/plain/runs", json={}).json()
            events, _ = read_events(client, run["events_url"])
        assert events[-1].event == "done"
        assert text_of(events) == PromptStore(db).get_run(run["run_id"]).text
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert time.monotonic() - started < 10


def test_after_a_kill_and_a_restart_every_event_id_resumes_to_an_end(
    tmp_path: Path, sim: simulator.SimServer
) -> None:
    """The service dies mid-run (SIGKILL: no clean-up at all) and a new one opens the same
    database. A client that resumes with whatever id it holds, even one ahead of what the store
    got (it appends once a second, so it lags what was sent), gets the stored text after its id
    and a final event, never a 400; one that has seen the final event gets 204."""
    db = tmp_path / "prompts.db"
    PromptStore(db).save("crawl", CRAWL + "Write forever about {{topic}}.", model=MODEL)
    with lmstream_serve(db, sim.base_url) as (proc, url):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            created = client.post("/api/prompts/crawl/runs", json={"variables": {"topic": "ice"}})
            run = created.json()
            # 1.5 s of text: the store has had at least one append by then.
            seen_events, reader = read_events(
                client,
                run["events_url"],
                stop=lambda events: sum(e.event == "delta" for e in events) >= 30,
            )
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
    seen = text_of(seen_events)
    assert reader.last_id == f"d:{len(seen)}:0"
    stored = PromptStore(db).get_run(run["run_id"])
    assert stored.text  # recorded while it streamed
    assert seen.startswith(stored.text) or stored.text.startswith(seen)

    ids = {
        "the last one seen": reader.last_id,
        "far ahead of the store": f"d:{len(seen) + 100_000}:0",
        "reasoning ahead": f"d:{len(seen)}:50",
        "the start event": "s:0:0",
        "none": None,
    }
    with (
        lmstream_serve(db, sim.base_url) as (_, url),
        httpx.Client(base_url=url, timeout=TIMEOUT) as client,
    ):
        finals: list[SSE] = []
        for what, last_id in ids.items():
            events, _ = read_events(client, run["events_url"], last_id=last_id)
            assert events[-1].event == "error", what
            finals.append(events[-1])
            offset = 0 if last_id in (None, "s:0:0") else len(seen)
            record = PromptStore(db).get_run(run["run_id"])
            assert text_of(events) == record.text[offset:], what
            assert (events[0].event == "start") == (last_id is None), what
        record = PromptStore(db).get_run(run["run_id"])
        assert record.text == stored.text  # nothing lost, nothing made up
        # The store tells a dead owner from a live one: the restart ended the run.
        assert record.status == "interrupted"
        assert {e.json()["status"] for e in finals} == {"interrupted"}
        assert "ended before the run finished" in finals[0].json()["message"]
        # A client that saw the final event is told to stop.
        end = client.get(run["events_url"], headers={"Last-Event-ID": finals[0].id or ""})
        assert end.status_code == 204
