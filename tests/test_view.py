"""NotebookSink against a recording stand-in for the widget (the real one needs a front end),
and the final output bundles."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from waiting import await_until

from lmstream_nb import (
    PromptEstimate,
    PromptProgress,
    Stats,
    StreamFinished,
    StreamStarted,
    TextDelta,
)
from lmstream_nb._view import (
    ONE_COPY_CHARS,
    PLAIN_PREFIX,
    NotebookSink,
    StreamView,
    final_bundle,
    status_bundle,
    status_line,
    strip_fences,
)


class RecordingView:
    """Has what NotebookSink uses: ``status``, ``show_text``, ``send`` and ``hold_sync``."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.show_text = True
        self.sent: list[dict[str, Any]] = []

        self.text = ""
        self.reasoning = ""

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
    assert view.text == "", "hidden text is not sent again as state (the final output has it)"
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


@pytest.mark.anyio
async def test_between_reports_the_bar_moves_its_times_on_and_the_text_ends_it() -> None:
    """Reports can be many seconds apart: each second the view is told the time so far and
    the time left as they are now, in the shared words; the first text stops that."""
    view, clock = RecordingView(), Clock()
    sink = NotebookSink(view, clock=clock)  # type: ignore[arg-type]
    sink.handle(StreamStarted(model="m", request_id="r", url="u"))
    sink.handle(PromptProgress(0.25, 2.0, 6.0, processed=250, total=1000))
    [first] = [m["p"] for m in view.sent]
    assert first == {
        "f": 0.25,
        "w": "processing prompt",
        "x": "25% \u00b7 250 / 1,000 tokens \u00b7 2 s \u00b7 about 6 s left",
    }
    clock.now += 3.0
    await await_until(lambda: len(view.sent) == 2, timeout=5, what="the view was told again")
    moved = view.sent[1]["p"]
    assert moved["f"] == 0.25, "the fraction is the server's: only the times move on"
    assert moved["x"] == "25% \u00b7 250 / 1,000 tokens \u00b7 5 s \u00b7 about 3 s left"
    sink.handle(TextDelta("hello"))
    assert view.sent[-1]["t"] == "hello"
    assert sink._ticker is None, "no more ticks once the text has started"
    sink.handle(PromptProgress(1.0, 6.0, 0.0, processed=1000, total=1000))
    assert all("p" not in m for m in view.sent[2:]), "a late report draws no bar over text"


@pytest.mark.anyio
async def test_an_estimate_fills_the_bar_on_the_views_clock_and_says_it_is_one() -> None:
    view, clock = RecordingView(), Clock()
    sink = NotebookSink(view, clock=clock)  # type: ignore[arg-type]
    sink.handle(StreamStarted(model="m", request_id="r", url="u"))
    sink.handle(PromptEstimate(expected_s=10.0, runs=14, elapsed_s=1.0))
    [first] = [m["p"] for m in view.sent]
    assert first["f"] == 0.1
    assert first["w"] == "processing prompt (estimate)"
    assert first["x"].endswith("about 9 s left \u00b7 estimated from 14 earlier runs")
    clock.now += 3.0
    await await_until(lambda: len(view.sent) == 2, timeout=5, what="the bar moved on")
    assert view.sent[1]["p"]["f"] == 0.4, "nothing comes from the server: the view moves it"
    assert "about 6 s left" in view.sent[1]["p"]["x"]
    sink.handle(TextDelta("hi"))
    assert sink._ticker is None


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
    plain = final_bundle("a cool server <b>", "text")
    assert plain["text/plain"] == "a cool server <b>"
    assert "a cool server &lt;b&gt;</div>" in plain["text/html"]
    assert "<pre" not in plain["text/html"], "an output area's <pre> breaks inside words"
    assert "word-break: normal" in plain["text/html"]
    assert "white-space: pre-wrap" in plain["text/html"]
    assert json.dumps(md)


