"""NotebookSink against a recording stand-in for the widget (the real one needs a front end),
and the final output bundles."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from waiting import await_until

from lmstream_nb import Stats, StreamFinished, StreamStarted, TextDelta
from lmstream_nb._view import NotebookSink, final_bundle, strip_fences


class RecordingView:
    """Has what NotebookSink uses: ``status``, ``show_text``, ``send`` and ``hold_sync``."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.show_text = True
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @contextlib.contextmanager
    def hold_sync(self) -> Iterator[None]:
        yield


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_sink_paints_first_chunk_then_coalesces() -> None:
    view, clock = RecordingView(), Clock()
    sink = NotebookSink(view, prompt="p@1", clock=clock)  # type: ignore[arg-type]
    sink.handle(StreamStarted(model="m", request_id="r", url="u"))
    assert view.status["state"] == "processing"
    sink.handle(TextDelta("first "))
    assert [m["t"] for m in view.sent] == ["first "]
    assert view.sent[0]["s"]["state"] == "generating"
    for i in range(100):
        clock.now += 0.001
        sink.handle(TextDelta(f"{i} "))
    # 100 chunks over 100 ms: paints at +50 ms and +100 ms, nothing in between.
    assert len(view.sent) == 3
    clock.now += 0.2
    sink.handle(
        StreamFinished(
            "stop", Stats(ttft_s=0.1, duration_s=1.0, chunks=101, text_chars=10), "m", "id"
        )
    )
    text = "".join(m.get("t", "") for m in view.sent)
    assert text == sink.text == "first " + "".join(f"{i} " for i in range(100))
    sink.close(state="done", run_id=7)
    assert view.status["state"] == "done"
    assert view.status["run_id"] == 7
    assert view.show_text is False


@pytest.mark.anyio
async def test_sink_timer_paints_the_tail_of_a_burst() -> None:
    view = RecordingView()
    sink = NotebookSink(view, interval=0.02)  # type: ignore[arg-type]
    sink.handle(TextDelta("a"))
    sink.handle(TextDelta("b"))  # waits for the timer
    assert [m["t"] for m in view.sent] == ["a"]
    await await_until(lambda: len(view.sent) == 2, timeout=5, what="the timer painted the tail")
    assert [m["t"] for m in view.sent] == ["a", "b"]


def test_final_bundles_never_carry_raw_html() -> None:
    evil = '<script>alert(1)</script> <img src=x onerror="alert(2)"> *em*'
    md = final_bundle(evil, "markdown")
    assert md["text/plain"] == evil
    assert "<script>" not in md["text/html"]
    assert "<img" not in md["text/html"]
    assert "<em>em</em>" in md["text/html"]
    code = final_bundle("```python\nprint('<b>')\n```", "code")
    assert code["text/plain"] == "print('<b>')"
    assert "&lt;b&gt;" in code["text/html"]
    js = final_bundle('```json\n{"a": [1, 2]}\n```', "json")
    assert js["application/json"] == {"a": [1, 2]}
    not_json = final_bundle("no json here", "json")
    assert "application/json" not in not_json
    assert final_bundle("plain", "text") == {"text/plain": "plain"}
    assert json.dumps(md)


def test_strip_fences_only_when_the_whole_answer_is_fenced() -> None:
    assert strip_fences("```\nx\n```") == "x"
    assert strip_fences("before\n```\nx\n```") == "before\n```\nx\n```"
