"""``lmstream serve``'s event streams over real HTTP: concurrency, resume, keep-alive, slow
clients, cancellation and the grace period.

Every run goes to the session simulator (seeded, so the text a run should get is known: the
simulator answers the recorded messages the same way again). Scenarios are chosen per prompt
with ``[[sim {...}]]`` markers. Waits poll with a deadline or wait on the simulator's records.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import (
    SSE,
    TIMEOUT,
    SSEReader,
    aread_events,
    parse,
    read_events,
    service,
    text_of,
)
from waiting import wait_until

from lmstream_nb import Prompt, PromptStore, simulator
from lmstream_nb import run as run_prompt
from lmstream_nb.serve import ServeHandle

MODEL = "lmstream-sim-8b"
SLOW = '[[sim {"gen_tps": 150, "output_tokens": 150, "jitter": 0}]] '
CRAWL = '[[sim {"gen_tps": 20, "output_tokens": 2000, "jitter": 0}]] '
# About 0.8 s of prompt processing (the prompt is ~200 characters, ~4 per token).
PONDER = '[[sim {"prefill_tps": 60, "output_tokens": 20}]] ' + "Consider this slowly. " * 8
# About 2 s of prompt processing reported in 15 batches (LM Studio's native chat reports it).
PROCESS = '[[sim {"prefill_tps": 1500, "batch_size": 200, "output_tokens": 5}]] ' + "p" * 12000
HUGE = (
    '[[sim {"chunk_chars": 1000, "output_tokens": 800, "gen_tps": 500, '
    '"prefill_tps": 1000000000, "jitter": 0}]] '
)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    store = PromptStore(tmp_path / "lmstream.db")
    store.save("topic", "Write about {{topic}}, part {{n}}.", model=MODEL)
    store.save("slow", SLOW + "Write slowly about {{topic}}.", model=MODEL)
    store.save("crawl", CRAWL + "Write forever about {{topic}}.", model=MODEL)
    store.save("ponder", PONDER + "{{topic}}", model=MODEL)
    store.save("huge", HUGE + "A great deal about {{topic}}.", model=MODEL)
    store.save("process", PROCESS + " {{topic}}", model=MODEL)
    store.close()
    return tmp_path / "lmstream.db"


@pytest.fixture
def server(store_path: Path, sim: simulator.SimServer) -> Iterator[ServeHandle]:
    with service(store_path, sim.base_url, keepalive=0.1, status_interval=0.2) as handle:
        yield handle


@pytest.fixture
def client(server: ServeHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def start(client: httpx.Client, prompt: str, **variables: Any) -> dict[str, Any]:
    response = client.post(f"/api/prompts/{prompt}/runs", json={"variables": variables})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def simulator_answer(sim: simulator.SimServer, messages: list[dict[str, str]]) -> str:
    """What the seeded simulator says to these messages (asked again, without streaming)."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        response = await client.post(
            sim.base_url + "/chat/completions",
            json={"model": MODEL, "messages": messages, "stream": False},
        )
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def ids_are_offsets(events: list[SSE], start_text: int = 0) -> None:
    """Every delta's id ends where its text ends: the id says exactly what was delivered."""
    position = start_text
    for event in events:
        if event.event == "delta":
            position += len(event.json()["text"])
            assert event.id is not None
            assert event.id.split(":")[1] == str(position)