def test_a_very_long_plain_answer_is_kept_once() -> None:
    at_limit = "x" * ONE_COPY_CHARS
    assert set(final_bundle(at_limit)) == {"text/plain", "text/html"}
    longer = at_limit + "and more words"
    assert final_bundle(longer) == {"text/plain": longer}
    assert "text/html" in final_bundle(longer, "markdown"), "a chosen format keeps its rendering"


def test_strip_fences_only_when_the_whole_answer_is_fenced() -> None:
    assert strip_fences("```\nx\n```") == "x"
    assert strip_fences("before\n```\nx\n```") == "before\n```\nx\n```"


class FixedStream:
    """What NotebookSink reads from an attached ChatStream: its ``stats()``."""

    def __init__(self, stats: Stats) -> None:
        self.figures = stats

    def stats(self) -> Stats:
        return self.figures


def test_live_first_token_is_the_streams_own_and_the_end_keeps_it() -> None:
    """The view's clock starts when the sink is made; the run's when the request is sent.
    Once attached, the sink shows the stream's figure, live and at the end."""
    view, clock = RecordingView(), Clock()
    sink = NotebookSink(view, prompt="p@1", clock=clock)  # type: ignore[arg-type]
    clock.now += 0.25  # opening the store, making a client, asking for the model list
    stream = FixedStream(Stats(ttft_s=0.08, duration_s=0.0, chunks=0, text_chars=0))
    sink.attach(stream)
    sink.handle(StreamStarted(model="m", request_id="r", url="u"))
    clock.now += 0.08
    sink.handle(TextDelta("hello"))
    assert view.sent[0]["s"]["ttft"] == 0.08, "not the 0.33 s since the sink was made"
    stream.figures = Stats(ttft_s=0.08, duration_s=0.5, chunks=1, text_chars=5)
    final = sink.close(state="failed", run_id=3, message="It stalled.", show_text=True)
    assert final["ttft"] == 0.08
    assert final["elapsed"] == 0.5
    assert final["line"] == status_line(final)
    assert "first token 0.08 s" in final["line"]
    assert view.status == final
    assert view.text == "hello", "the finished text is state: a reloaded page keeps it"


def test_status_line_and_its_bundle_need_no_kernel() -> None:
    status = {
        "state": "done",
        "prompt": "haiku@1",
        "model": "m",
        "ttft": 0.0812,
        "elapsed": 12.34,
        "tokens": 24,
        "tps": 48.04,
        "run_id": 7,
    }
    line = status_line(status)
    assert line == (
        "done \u00b7 haiku@1 \u00b7 m \u00b7 first token 0.08 s \u00b7 elapsed 12.3 s "
        "\u00b7 24 tokens \u00b7 48.0 tok/s \u00b7 run #7"
    )
    bundle = status_bundle(status)
    assert bundle["text/plain"] == PLAIN_PREFIX + line
    assert "application/vnd.jupyter.widget-view+json" not in bundle
    cancelled = status_bundle(
        {"state": "cancelled", "message": "Stopped <here>.", "line": "cancelled"}, "think"
    )
    assert "Stopped &lt;here&gt;." in cancelled["text/html"]
    assert "error-color" not in cancelled["text/html"], "a deliberate Stop is not an error"
    assert "<details><summary>Reasoning</summary>" in cancelled["text/html"]
    assert cancelled["text/plain"] == PLAIN_PREFIX + "cancelled\nStopped <here>."
    failed = status_bundle({"state": "failed", "message": "It broke."})
    assert "error-color" in failed["text/html"]


@pytest.mark.anyio
async def test_a_view_opened_mid_run_gets_the_text_painted_so_far() -> None:
    view = StreamView()
    sent: list[dict[str, Any]] = []
    view.send = sent.append  # type: ignore[method-assign]
    sink = NotebookSink(view, interval=10.0)
    sink.handle(TextDelta("first "))
    sink.handle(TextDelta("pending"))  # not painted yet: the other views do not show it
    sent.clear()
    view._on_front_end_message(view, {"want": "text"}, [])
    assert sent == [{"all": {"t": "first ", "r": ""}}]
    bundle = view._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert data["text/plain"].startswith(PLAIN_PREFIX)
    assert 'class="lmstream-final"' in data["text/html"]
