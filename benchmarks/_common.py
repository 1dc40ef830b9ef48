"""Shared pieces of the benchmarks: a replay server in its own process, stream rendering, helpers.

Why a minimal replay server instead of the simulator (or any ASGI server) for the measurement:
the benchmarks measure the *client*. An ASGI stack spends tens of microseconds per streamed chunk
(the app's generator, Starlette's body iterator, uvicorn's h11 framing, one ``transport.write``
per chunk), which caps every client at the server's rate and hides the differences between them.
This server sends bytes that were rendered once in advance (the simulator's own output where
possible) with a handful of large writes, in a separate process so that it does not compete with
the client for the GIL. On the wire it still looks like LM Studio: HTTP/1.1 keep-alive, chunked
transfer encoding with ONE HTTP chunk per SSE event, ``text/event-stream``. It can hold two
streams, the OpenAI-compatible one (``POST /v1/chat/completions``) and LM Studio 0.4's native
one (``POST /api/v1/chat``); with the native one it also answers ``GET /api/v1/models`` as
LM Studio 0.4 does, so a client left at ``api="auto"`` finds the native chat.

Run as ``python benchmarks/_common.py serve SPEC`` (the benchmarks do this themselves): it prints
``PORT <n>`` once it listens on 127.0.0.1 and exits when its stdin closes (so it cannot outlive
the benchmark that started it, even if that one is killed).

This module imports nothing outside the standard library at import time, so that the client
workers can measure their own import cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import platform
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "lmstream-sim-8b"
PROMPT = "Write a long answer."
MESSAGES = [{"role": "user", "content": PROMPT}]
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 5.0


def ensure_repo_on_path() -> None:
    """Make ``import lmstream_nb`` pick the working tree, also when it is not installed."""
    root = str(REPO)
    if root not in sys.path:
        sys.path.insert(0, root)


def child_env() -> dict[str, str]:
    """Environment for worker processes: the working tree first on the path, no proxies."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(key, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def versions() -> str:
    """One line with the versions that matter for reading the figures."""
    from importlib import metadata

    parts = [f"Python {platform.python_version()}"]
    for dist in ("httpx", "httpcore", "h11", "openai"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    parts.append(f"{os.cpu_count()} CPUs")
    return ", ".join(parts)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100] (same rule as numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# Rendering streams


def http_chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (size line, payload, CRLF)."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


LAST_CHUNK = b"0\r\n\r\n"

# The chunk layout the simulator (and LM Studio) sends; used only when the simulator is missing.
FALLBACK_CHUNK: dict[str, Any] = {
    "id": "chatcmpl-benchmark0000000000",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": MODEL,
    "system_fingerprint": MODEL,
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ],
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


APIS = ("openai", "native")
# The client stacks that throughput.py and ttft.py compare, in their table order.
STACKS = ("baseline", "lmstream", "openai", "native-baseline", "native-lmstream")
LABELS = {
    "baseline": "httpx aiter_lines + json.loads (baseline)",
    "lmstream": "lmstream_nb stream_chat, api='openai'",
    "openai": "openai AsyncOpenAI stream=True",
    "native-baseline": "httpx aiter_lines + json.loads (native)",
    "native-lmstream": "lmstream_nb stream_chat, api='native'",
}
API_OF = {stack: "native" if stack.startswith("native-") else "openai" for stack in STACKS}
# (baseline, lmstream) of each stream: the pair behind its ratio and verdict.
PAIRS = {"openai": ("baseline", "lmstream"), "native": ("native-baseline", "native-lmstream")}


def openai_request(output_tokens: int) -> dict[str, Any]:
    """The body a hand-written client posts to /v1/chat/completions."""
    return {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "sim": {"output_tokens": output_tokens},
    }


def native_request(output_tokens: int) -> dict[str, Any]:
    """The body a hand-written client posts to LM Studio 0.4's /api/v1/chat."""
    return {
        "model": MODEL,
        "input": PROMPT,
        "stream": True,
        "store": False,
        "sim": {"output_tokens": output_tokens},
    }


def native_chat_url(base_url: str) -> str:
    """``http://host:port/v1`` → ``http://host:port/api/v1/chat`` (the same port)."""
    return base_url.removesuffix("/v1") + "/api/v1/chat"


def simulator_stream(output_tokens: int, api: str = "openai") -> list[bytes] | None:
    """The raw SSE events (without the blank line) of one simulator answer, or None.

    ``api`` is ``"openai"`` (chat-completion chunks) or ``"native"`` (LM Studio 0.4's named
    events). The simulator runs with profile "instant" (no sleeps) in this process, only to
    render the bytes once; it is stopped before any measurement starts.
    """
    ensure_repo_on_path()
    try:
        import httpx

        from lmstream_nb import simulator
    except ImportError as exc:
        print(f"(simulator not importable: {exc}; rendering the stream locally)")
        return None
    with simulator.serve(profile="instant") as sim, httpx.Client(trust_env=False) as http:
        if api == "native":
            url, body = native_chat_url(sim.base_url), native_request(output_tokens)
        else:
            url, body = sim.base_url + "/chat/completions", openai_request(output_tokens)
        response = http.post(url, json=body, timeout=httpx.Timeout(120.0))
        response.raise_for_status()
        raw = response.content
    events = raw.split(b"\n\n")
    if events and events[-1] == b"":
        events.pop()
    return events


def chunk_template() -> dict[str, Any]:
    """A content chunk exactly as the simulator sends it (id, created, keys), or the fallback."""
    events = simulator_stream(1)
    if events:
        for event in events:
            obj = json.loads(event.removeprefix(b"data: "))
            if obj.get("choices") and obj["choices"][0].get("delta", {}).get("content"):
                return dict(obj)
    copy: dict[str, Any] = json.loads(json.dumps(FALLBACK_CHUNK))
    return copy


def content_event(template: dict[str, Any], content: str) -> bytes:
    obj = json.loads(json.dumps(template))
    obj["choices"][0]["delta"] = {"role": "assistant", "content": content}
    obj["choices"][0]["finish_reason"] = None
    return b"data: " + _dumps(obj)


def closing_events(template: dict[str, Any], completion_tokens: int) -> list[bytes]:
    """Finish chunk, usage chunk and ``[DONE]``, in the simulator's order."""
    finish = json.loads(json.dumps(template))
    finish["choices"][0]["delta"] = {}
    finish["choices"][0]["finish_reason"] = "stop"
    usage = json.loads(json.dumps(template))
    usage["choices"] = []
    usage["usage"] = {
        "prompt_tokens": 1,
        "completion_tokens": completion_tokens,
        "total_tokens": completion_tokens + 1,
    }
    return [b"data: " + _dumps(finish), b"data: " + _dumps(usage), b"data: [DONE]"]


def local_stream(template: dict[str, Any], contents: Sequence[str]) -> list[bytes]:
    events = [content_event(template, c) for c in contents]
    return events + closing_events(template, len(contents))


def _native_event(kind: str, **fields: Any) -> bytes:
    return b"event: %s\ndata: %s" % (kind.encode(), _dumps({"type": kind, **fields}))


def local_native_stream(contents: Sequence[str]) -> list[bytes]:
    """LM Studio 0.4's events for an answer to a loaded model, in the simulator's order."""
    events = [_native_event("chat.start", model_instance_id=MODEL)]
    events += [
        _native_event("prompt_processing.start"),
        _native_event("prompt_processing.progress", progress=0.0),
        _native_event("prompt_processing.progress", progress=1.0),
        _native_event("prompt_processing.end"),
        _native_event("message.start"),
    ]
    events += [_native_event("message.delta", content=c) for c in contents]
    result = {
        "model_instance_id": MODEL,
        "output": [{"type": "message", "content": "".join(contents)}],
        "stats": {
            "input_tokens": 5,
            "total_output_tokens": len(contents),
            "reasoning_output_tokens": 0,
            "tokens_per_second": 1000.0,
            "time_to_first_token_seconds": 0.0,
        },
        "response_id": "resp_benchmark0000000000",
    }
    return [*events, _native_event("message.end"), _native_event("chat.end", result=result)]


def stream_events(output_tokens: int, api: str = "openai") -> tuple[list[bytes], str]:
    """SSE events of an answer of ``output_tokens`` chunks and where they came from."""
    events = simulator_stream(output_tokens, api)
    if events is not None:
        return events, "simulator (profile 'instant'), rendered once"
    words = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog."]
    contents = [words[i % len(words)] for i in range(output_tokens)]
    if api == "native":
        return local_native_stream(contents), "rendered locally in the simulator's format"
    return local_stream(FALLBACK_CHUNK, contents), "rendered locally in the simulator's format"


def expected_content(events: Sequence[bytes]) -> tuple[int, int]:
    """(content chunks, text characters) that a correct client must see in ``events``.

    Reads both formats: chat-completion chunks up to ``[DONE]``, and native events, whose
    text is in ``message.delta``.
    """
    chunks = chars = 0
    for event in events:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line.removeprefix(b"data:").strip()
            if data == b"[DONE]":
                return chunks, chars
            obj = json.loads(data)
            if "choices" in obj:
                choices = obj["choices"]
                content = (choices[0].get("delta") or {}).get("content") if choices else None
            else:
                content = obj.get("content") if obj.get("type") == "message.delta" else None
            if content:
                chunks += 1
                chars += len(content)
    return chunks, chars


@dataclass(frozen=True)
class ReplaySpec:
    """The response body, already in HTTP chunked framing: ``head + middle * repeat + tail``.

    ``middle``/``repeat`` let a 2.6-million-chunk stream be served without holding 600 MB.
    """

    head: bytes
    middle: bytes = b""
    repeat: int = 0
    tail: bytes = b""

    @classmethod
    def from_events(cls, events: Sequence[bytes]) -> ReplaySpec:
        body = b"".join(http_chunk(e + b"\n\n") for e in events) + LAST_CHUNK
        return cls(head=body)


# ---------------------------------------------------------------------------------------------
# The replay server (runs in its own process)

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Powered-By: Express\r\n"
    b"Connection: keep-alive\r\n"
    b"Keep-Alive: timeout=60\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_MODELS = _dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "organization_owner"}]}
)
# LM Studio 0.4's GET /api/v1/models, cut to what a client reads: the loaded instance, its
# context and slots. Served only with a native stream (a client at api="auto" then uses it).
_NATIVE_MODELS = _dumps(
    {
        "models": [
            {
                "type": "llm",
                "key": MODEL,
                "display_name": MODEL,
                "format": "gguf",
                "max_context_length": 131072,
                "loaded_instances": [
                    {"id": MODEL, "config": {"context_length": 131072, "parallel": 4}}
                ],
            }
        ]
    }
)
_BATCH_BYTES = 256 * 1024
# GET /_stats: per client (User-Agent), TCP connections opened and requests sent: shows reuse.
_STATS: dict[str, dict[str, int]] = {}