@pytest.mark.anyio
async def test_fifty_concurrent_runs_get_their_own_text(
    server: ServeHandle, store_path: Path, sim: simulator.SimServer
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:

        async def one(n: int) -> tuple[int, list[SSE]]:
            response = await client.post(
                "/api/prompts/topic/runs",
                json={"variables": {"topic": f"subject {n}", "n": str(n)}},
            )
            assert response.status_code == 201, response.text
            run = response.json()
            return run["run_id"], await aread_events(client, run["events_url"])

        results = await asyncio.gather(*(one(n) for n in range(50)))
        store = PromptStore(store_path)
        records = [store.get_run(run_id) for run_id, _ in results]
        # What the seeded simulator gives each run's recorded messages, asked again directly.
        expected = await asyncio.gather(*(simulator_answer(sim, r.messages) for r in records))
    texts = set()
    for (run_id, events), record, answer in zip(results, records, expected, strict=True):
        assert events[0].json()["run_id"] == run_id
        assert events[-1].event == "done", events[-1]
        text = text_of(events)
        assert text == record.text
        assert text == answer
        assert events[-1].json()["text_length"] == len(text)
        ids_are_offsets(events)
        texts.add(text)
    assert len(texts) == 50  # different prompts, different answers: nothing shared or mixed


@pytest.mark.parametrize("who_leaves", ["client hangs up", "server drops"])
def test_reconnect_mid_run_with_last_event_id_loses_and_repeats_nothing(
    server: ServeHandle, client: httpx.Client, store_path: Path, who_leaves: str
) -> None:
    run = start(client, "slow", topic="tides")
    run_id = run["run_id"]
    dropped: list[int] = []

    def leave(events: list[SSE]) -> bool:
        if sum(e.event == "delta" for e in events) < 15:
            return False
        if who_leaves == "client hangs up":
            return True
        if not dropped:
            dropped.append(server.drop_listeners(run_id))
        return False

    first, reader = read_events(client, run["events_url"], stop=leave)
    assert first[-1].event not in ("done", "error")
    if who_leaves == "server drops":
        assert dropped == [1]
    assert server.snapshot()[run_id]["text_chars"] < 150 * 3  # still running
    rest, _ = read_events(client, run["events_url"], last_id=reader.last_id)
    assert rest[0].event in ("delta", "status")  # no second start
    assert rest[-1].event == "done"
    record = PromptStore(store_path).get_run(run_id)
    assert record.status == "ok"
    assert text_of(first) + text_of(rest) == record.text
    ids_are_offsets(rest, start_text=len(text_of(first)))


def test_resume_after_the_run_finished_and_after_a_restart(
    server: ServeHandle, client: httpx.Client, store_path: Path, sim: simulator.SimServer
) -> None:
    run = start(client, "topic", topic="maps", n="1")
    live, _ = read_events(client, run["events_url"])
    stored = PromptStore(store_path).get_run(run["run_id"]).text
    assert text_of(live) == stored
    deltas = [e for e in live if e.event == "delta"]
    middle = deltas[len(deltas) // 2]
    seen = text_of(live[: live.index(middle) + 1])

    replay, _ = read_events(client, run["events_url"])  # from the store, from the start
    assert replay[0].event == "start"
    assert text_of(replay) == stored
    assert replay[-1].json() == live[-1].json() | {"stats": replay[-1].json()["stats"]}
    rest, _ = read_events(client, run["events_url"], last_id=middle.id)
    assert seen + text_of(rest) == stored
    assert rest[-1].event == "done"
    # Seen the end already: 204, which tells an EventSource to stop reconnecting.
    assert client.get(run["events_url"], headers={"Last-Event-ID": live[-1].id}).status_code == 204
    # The query form, for clients that cannot set headers.
    via_query = client.get(run["events_url"], params={"last_event_id": middle.id})
    assert text_of(parse(via_query.text)[0]) == text_of(rest)
    response = client.get(run["events_url"], headers={"Last-Event-ID": "garbage"})
    assert response.status_code == 400
    assert "Last-Event-ID" in response.json()["error"]
    # An id beyond the stored text (the store lags what a crashed server sent): the end.
    ahead, _ = read_events(client, run["events_url"], last_id=f"d:{len(stored) + 1}:0")
    assert [e.event for e in ahead] == ["done"]

    server.stop()  # a new server process on the same database
    with (
        service(store_path, sim.base_url) as again,
        httpx.Client(base_url=again.url, timeout=TIMEOUT) as other,
    ):
        rest2, _ = read_events(other, run["events_url"], last_id=middle.id)
        assert seen + text_of(rest2) == stored


def test_keep_alives_and_status_while_the_prompt_is_processed(
    client: httpx.Client, sim: simulator.SimServer
) -> None:
    run = start(client, "ponder", topic="clouds")
    reader = SSEReader()
    comments_before_text: list[int] = []

    def note(events: list[SSE]) -> bool:
        if events[-1].event == "delta" and not comments_before_text:
            comments_before_text.append(len(reader.comments))
        return False

    events, _ = read_events(client, run["events_url"], stop=note, reader=reader)
    assert events[-1].event == "done"
    assert comments_before_text[0] >= 3  # every 0.1 s during ~0.8 s of prompt processing
    assert set(reader.comments) == {"keep-alive"}
    waiting = [e.json() for e in events if e.event == "status"]
    assert len(waiting) >= 2
    assert all(s["state"] == "waiting" for s in waiting)
    assert [s["elapsed"] for s in waiting] == sorted(s["elapsed"] for s in waiting)
    first_delta = next(i for i, e in enumerate(events) if e.event == "delta")
    assert all(e.event != "status" for e in events[first_delta:])


def test_progress_comes_in_order_before_the_first_delta(client: httpx.Client) -> None:
    run = start(client, "process", topic="rain")
    events, _ = read_events(client, run["events_url"])
    assert events[-1].event == "done"
    kinds = [e.event for e in events]
    first_delta = kinds.index("delta")
    progress = [e for e in events if e.event == "progress"]
    assert len(progress) >= 2
    assert max(i for i, k in enumerate(kinds) if k == "progress") < first_delta
    data = [e.json() for e in progress]
    fractions = [d["fraction"] for d in data]
    assert fractions == sorted(fractions)
    assert fractions[-1] <= 1.0
    assert all(d["phase"] == "prompt" and d["title"] == "processing prompt" for d in data)
    assert data[0]["facts"].startswith(f"{fractions[0]:.0%}")
    assert any(d["eta_s"] is not None and "left" in d["facts"] for d in data)
    assert {e.id for e in progress} == {"s:0:0"}  # progress moves no text offset


def test_a_client_reconnecting_during_prompt_processing_gets_the_latest_progress(
    client: httpx.Client, store_path: Path
) -> None:
    run = start(client, "process", topic="snow")

    def after_some_progress(events: list[SSE]) -> bool:
        moving = [e for e in events if e.event == "progress" and e.json()["fraction"] > 0]
        return len(moving) >= 1

    first, reader = read_events(client, run["events_url"], stop=after_some_progress)
    assert all(e.event != "delta" for e in first)
    rest, _ = read_events(client, run["events_url"], last_id=reader.last_id)
    assert rest[0].event in ("progress", "status")
    progress = [e.json()["fraction"] for e in rest if e.event == "progress"]
    assert progress, "the latest progress, then the live stream"
    assert progress[0] >= first[-1].json()["fraction"]
    assert rest[-1].event == "done"
    record = PromptStore(store_path).get_run(run["run_id"])
    assert text_of(rest) == record.text


@pytest.fixture
def silent(tmp_path: Path) -> Iterator[tuple[simulator.SimServer, Path]]:
    """LM Studio 0.3 (no progress while it processes a prompt) and a store whose history has
    five runs of the model there, of sizes 400 to 3,000 characters."""
    defaults = simulator.Scenario(prefill_tps=1000, output_tokens=5, jitter=0)
    path = tmp_path / "silent.db"
    with simulator.serve(profile="test-fast", defaults=defaults, native_api=False) as server:
        with PromptStore(path) as store:
            for chars in (400, 1000, 1600, 2200, 3000):
                run_prompt(Prompt("q" * chars, model=MODEL), store=store, base_url=server.base_url)
            store.save("long", "q" * 10000 + " {{topic}}", model=MODEL)  # about 2.5 s
        yield server, path


def test_an_estimate_is_sent_where_the_server_reports_nothing_and_again_on_resume(
    silent: tuple[simulator.SimServer, Path],
) -> None:
    server, path = silent
    with (
        service(path, server.base_url, keepalive=0.1, status_interval=0.2) as relay,
        httpx.Client(base_url=relay.url, timeout=TIMEOUT) as client,
    ):
        run = start(client, "long", topic="fog")

        def estimated(events: list[SSE]) -> bool:
            return any(e.event == "progress" for e in events)

        first, reader = read_events(client, run["events_url"], stop=estimated)
        rest, _ = read_events(client, run["events_url"], last_id=reader.last_id)
    before = first[-1].json()
    assert (before["phase"], before["runs"]) == ("estimate", 5)
    assert before["title"] == "processing prompt (estimate)"
    assert before["facts"].endswith("estimated from 5 earlier runs")
    assert before["expected_s"] > 1.0  # 2.5 s of simulated processing, and the machine's load
    kinds = [e.event for e in rest]
    assert kinds[0] == "progress", "a client that comes back is sent the estimate at once"
    again = [e.json() for e in rest if e.event == "progress"]
    assert len(again) >= 2, "resent while the wait goes on, with its time moved on"
    assert all(d["phase"] == "estimate" for d in again)
    elapsed = [before["elapsed_s"], *(d["elapsed_s"] for d in again)]
    assert elapsed == sorted(elapsed)
    assert elapsed[-1] > elapsed[0]
    assert max(i for i, k in enumerate(kinds) if k == "progress") < kinds.index("delta")
    assert kinds[-1] == "done"


def test_delete_cancels_the_run_and_closes_the_simulator_connection(
    server: ServeHandle, client: httpx.Client, store_path: Path, sim: simulator.SimServer
) -> None:
    t0 = time.monotonic()
    run = start(client, "crawl", topic="sand")
    run_id = run["run_id"]
    got: list[list[SSE]] = []
    listener = threading.Thread(
        target=lambda: got.append(read_events(client, run["events_url"])[0])
    )
    listener.start()
    wait_until(lambda: server.snapshot()[run_id]["text_chars"] > 0, timeout=10, what="text arrives")
    response = client.request("DELETE", run["url"], json={})
    assert response.status_code == 200
    assert response.json() == {"run_id": run_id, "status": "cancelled"}
    listener.join(10)
    assert not listener.is_alive()
    events = got[0]
    assert events[-1].event == "error"
    record = PromptStore(store_path).get_run(run_id)
    assert events[-1].json() == {"status": "cancelled", "message": record.error}
    assert record.status == "cancelled"
    assert text_of(events) == record.text
    sim.wait_for(
        lambda r: (
            r.outcome == "client_disconnected"
            and (r.started_at or 0) > t0
            and r.disconnect_phase == "generation"
        ),
        timeout=10,
    )
    assert client.request("DELETE", run["url"], json={}).status_code == 409


def test_a_run_nobody_listens_to_is_cancelled_grace_seconds_after_the_post(
    store_path: Path, sim: simulator.SimServer
) -> None:
    """Nobody ever connected: the grace period runs from the POST (a client that starts runs
    and never reads them cannot keep the model busy)."""
    grace = 1.0
    with (
        service(store_path, sim.base_url, grace=grace) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        posted = time.monotonic()
        run = start(client, "crawl", topic="dust")
        store = PromptStore(store_path)
        wait_until(
            lambda: store.get_run(run["run_id"]).status == "cancelled", timeout=10, what="cancelled"
        )
        cancelled_after = time.monotonic() - posted
        sim.wait_for(
            lambda r: r.outcome == "client_disconnected" and (r.started_at or 0) > posted,
            timeout=10,
        )
        # A listener that comes back later still gets the whole (partial) run from the store.
        events, _ = read_events(client, run["events_url"])
        assert events[-1].json()["status"] == "cancelled"
        assert text_of(events) == store.get_run(run["run_id"]).text
    assert grace <= cancelled_after < grace + 5.0


def test_the_grace_period_starts_again_when_the_last_listener_leaves(
    store_path: Path, sim: simulator.SimServer
) -> None:
    """Listened to, then left, then back within the grace, then left for good: the run lives
    on while anyone listens and ends grace seconds after the last one left."""
    grace = 2.0
    with (
        service(store_path, sim.base_url, grace=grace) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        posted = time.monotonic()
        run = start(client, "crawl", topic="sand")
        store = PromptStore(store_path)

        def deltas(n: int) -> Callable[[list[SSE]], bool]:
            return lambda events: sum(e.event == "delta" for e in events) >= n

        # 50 deltas at 20 tokens/s: listened to for longer than the grace period.
        first, reader = read_events(client, run["events_url"], stop=deltas(50))
        left = time.monotonic()
        assert left - posted > grace
        time.sleep(grace / 4)  # back well within the grace period: the run is still live
        assert run["run_id"] in server.snapshot()
        second, reader = read_events(
            client, run["events_url"], last_id=reader.last_id, stop=deltas(10)
        )
        left_again = time.monotonic()
        wait_until(
            lambda: store.get_run(run["run_id"]).status == "cancelled", timeout=10, what="cancelled"
        )
        cancelled = time.monotonic()
        record = store.get_run(run["run_id"])
    assert cancelled - left_again >= grace  # counted from the last listener leaving...
    assert cancelled - left_again < grace + 5.0  # ...and it did end
    assert record.text.startswith(text_of(first) + text_of(second))


def test_a_stalled_client_is_bounded_then_dropped_and_can_resume(
    store_path: Path, sim: simulator.SimServer
) -> None:
    limit, event_chars = 0.3, 4096
    # A small kernel send buffer, so the server's own write buffer fills quickly.
    with (
        service(
            store_path,
            sim.base_url,
            slow_client_limit=limit,
            max_event_chars=event_chars,
            send_buffer=16384,
        ) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        run = start(client, "huge", topic="everything")
        run_id = run["run_id"]
        # Two clients with tiny receive windows that read nothing, and one normal client.
        stalled = httpx.Client(
            base_url=server.url,
            timeout=TIMEOUT,
            transport=httpx.HTTPTransport(
                socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
            ),
        )
        streams = [stalled.stream("GET", run["events_url"]) for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        normal: list[list[SSE]] = []
        reader_thread = threading.Thread(
            target=lambda: normal.append(read_events(client, run["events_url"])[0])
        )
        reader_thread.start()

        high = behind = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            high = max(high, *server.write_buffers(), 0)
            live = server.snapshot().get(run_id)
            if live is None or live["listeners"] <= 1:
                break
            behind = max(behind, *live["behind"])
            time.sleep(0.02)
        live = server.snapshot().get(run_id)
        assert live is not None, "the run ended before the stalled clients were dropped"
        assert live["listeners"] == 1  # only the normal client is left
        # What the server held for a stalled client: uvicorn's 64 KiB high-water mark plus one
        # event, never the text behind it (800 kB).
        bound = 65536 + 4 * event_chars + 1024
        assert high <= bound
        assert behind > bound  # it fell further behind than that: its deltas were merged
        reader_thread.join(15)
        assert normal
        assert normal[0][-1].event == "done"
        record = PromptStore(store_path).get_run(run_id)
        assert len(record.text) == 800_000
        assert text_of(normal[0]) == record.text

        for response, stream in zip(responses, streams, strict=True):
            reader = SSEReader()
            events: list[SSE] = []
            try:
                for line in response.iter_lines():
                    if (event := reader.feed(line)) is not None:
                        events.append(event)
            except httpx.TransportError:
                pass  # the connection was cut; what arrived whole still counts
            stream.__exit__(None, None, None)
            assert all(e.event != "done" for e in events)
            before = text_of(events)
            assert len(before.encode()) < 400_000  # it got only a bounded head start
            rest, _ = read_events(client, run["events_url"], last_id=reader.last_id)
            assert before + text_of(rest) == record.text
        stalled.close()


def test_stopping_the_server_cancels_and_records_running_runs(
    server: ServeHandle, client: httpx.Client, store_path: Path, sim: simulator.SimServer
) -> None:
    t0 = time.monotonic()
    run = start(client, "crawl", topic="stone")
    run_id = run["run_id"]
    got: list[list[SSE]] = []
    listening = threading.Event()

    def heard(events: list[SSE]) -> bool:
        if any(e.event == "delta" for e in events):
            listening.set()
        return False

    listener = threading.Thread(
        target=lambda: got.append(read_events(client, run["events_url"], stop=heard)[0])
    )
    listener.start()
    # Stop only once the listener holds the stream: stopping before it connects would leave it
    # nothing to hear, which is a different case from the one this test is about.
    assert listening.wait(10), "the listener heard no text"
    server.stop()
    listener.join(10)
    assert got, "the listener did not finish"
    record = PromptStore(store_path).get_run(run_id)
    assert record.status == "cancelled"
    assert got[0][-1].json() == {"status": "cancelled", "message": record.error}
    assert text_of(got[0]) == record.text
    sim.wait_for(
        lambda r: r.outcome == "client_disconnected" and (r.started_at or 0) > t0, timeout=10
    )
