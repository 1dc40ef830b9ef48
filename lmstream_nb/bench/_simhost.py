"""The benchmark's simulators, in a process of their own.

Why a separate process: the client, its recorder and every simulated server share one
interpreter lock when they share a process, so on a loaded machine a simulator answering one
cell makes the client of another cell wait for the lock, and the wait lands in that cell's
timed requests. Measured on a 2-core machine with two busy loops and other test suites beside
the benchmark (load average 6 to 7), the latest blocking answer of a default run came 300 to
600 ms (once 1.4 s) after its predicted time with the simulators in the benchmark's process,
and 380 to 440 ms with them here.

The protocol is one JSON object a line: the parent writes ``{"start": {config}}`` or
``{"stop": url}`` on the child's stdin and reads one reply a line (``{"url": ...}``,
``{"stopped": url}`` or ``{"error": sentence}``); at the end of its stdin the child stops every
server and exits. Anything else the child prints goes to its stderr, which the parent keeps the
tail of for the message it raises if the child dies. It uses the public ``simulator`` API only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .. import simulator

__all__ = ["SimHost"]

_REPLY_TIMEOUT_S = 30.0  # starting a server waits at most 10 s for uvicorn
_EXIT_TIMEOUT_S = 10.0
_STDERR_LINES = 20
_STDERR_WAIT_S = 2.0  # for a process that has ended to finish writing its stderr
# The child imports this very package, also when it is used from a source tree that is not
# installed.
_ROOT = str(Path(__file__).resolve().parents[2])


class SimHost:
    """A child process that starts and stops simulated servers on request.

    Use it as ``async with SimHost() as host:``; ``await host.start(config)`` returns the new
    server's base URL, ``await host.stop(url)`` stops it. Leaving the block ends the child,
    killing it if it does not end within a few seconds.
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._drain: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SimHost:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lmstream_nb.bench._simhost",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        self._drain = asyncio.ensure_future(self._keep_stderr())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()  # the child stops its servers and exits
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), _EXIT_TIMEOUT_S)
        finally:
            if self._drain is not None:
                self._drain.cancel()
            if proc.returncode is None:
                proc.kill()  # a kill is not refused; reap it without waiting long
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), _EXIT_TIMEOUT_S)

    async def _keep_stderr(self) -> None:
        stderr = self._proc.stderr if self._proc is not None else None
        if stderr is None:
            return
        async for line in stderr:
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("SimHost is used outside its `async with` block")
        async with self._lock:
            line = b""
            try:
                proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), _REPLY_TIMEOUT_S)
            except ConnectionError:
                line = b""  # the process is gone: said below, with its last words
            except asyncio.TimeoutError:
                raise RuntimeError(
                    f"The benchmark's simulator process did not answer within "
                    f"{_REPLY_TIMEOUT_S:g} s; run the benchmark again on a less busy machine."
                ) from None
        if not line:
            # Its stderr ends with it: the last lines are read before they are quoted.
            if self._drain is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._drain), _STDERR_WAIT_S)
            tail = " | ".join(self._stderr) or "no output"
            raise RuntimeError(
                f"The benchmark's simulator process ended unexpectedly ({tail}); "
                "run the benchmark again, and report it if it keeps happening."
            )
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(str(reply["error"]))
        return reply

    async def start(self, config: simulator.SimConfig) -> str:
        """Start a server with ``config`` (its port is picked by the system); its base URL."""
        fields = dataclasses.asdict(config)
        fields["models"] = list(config.models)
        return str((await self._ask({"start": fields}))["url"])

    async def stop(self, url: str) -> None:
        """Stop the server at ``url`` and drop its open connections."""
        await self._ask({"stop": url})


def _config(fields: dict[str, Any]) -> simulator.SimConfig:
    defaults = simulator.Scenario(**fields.pop("defaults"))
    return simulator.SimConfig(
        **{**fields, "models": tuple(fields["models"]), "defaults": defaults}
    )


def _serve(requests: IO[str], replies: IO[str]) -> None:
    """The child: answer each request line until the end of ``requests``."""
    servers: dict[str, simulator.SimServer] = {}
    try:
        for line in requests:
            request = json.loads(line)
            try:
                if "start" in request:
                    server = simulator.serve(_config(request["start"]))
                    servers[server.base_url] = server
                    reply: dict[str, Any] = {"url": server.base_url}
                else:
                    servers.pop(request["stop"]).stop()
                    reply = {"stopped": request["stop"]}
            except Exception as exc:  # reported to the parent, which raises it
                reply = {"error": f"The benchmark's simulator could not do {line.strip()}: {exc}"}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    finally:
        for server in servers.values():
            server.stop()


def _main() -> None:
    # Keep the protocol on the real stdout and send everything else (a stray print, a
    # library's warning) to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin, replies)


if __name__ == "__main__":
    _main()