def _plain(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode() + body


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> None:
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return
    length = int(headers.get(b"content-length", b"0"))
    if length:
        await reader.readexactly(length)


async def _send_stream(writer: asyncio.StreamWriter, spec: ReplaySpec) -> None:
    if not spec.repeat:
        writer.write(_SSE_HEAD + spec.head + spec.tail)  # one write: no Nagle games
        return
    per_batch = max(1, _BATCH_BYTES // len(spec.middle))
    batch = spec.middle * per_batch
    writer.write(_SSE_HEAD + spec.head)
    left = spec.repeat
    while left >= per_batch:
        writer.write(batch)
        await writer.drain()
        left -= per_batch
    writer.write(spec.middle * left + spec.tail)


async def _connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    spec: ReplaySpec,
    native: ReplaySpec | None,
) -> None:
    counted = False
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.transport.set_write_buffer_limits(high=4 * _BATCH_BYTES)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            await _read_body(reader, headers)
            path = target.split(b"?", 1)[0]
            if path != b"/_stats":
                agent = headers.get(b"user-agent", b"?").decode(errors="replace").split("/")[0]
                entry = _STATS.setdefault(agent, {"connections": 0, "requests": 0})
                entry["requests"] += 1
                if not counted:
                    entry["connections"] += 1
                    counted = True
            if method == b"POST" and path == b"/v1/chat/completions":
                await _send_stream(writer, spec)
            elif method == b"POST" and path == b"/api/v1/chat" and native is not None:
                await _send_stream(writer, native)
            elif method == b"GET" and path == b"/_stats":
                writer.write(_plain("200 OK", _dumps(_STATS)))
            elif method == b"GET" and path == b"/v1/models":
                writer.write(_plain("200 OK", _MODELS))
            elif method == b"GET" and path == b"/api/v1/models" and native is not None:
                writer.write(_plain("200 OK", _NATIVE_MODELS))
            else:
                writer.write(_plain("404 Not Found", b'{"error":"Unexpected endpoint"}'))
            await writer.drain()
            if headers.get(b"connection", b"").lower() == b"close":
                return
    except ConnectionError:
        return
    finally:
        writer.close()


async def _serve(spec: ReplaySpec, native: ReplaySpec | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, spec, native), "127.0.0.1", 0, limit=1 << 20, backlog=128
    )
    port = server.sockets[0].getsockname()[1]
    stdin = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(stdin, 4096):  # EOF: the benchmark is done (or gone)
            loop.remove_reader(stdin)
            stop.set()

    loop.add_reader(stdin, on_stdin)
    print(f"PORT {port}", flush=True)
    async with server:
        await stop.wait()


