"""Front-end traffic: what streaming an answer into a notebook costs on the kernel's wire.

Why: a notebook front end receives every IOPub message a kernel sends, and so does every other
front end attached to the same kernel. The usual ways to grow text in a cell resend the whole
text on every update, so their traffic grows with the square of the answer. ``%%lmstream``
sends only the new text, coalesced to at most 20 paints a second (``lmstream_nb._view``).
This script measures both, in one real kernel, in the same run.

Targets (on the 1 MiB row, streamed through ``%%lmstream``):

- all bytes of the IOPub messages (comm messages included) the run produced / the text's bytes
  <= 3 (the deltas plus the final copy a saved notebook keeps: an answer this long is kept
  once, as text/plain, ``lmstream_nb._view.ONE_COPY_CHARS``);
- messages per second <= 25 on average over the run;
- median time from a chunk leaving the simulator to the message carrying it leaving the
  kernel <= 60 ms.

Set-up. The simulator (``lmstream_nb.simulator``, profile "test-fast", jitter 0, every answer
delta exactly ``--chunk-chars`` characters) runs in threads of this process, on 127.0.0.1. One
kernel runs this interpreter (``python -m ipykernel_launcher``) with ``LMSTREAM_HOME`` in a
temporary folder. This process talks to it through its own ZeroMQ sockets (shell and IOPub,
from jupyter_client's ``KernelManager``), so that it sees every IOPub frame as it arrived.

Counting. A run is everything from sending the execute request to the kernel's ``idle`` status
for it (plus its execute_reply), then 0.5 s of drain for late messages. Every IOPub message in
that window counts: status, execute_input, comm_open, comm_msg, display_data,
update_display_data, execute_result, stream. Its size is the sum of all its ZeroMQ frames as
received: topic, ``<IDS|MSG>`` delimiter, HMAC signature, the header, parent_header, metadata and
content JSON, and any binary buffers (the JSON is as the kernel serialised it: UTF-8, not
ASCII-escaped). ZeroMQ's own framing (a few bytes per frame) and the shell channel's
execute_reply are not counted. Text bytes = UTF-8 length of the answer the simulator sent.
Messages per second = IOPub messages of the run / (idle time - request time); "peak/s" is the
most messages whose header dates fall in any one-second window.

Latency. "Chunk leaving the simulator" is taken in the simulator itself: this script wraps the
``_on_token`` of both of the simulator's stream framings (in this process only) to record
``time.time()`` just before each content event is written to the transport, with its text (so
the write itself counts towards the latency, and no chunk can have left earlier). "Its update
message leaving the kernel" is the ``date`` in the header of the first IOPub message whose text
covers the end of that chunk (found by character offsets: a custom message's ``t`` adds to the
text, a state/display update carries the whole text). The header date is set by the kernel's
``Session`` when the message is built and handed to the kernel's IOPub thread, i.e. when the
message leaves the code that sends it; both processes read the same system clock, and ZeroMQ
adds well under a millisecond on loopback. That is preferred over in-kernel stopwatches because
it needs nothing inside ``lmstream_nb`` except to read the wire. Two diagnostics are also
shown: the same latency using the time this process received the message, and, for
``%%lmstream``, a split at the moment the chunk reached ``NotebookSink.handle`` (a wrapper
installed in the kernel records ``time.time()`` per ``TextDelta``). "1st paint" is the latency
of the first chunk; the time from the execute request to the first painted text is printed
separately.

Sizes and pace. The 1 MiB answer is 104,858 deltas of 10 characters (at least 1,048,576 UTF-8
bytes; the simulator's text has some non-ASCII words). Its pace is 12,000 tokens/s: the
simulator, a uvicorn thread, tops out at ~14-15k deltas/s on a 2-core machine, so 12k keeps an
even beat (actual rate printed) and the stream lasts ~9 s, i.e. ~175 paint intervals, enough
for a per-second rate not to be dominated by the fixed messages at start and end.

The naive baselines (``Output.append_stdout(delta)``, ``DisplayHandle.update(full_text)``,
``Textarea.value += delta``, each once per delta, in a cell reading the same simulator with
``SyncLMStudioClient.stream_chat``) are quadratic in bytes: at 100k deltas they would send tens
of GB. They therefore run on a 2,000-delta answer (~20 KB) at 500 tokens/s (a very fast local
model), next to ``%%lmstream`` on the same answer for an apples-to-apples row, and
``append_stdout`` also runs at 500 deltas to show how its bytes per text byte grow. One more
``%%lmstream`` row, for information and without a target, streams 240 deltas at 40 tokens/s, a
real local model's pace (~6 s): there a paint carries one or two deltas, so the fixed cost of a
message, not the text, sets the bytes.

    python benchmarks/frontend_traffic.py [--big-tps 12000] [--small-chunks 2000]

Exit status 0 whether or not a target is met; 1 if a run failed or the text on the wire was
not the text the simulator sent.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import _common as common

TARGET_BYTES_RATIO = 3.0
TARGET_MSGS_PER_S = 25.0
TARGET_LATENCY_MS = 60.0

BIG_TEXT_BYTES = 1 << 20
CHUNK_CHARS = 10
BIG_TPS = 12_000.0
SMALL_CHUNKS = 2_000
GROWTH_CHUNKS = 500
SMALL_TPS = 500.0
REAL_CHUNKS = 240
REAL_TPS = 40.0
PROMPT = common.PROMPT
MODEL = common.MODEL

KERNEL_START_TIMEOUT_S = 60.0
SETUP_TIMEOUT_S = 60.0
DRAIN_S = 0.5
TIME_BUDGET_S = 170.0
SHUTDOWN_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------
# The simulator side: when each chunk left


class SimTap:
    """Records, in this process, when the simulator handed each content delta to its transport."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.texts: list[str] = []
        self.installed = False

    def install(self) -> bool:
        try:
            from lmstream_nb.simulator import _produce

            classes: list[Any] = [_produce.EventStream, _produce.NativeStream]
            originals = [cls.__dict__["_on_token"] for cls in classes]
        except (ImportError, AttributeError, KeyError):
            return False
        tap = self

        def wrap(original: Any) -> Any:
            async def _on_token(self: Any, send: Any, kind: str, text: str) -> None:
                if kind != "reasoning" and text:  # stamped just before the write
                    tap.times.append(time.time())
                    tap.texts.append(text)
                await original(self, send, kind, text)

            return _on_token

        for cls, original in zip(classes, originals, strict=True):
            cls._on_token = wrap(original)  # both framings: /v1 chunks and native events
        self.installed = True
        return True

    def reset(self) -> None:
        self.times = []
        self.texts = []