def serve_main(spec_path: str) -> None:
    fields, native_fields = pickle.loads(Path(spec_path).read_bytes())
    spec = ReplaySpec(*fields)
    native = None if native_fields is None else ReplaySpec(*native_fields)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(spec, native))


def _fields(spec: ReplaySpec) -> tuple[bytes, bytes, int, bytes]:
    return (spec.head, spec.middle, spec.repeat, spec.tail)


@contextlib.contextmanager
def replay_server(spec: ReplaySpec, native: ReplaySpec | None = None) -> Iterator[str]:
    """Run the replay server in a child process; yield its base URL; always stop it.

    ``spec`` answers ``POST /v1/chat/completions``; ``native``, if given, answers
    ``POST /api/v1/chat`` (and then ``GET /api/v1/models`` lists the model as loaded).
    """
    with tempfile.TemporaryDirectory(prefix="lmstream-bench-") as tmp:
        spec_path = Path(tmp) / "spec.pickle"
        fields = (_fields(spec), None if native is None else _fields(native))
        spec_path.write_bytes(pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL))
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        try:
            line = _read_line(proc, SERVER_START_TIMEOUT_S)
            if not line.startswith("PORT "):
                raise RuntimeError(f"replay server did not start (said {line!r})")
            yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
        finally:
            _stop(proc)


def server_stats(base_url: str) -> dict[str, dict[str, int]]:
    """Per User-Agent: TCP connections opened and requests sent (this query is not counted)."""
    import urllib.request

    root = base_url.removesuffix("/v1")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(root + "/_stats", timeout=10) as response:
        stats: dict[str, dict[str, int]] = json.loads(response.read())
    return stats


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return ""
    return proc.stdout.readline().decode().strip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the server exits on EOF
    try:
        proc.wait(SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(SERVER_STOP_TIMEOUT_S)
    if proc.stdout is not None:
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# Worker processes


class WorkerFailed(RuntimeError):
    pass


def run_worker(script: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``python script args`` in a fresh process; return the JSON object of its last line.

    ``subprocess.run`` kills the child if it exceeds ``timeout``, so a hung client cannot hang
    the benchmark.
    """
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, script, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkerFailed(f"{' '.join(args)}: no result within {timeout:.0f} s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise WorkerFailed(f"{' '.join(args)}: exit {done.returncode}\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - started
    result["stdout"] = "\n".join(lines[:-1])
    return result


def proc_status(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (e.g. VmRSS, VmHWM); empty where unavailable."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[name] = int(value.split()[0])
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve_main(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "template":
        print(json.dumps(chunk_template()))  # run in a child to keep the caller's memory small
    else:
        sys.exit("usage: python benchmarks/_common.py serve SPEC | template")