def _delta_content(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    choices = obj.get("choices")
    if not choices:
        return None
    delta = choices[0].get("delta") or {}
    content = delta.get("content")
    return content if isinstance(content, str) else None


# ---------------------------------------------------------------------------------------------
# The kernel side: every IOPub message, summarised as it arrives


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass
class Wire:
    """One IOPub message: its size as received and what the analysis needs of its content."""

    kind: str
    parent: str | None
    date: float
    received: float
    nbytes: int
    category: str
    comm_id: str | None = None
    delta_chars: int | None = None  # anywidget custom message: characters of new text
    total_chars: int | None = None  # state/display update: characters of the whole text
    text: str | None = None  # stream text, or a final answer's text/plain
    state: str | None = None  # execution_state of a status message


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def summarise(msg: dict[str, Any], nbytes: int, received: float) -> Wire:
    """Keep only what the analysis needs (naive runs send ~100 MB that must not pile up)."""
    kind = str(msg["header"]["msg_type"])
    parent = msg["parent_header"].get("msg_id")
    content: dict[str, Any] = msg.get("content") or {}
    wire = Wire(kind, parent, _epoch(msg["header"]["date"]), received, nbytes, kind)
    if kind == "status":
        wire.state = content.get("execution_state")
    elif kind == "stream":
        wire.text = str(content.get("text", ""))
    elif kind in ("comm_open", "comm_close"):
        wire.comm_id = content.get("comm_id")
    elif kind == "comm_msg":
        wire.comm_id = content.get("comm_id")
        data = content.get("data") or {}
        method = data.get("method")
        if method == "custom":
            custom = data.get("content") or {}
            delta = custom.get("t") if isinstance(custom, dict) else None
            if isinstance(delta, str) and delta:
                wire.delta_chars = len(delta)
                wire.category = "comm_msg custom (text delta)"
            else:
                wire.category = "comm_msg custom (no text)"
        elif method in ("update", "echo_update"):
            state = data.get("state") or {}
            keys = ",".join(sorted(state))
            wire.category = f"comm_msg update ({keys or '-'})"
            value = state.get("value")
            outputs = state.get("outputs")
            if isinstance(value, str):
                wire.total_chars = len(value)
            elif isinstance(outputs, list):
                wire.total_chars = sum(
                    len(o.get("text", "")) for o in outputs if isinstance(o, dict)
                )
        else:
            wire.category = f"comm_msg {method}"
    elif kind in ("display_data", "update_display_data", "execute_result"):
        data = content.get("data") or {}
        if WIDGET_VIEW in data:
            wire.category = f"{kind} (widget view)"
        else:
            plain = data.get("text/plain")
            if isinstance(plain, str):
                wire.total_chars = len(plain)
                if kind == "display_data":
                    wire.text = plain
                    wire.category = "display_data (final answer)"
    elif kind == "error":
        wire.text = f"{content.get('ename')}: {content.get('evalue')}"
    return wire


@dataclass
class Capture:
    """All IOPub messages of one executed cell."""

    msg_id: str
    sent: float
    idle: float
    status: str
    wires: list[Wire]

    @property
    def wall(self) -> float:
        return self.idle - self.sent

    def stdout(self) -> str:
        return "".join(
            w.text or "" for w in self.wires if w.kind == "stream" and w.parent == self.msg_id
        )

    def error(self) -> str | None:
        for w in self.wires:
            if w.kind == "error" and w.parent == self.msg_id:
                return w.text
        return None


class CellFailed(RuntimeError):
    pass


class Kernel:
    """One ipykernel, driven over raw ZeroMQ sockets (shell + IOPub) so every frame is seen."""

    def __init__(self, env: dict[str, str], log: TextIO) -> None:
        import zmq
        from jupyter_client.manager import KernelManager

        self._zmq = zmq
        self.km = KernelManager(kernel_name="python3")
        spec = self.km.kernel_spec
        if spec is None:
            raise RuntimeError("no python3 kernel spec (is ipykernel installed?)")
        spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        self.km.start_kernel(env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.session = self.km.session
        self.shell = self.km.connect_shell()
        self.iopub = self.km.connect_iopub()
        for sock in (self.shell, self.iopub):
            sock.linger = 0
        self.poller = zmq.Poller()
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)
        self._ready()

    def _ready(self) -> None:
        """kernel_info until the shell answers and the IOPub subscription delivers."""
        deadline = time.monotonic() + KERNEL_START_TIMEOUT_S
        replied = subscribed = False
        while not (replied and subscribed):
            if time.monotonic() > deadline:
                raise RuntimeError(f"kernel not ready in {KERNEL_START_TIMEOUT_S:.0f} s")
            if not self.km.is_alive():
                raise RuntimeError("the kernel died while starting")
            self.session.send(self.shell, "kernel_info_request", {})
            until = time.monotonic() + 1.0
            while time.monotonic() < until and not (replied and subscribed):
                events = dict(self.poller.poll(100))
                if self.shell in events:
                    _, msg = self.session.recv(self.shell, mode=self._zmq.NOBLOCK)
                    replied = replied or (
                        msg is not None and msg["msg_type"] == "kernel_info_reply"
                    )
                if self.iopub in events:
                    self.iopub.recv_multipart()
                    subscribed = True
        self._drain_iopub(0.3)

    def _drain_iopub(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self.iopub.poll(50):
                self.iopub.recv_multipart()

    def _read_iopub(self, wires: list[Wire]) -> Iterator[Wire]:
        zmq = self._zmq
        while True:
            try:
                frames = self.iopub.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            received = time.time()
            nbytes = sum(len(f) for f in frames)
            _, msg_list = self.session.feed_identities(frames, copy=True)
            msg = self.session.deserialize(msg_list, content=True, copy=True)
            wire = summarise(msg, nbytes, received)
            wires.append(wire)
            yield wire

    def execute(self, code: str, timeout: float) -> Capture:
        """Run a cell; every IOPub message until its idle status (bounded), then a short drain."""
        zmq = self._zmq
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        wires: list[Wire] = []
        sent = time.time()
        msg_id = str(self.session.send(self.shell, "execute_request", content)["header"]["msg_id"])
        deadline = time.monotonic() + timeout
        status: str | None = None
        idle: float | None = None
        while status is None or idle is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.km.interrupt_kernel()
                raise CellFailed(
                    f"the cell did not finish within {timeout:.0f} s "
                    f"(kernel interrupted); first line: {code.splitlines()[0]!r}"
                )
            events = dict(self.poller.poll(int(min(remaining, 0.5) * 1000) + 1))
            if self.iopub in events:
                for wire in self._read_iopub(wires):
                    if wire.kind == "status" and wire.parent == msg_id and wire.state == "idle":
                        idle = wire.date
            if self.shell in events:
                _, reply = self.session.recv(self.shell, mode=zmq.NOBLOCK)
                if reply is not None and reply["parent_header"].get("msg_id") == msg_id:
                    status = str(reply["content"].get("status"))
            if not events and not self.km.is_alive():
                raise CellFailed("the kernel died")
        until = time.monotonic() + DRAIN_S
        while time.monotonic() < until:
            if self.iopub.poll(50):
                for _ in self._read_iopub(wires):
                    pass
        return Capture(msg_id, sent, idle, status, wires)

    def run(self, code: str, timeout: float) -> Capture:
        """``execute`` that raises when the cell failed."""
        capture = self.execute(code, timeout)
        if capture.status != "ok":
            raise CellFailed(
                f"cell failed ({capture.status}): {capture.error()}\n{textwrap.shorten(code, 200)}"
            )
        return capture

    def close(self) -> None:
        for sock in (self.shell, self.iopub):
            with contextlib.suppress(Exception):
                sock.close(linger=0)
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=False)
        if self.km.has_kernel:
            with contextlib.suppress(Exception):
                self.km.shutdown_kernel(now=True)


# ---------------------------------------------------------------------------------------------
# Cells


SETUP = """\
%load_ext lmstream_nb
import json as _bj, time as _bt
import ipywidgets as _bw
from IPython.display import display as _bd
from lmstream_nb import SyncLMStudioClient as _BClient, TextDelta as _BText
_b_lm_arrivals = []
_b_status = {"handle_wrapped": False}
try:
    from lmstream_nb import _view as _bv
    _b_orig_handle = _bv.NotebookSink.handle
    def _b_handle(self, event, _orig=_b_orig_handle):
        if isinstance(event, _BText):
            _b_lm_arrivals.append(_bt.time())
        return _orig(self, event)
    _bv.NotebookSink.handle = _b_handle
    _b_status["handle_wrapped"] = True
except Exception as _b_exc:
    _b_status["error"] = repr(_b_exc)
print(_bj.dumps(_b_status))
"""

LMSTREAM_CELL = "%%lmstream --base-url {url}{extra}\n{prompt}\n"

NAIVE_CELL = """\
_b_arrivals = []
_b_w = None
{setup}
with _BClient({url!r}) as _b_client:
    with _b_client.stream_chat([{{"role": "user", "content": {prompt!r}}}], model={model!r},
                               max_tokens={chunks}) as _b_stream:
        for _b_event in _b_stream:
            if isinstance(_b_event, _BText):
                _b_arrivals.append(_bt.time())
{update}
"""

NAIVE_RESULTS = (
    'print(_bj.dumps({"arrivals": _b_arrivals, "model_id": getattr(_b_w, "model_id", None)}))'
)
LMSTREAM_RESULTS = 'print(_bj.dumps({"arrivals": _b_lm_arrivals}))'


@dataclass(frozen=True)
class Naive:
    key: str
    label: str
    setup: str
    update: str
    widget: bool  # carriers are comm updates of the widget (else update_display_data)


NAIVE = {
    "append_stdout": Naive(
        "append_stdout",
        "Output.append_stdout",
        "_b_w = _bw.Output()\n_bd(_b_w)",
        "_b_w.append_stdout(_b_event.content)",
        widget=True,
    ),
    "display": Naive(
        "display",
        "DisplayHandle.update",
        '_b_text = ""\n_b_h = _bd({"text/plain": ""}, raw=True, display_id=True)',
        '_b_text += _b_event.content\n_b_h.update({"text/plain": _b_text}, raw=True)',
        widget=False,
    ),
    "textarea": Naive(
        "textarea",
        "Textarea.value +=",
        "_b_w = _bw.Textarea()\n_bd(_b_w)",
        "_b_w.value += _b_event.content",
        widget=True,
    ),
}


def naive_cell(method: Naive, url: str, chunks: int) -> str:
    update = textwrap.indent(method.update, " " * 16)
    return NAIVE_CELL.format(
        setup=method.setup, url=url, prompt=PROMPT, model=MODEL, chunks=chunks, update=update
    )


# ---------------------------------------------------------------------------------------------
# Analysis


@dataclass
class Row:
    label: str
    chunks: int = 0
    text_bytes: int = 0
    wire_bytes: int = 0
    messages: int = 0
    comm_msgs: int = 0
    wall_s: float = math.nan
    peak_per_s: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    recv_latencies_ms: list[float] = field(default_factory=list)
    first_paint_ms: float = math.nan
    to_first_paint_ms: float = math.nan
    to_first_chunk_ms: float = math.nan
    stream_s: float = math.nan
    split: tuple[float, float] | None = None  # median ms: simulator->handle, handle->message
    breakdown: dict[str, tuple[int, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ratio(self) -> float:
        return self.wire_bytes / self.text_bytes if self.text_bytes else math.nan

    @property
    def per_s(self) -> float:
        return self.messages / self.wall_s if self.wall_s > 0 else math.nan


def peak_per_second(dates: list[float]) -> int:
    ordered = sorted(dates)
    best = lo = 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def chunk_latencies(
    carriers: list[tuple[float, int]], times: list[float], ends: list[int]
) -> list[float] | None:
    """Per chunk: time of the first carrier whose text reaches the chunk's end - chunk time."""
    cumulative = [c for _, c in carriers]
    out: list[float] = []
    for t, end in zip(times, ends, strict=True):
        k = bisect.bisect_left(cumulative, end)
        if k == len(cumulative):
            return None
        out.append((carriers[k][0] - t) * 1000)
    return out


def analyse(
    label: str,
    capture: Capture,
    tap: SimTap,
    arrivals: list[float],
    carrier: Callable[[Wire], tuple[str, int] | None],
) -> Row:
    row = Row(label)
    wires = capture.wires
    row.messages = len(wires)
    row.comm_msgs = sum(w.kind == "comm_msg" for w in wires)
    row.wire_bytes = sum(w.nbytes for w in wires)
    row.wall_s = capture.wall
    row.peak_per_s = peak_per_second([w.date for w in wires])
    for w in wires:
        count, size = row.breakdown.get(w.category, (0, 0))
        row.breakdown[w.category] = (count + 1, size + w.nbytes)

    # What the simulator sent (or, without the tap, what the kernel received).
    if tap.installed:
        texts, times = tap.texts, tap.times
    else:
        texts, times = [], arrivals
        row.problems.append("simulator tap unavailable: chunk times are kernel arrival times")
    text = "".join(texts)
    row.chunks = len(times)
    row.text_bytes = len(text.encode("utf-8"))
    if len(times) > 1:
        row.stream_s = times[-1] - times[0]
    if times:
        row.to_first_chunk_ms = (times[0] - capture.sent) * 1000
    lengths = [len(s) for s in texts] if texts else [CHUNK_CHARS] * len(times)
    ends: list[int] = []
    total = 0
    for n in lengths:
        total += n
        ends.append(total)

    # Messages that carried the text, with the text's length so far.
    by_date: list[tuple[float, int]] = []
    by_recv: list[tuple[float, int]] = []
    so_far = 0
    for w in wires:
        carried = carrier(w)
        if carried is None:
            continue
        mode, n = carried
        so_far = so_far + n if mode == "delta" else n
        by_date.append((w.date, so_far))
        by_recv.append((w.received, so_far))
    if not by_date:
        row.problems.append("no message carried the text")
        return row
    if so_far != total:
        row.problems.append(f"the messages carried {so_far} characters, the simulator sent {total}")
    lat = chunk_latencies(by_date, times, ends)
    recv = chunk_latencies(by_recv, times, ends)
    if lat is None or recv is None:
        row.problems.append("some chunks were never carried by a message")
    else:
        row.latencies_ms, row.recv_latencies_ms = lat, recv
        row.first_paint_ms = lat[0]
    row.to_first_paint_ms = (by_date[0][0] - capture.sent) * 1000
    if tap.installed and len(arrivals) == len(times) and row.latencies_ms:
        transport = [(a - t) * 1000 for a, t in zip(arrivals, times, strict=True)]
        kernel = [m - tr for m, tr in zip(row.latencies_ms, transport, strict=True)]
        row.split = (common.median(transport), common.median(kernel))
    elif arrivals and len(arrivals) != len(times):
        row.problems.append(
            f"the kernel saw {len(arrivals)} deltas, the simulator sent {len(times)}"
        )
    return row


def lmstream_carrier(w: Wire) -> tuple[str, int] | None:
    if w.kind == "comm_msg" and w.delta_chars:
        return ("delta", w.delta_chars)
    return None


def naive_carrier(method: Naive, model_id: str | None) -> Callable[[Wire], tuple[str, int] | None]:
    def carrier(w: Wire) -> tuple[str, int] | None:
        if w.total_chars is None:
            return None
        if method.widget:
            ok = w.kind == "comm_msg" and w.comm_id == model_id
        else:
            ok = w.kind == "update_display_data"
        return ("total", w.total_chars) if ok else None

    return carrier


def check_final_answer(row: Row, capture: Capture, tap: SimTap) -> None:
    """The answer written as an ordinary output must be exactly what the simulator sent."""
    finals = [w.text for w in capture.wires if w.category == "display_data (final answer)"]
    if not finals:
        row.problems.append("no final answer output (display_data with text/plain)")
    elif tap.installed and finals[-1] != "".join(tap.texts):
        row.problems.append("the final answer output differs from the text the simulator sent")


# ---------------------------------------------------------------------------------------------
# Running


def versions() -> str:
    from importlib import metadata

    parts = [f"Python {platform.python_version()}"]
    for dist in (
        "ipykernel",
        "jupyter_client",
        "pyzmq",
        "ipython",
        "ipywidgets",
        "anywidget",
        "lmstream_nb",
    ):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    parts.append(f"{os.cpu_count()} CPUs")
    return ", ".join(parts)


def results_json(kernel: Kernel, code: str) -> dict[str, Any]:
    capture = kernel.run(code, SETUP_TIMEOUT_S)
    out = capture.stdout().strip().splitlines()
    try:
        parsed: dict[str, Any] = json.loads(out[-1])
    except (IndexError, ValueError) as exc:
        raise CellFailed(f"no JSON line from {textwrap.shorten(code, 80)!r}") from exc
    return parsed


def run_lmstream(label: str, kernel: Kernel, tap: SimTap, url: str, timeout: float) -> Row:
    kernel.run("_b_lm_arrivals.clear()", SETUP_TIMEOUT_S)
    tap.reset()
    capture = kernel.run(LMSTREAM_CELL.format(url=url, extra="", prompt=PROMPT), timeout)
    arrivals = [float(t) for t in results_json(kernel, LMSTREAM_RESULTS)["arrivals"]]
    row = analyse(label, capture, tap, arrivals, lmstream_carrier)
    check_final_answer(row, capture, tap)
    return row


def run_naive(
    label: str,
    method: Naive,
    kernel: Kernel,
    tap: SimTap,
    url: str,
    chunks: int,
    timeout: float,
) -> Row:
    tap.reset()
    capture = kernel.run(naive_cell(method, url, chunks), timeout)
    results = results_json(kernel, NAIVE_RESULTS)
    arrivals = [float(t) for t in results["arrivals"]]
    carrier = naive_carrier(method, results.get("model_id"))
    row = analyse(label, capture, tap, arrivals, carrier)
    if row.chunks != chunks:
        row.problems.append(f"{row.chunks} chunks streamed, {chunks} expected")
    return row


def fmt_ms(values: list[float], q: float | None) -> str:
    if not values:
        return "-"
    v = common.median(values) if q is None else common.percentile(values, q)
    return f"{v:,.1f}"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'row':<34} {'chunks':>7} {'text B':>10} {'iopub+comm B':>14} {'B/text B':>9} "
        f"{'msgs':>6} {'comm':>6} {'msgs/s':>7} {'peak/s':>6} {'lat med':>8} "
        f"{'lat p95':>8} {'1st paint':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.skipped:
            print(f"{r.label:<34} skipped: {r.skipped}")
            continue
        first = "-" if math.isnan(r.first_paint_ms) else f"{r.first_paint_ms:,.1f}"
        print(
            f"{r.label:<34} {r.chunks:>7,} {r.text_bytes:>10,} {r.wire_bytes:>14,} "
            f"{r.ratio:>9.2f} {r.messages:>6,} {r.comm_msgs:>6,} {r.per_s:>7.1f} "
            f"{r.peak_per_s:>6} {fmt_ms(r.latencies_ms, None):>8} "
            f"{fmt_ms(r.latencies_ms, 95):>8} {first:>9}"
        )
    print(
        "(latency in ms: chunk handed to the transport by the simulator -> header date of the "
        "IOPub message that carried it)"
    )


def print_details(rows: list[Row]) -> None:
    print("\ndetails per row:")
    for r in rows:
        if r.skipped or not r.latencies_ms:
            continue
        rate = r.chunks / r.stream_s if r.stream_s > 0 else math.nan
        parts = [
            f"run {r.wall_s:.2f} s (request -> idle)",
            f"stream {r.stream_s:.2f} s at {rate:,.0f} chunks/s",
            f"request -> first chunk left the simulator {r.to_first_chunk_ms:,.1f} ms, "
            f"-> first painted text {r.to_first_paint_ms:,.1f} ms",
            f"latency by receive time med {fmt_ms(r.recv_latencies_ms, None)} / "
            f"p95 {fmt_ms(r.recv_latencies_ms, 95)} ms",
        ]
        if r.split is not None:
            parts.append(
                f"median split: simulator -> NotebookSink.handle {r.split[0]:.1f} ms, "
                f"handle -> message {r.split[1]:.1f} ms"
            )
        print(f"  {r.label}:\n    " + "\n    ".join(parts))


def print_breakdown(row: Row) -> None:
    print(f"\nwhere the bytes of '{row.label}' went:")
    header = f"  {'message kind':<48} {'count':>7} {'bytes':>12} {'share':>7} {'x text':>7}"
    print(header)
    for category, (count, size) in sorted(row.breakdown.items(), key=lambda kv: -kv[1][1]):
        print(
            f"  {category:<48} {count:>7,} {size:>12,} {size / row.wire_bytes:>7.1%} "
            f"{size / row.text_bytes:>7.2f}"
        )


def verdicts(big: Row | None) -> None:
    print()
    if big is None or big.skipped or not big.latencies_ms:
        print("verdict: the 1 MiB %%lmstream run did not complete; no verdict")
        return
    med = common.median(big.latencies_ms)
    checks = [
        ("iopub+comm bytes / text bytes", big.ratio, TARGET_BYTES_RATIO, f"{big.ratio:.2f}"),
        ("messages per second (average)", big.per_s, TARGET_MSGS_PER_S, f"{big.per_s:.1f}"),
        ("median chunk latency (ms)", med, TARGET_LATENCY_MS, f"{med:.1f}"),
    ]
    for name, value, target, shown in checks:
        verdict = "MET" if value <= target else "NOT MET"
        print(f"verdict: {big.label}: {name} = {shown} (target <= {target:g}): {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--big-tps", type=float, default=BIG_TPS, help="pace of the 1 MiB answer (tokens/s)"
    )
    parser.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS, help="characters per delta")
    parser.add_argument(
        "--small-chunks",
        type=int,
        default=SMALL_CHUNKS,
        help="deltas of the answer the naive baselines stream",
    )
    parser.add_argument(
        "--small-tps", type=float, default=SMALL_TPS, help="pace of the small answers (tokens/s)"
    )
    parser.add_argument(
        "--real-tps",
        type=float,
        default=REAL_TPS,
        help="pace of the informational row at a real model's speed",
    )
    parser.add_argument("--no-baselines", action="store_true", help="only the %%lmstream rows")
    args = parser.parse_args()
    common.ensure_repo_on_path()
    from lmstream_nb import simulator

    big_chunks = -(-BIG_TEXT_BYTES // args.chunk_chars)
    print(
        "Front-end traffic of streaming into a notebook: bytes, messages and latency on the "
        "kernel's IOPub channel"
    )
    print(versions())
    print(
        f"1 MiB row: {big_chunks:,} deltas of {args.chunk_chars} characters at "
        f"{args.big_tps:,.0f} tokens/s through %%lmstream (blocking cell)"
    )
    print(
        f"small rows: {args.small_chunks:,} deltas at {args.small_tps:,.0f} tokens/s; the naive "
        "baselines run only at this size because their bytes grow with the square of the "
        "answer"
    )
    print(
        f"info row: %%lmstream at a real model's pace ({args.real_tps:g} tokens/s, ~6 s), to "
        "show the cost per paint when each paint carries only a token or two"
    )
    started = time.monotonic()
    tap = SimTap()
    if not tap.install():
        print(
            "NOTE: could not wrap the simulator's _on_token; chunk times are "
            "the kernel's arrival times instead"
        )
    status = 0
    rows: list[Row] = []
    big: Row | None = None

    def left() -> float:
        return TIME_BUDGET_S - (time.monotonic() - started)

    def scenario(chunks: int, tps: float) -> Any:
        return simulator.Scenario(
            output_tokens=chunks, chunk_chars=args.chunk_chars, gen_tps=tps, jitter=0
        )

    with contextlib.ExitStack() as stack:
        home = stack.enter_context(tempfile.TemporaryDirectory(prefix="lmstream-bench-"))
        log = stack.enter_context(open(Path(home) / "kernel-stderr.log", "w"))
        big_sim = stack.enter_context(
            simulator.serve(profile="test-fast", defaults=scenario(big_chunks, args.big_tps))
        )
        small_sim = stack.enter_context(
            simulator.serve(
                profile="test-fast", defaults=scenario(args.small_chunks, args.small_tps)
            )
        )
        real_chunks = max(1, round(REAL_CHUNKS * args.real_tps / REAL_TPS))
        real_sim = stack.enter_context(
            simulator.serve(profile="test-fast", defaults=scenario(real_chunks, args.real_tps))
        )
        env = common.child_env()
        env["LMSTREAM_HOME"] = home
        t0 = time.monotonic()
        try:
            kernel = Kernel(env, log)
        except Exception as exc:
            log.flush()
            print(
                f"FAILED to start the kernel: {exc}\n"
                f"{(Path(home) / 'kernel-stderr.log').read_text()[-2000:]}"
            )
            return 1
        stack.callback(kernel.close)
        print(f"kernel ready in {time.monotonic() - t0:.1f} s")
        try:
            setup = results_json(kernel, SETUP)
            if not setup.get("handle_wrapped"):
                print(
                    f"NOTE: NotebookSink.handle not wrapped ({setup.get('error')}); no "
                    "latency split for %%lmstream"
                )
            # Warm-up (not measured): first imports, the store, the client's loop thread.
            kernel.run(
                LMSTREAM_CELL.format(
                    url=small_sim.base_url, extra=" --max-tokens 50", prompt=PROMPT
                ),
                SETUP_TIMEOUT_S,
            )
            kernel.run(naive_cell(NAIVE["textarea"], small_sim.base_url, 20), SETUP_TIMEOUT_S)
        except CellFailed as exc:
            print(f"FAILED to set up the kernel: {exc}")
            return 1

        real_label = f"%%lmstream {args.real_tps:g} tok/s (info)"
        plan: list[tuple[str, Callable[[float], Row]]] = [
            (
                "%%lmstream 1 MiB",
                lambda budget: run_lmstream(
                    "%%lmstream 1 MiB", kernel, tap, big_sim.base_url, budget
                ),
            ),
            (
                "%%lmstream small",
                lambda budget: run_lmstream(
                    "%%lmstream small", kernel, tap, small_sim.base_url, budget
                ),
            ),
            (
                real_label,
                lambda budget: run_lmstream(real_label, kernel, tap, real_sim.base_url, budget),
            ),
        ]
        if not args.no_baselines:
            for key, chunks in (
                ("append_stdout", GROWTH_CHUNKS),
                ("append_stdout", args.small_chunks),
                ("display", args.small_chunks),
                ("textarea", args.small_chunks),
            ):
                method = NAIVE[key]
                label = f"{method.label} {chunks:,}"

                def job(
                    budget: float, method: Naive = method, chunks: int = chunks, label: str = label
                ) -> Row:
                    return run_naive(label, method, kernel, tap, small_sim.base_url, chunks, budget)

                plan.append((label, job))
        for label, job in plan:
            budget = min(120.0, left())
            if budget < 10:
                rows.append(Row(label, skipped="time budget used up"))
                continue
            try:
                row = job(budget)
            except CellFailed as exc:
                print(f"FAILED: {label}: {exc}")
                rows.append(Row(label, skipped="failed"))
                status = 1
                continue
            rows.append(row)
            if label == "%%lmstream 1 MiB":
                big = row
            print(
                f"  measured {label}: {row.messages:,} messages, {row.wire_bytes:,} bytes, "
                f"{row.wall_s:.1f} s"
            )

    print()
    print_table(rows)
    print(
        "The naive rows run at the small size only: their bytes grow with the square of the "
        "answer, so at 100k deltas they would send tens of GB."
    )
    growth = [r for r in rows if r.label.startswith(NAIVE["append_stdout"].label) and not r.skipped]
    if len(growth) == 2 and growth[0].ratio > 0:
        size = growth[1].chunks / growth[0].chunks
        factor = growth[1].ratio / growth[0].ratio
        print(
            f"growth: {NAIVE['append_stdout'].label} bytes per text byte went from "
            f"{growth[0].ratio:,.0f} to {growth[1].ratio:,.0f} (x{factor:.1f}) when the "
            f"answer grew x{size:.0f}"
        )
    print_details(rows)
    if big is not None:
        print_breakdown(big)
    for r in rows:
        for problem in r.problems:
            print(f"CORRECTNESS: {r.label}: {problem}")
            if not problem.startswith("simulator tap unavailable"):
                status = 1
    verdicts(big)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
