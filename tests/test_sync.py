"""The blocking facade: same events and errors, usable where an event loop already runs."""

from __future__ import annotations

import asyncio

import pytest

from lmstream_nb import (
    InvalidBaseURL,
    ServerStreamError,
    StreamFinished,
    StreamInterrupted,
    SyncLMStudioClient,
    TextDelta,
    simulator,
)

MODEL = "lmstream-sim-8b"


def test_sync_stream_and_complete(sim: simulator.SimServer) -> None:
    with SyncLMStudioClient(sim.base_url) as client:
        assert MODEL in client.list_models()
        with client.stream_chat("Hi", model=MODEL, sim={"output_tokens": 12}) as stream:
            events = list(stream)
        blocking = client.complete("Hi", model=MODEL, sim={"output_tokens": 12})
    assert sum(isinstance(e, TextDelta) for e in events) == 12
    assert isinstance(events[-1], StreamFinished)
    assert stream.text == blocking.text


def test_sync_client_inside_a_running_loop(sim: simulator.SimServer) -> None:
    """A Jupyter cell runs inside an asyncio loop; the facade must still work there."""

    async def cell() -> str:
        with SyncLMStudioClient(sim.base_url) as client:
            return client.complete("Hi", model=MODEL, sim={"output_tokens": 5}).text

    assert asyncio.run(cell())


def test_sync_errors_keep_partial_text(sim: simulator.SimServer) -> None:
    with SyncLMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Hi", model=MODEL, sim={"disconnect_at": 4})
        with pytest.raises(StreamInterrupted) as info, stream:
            for _ in stream:
                pass
    assert info.value.partial_text == stream.text != ""


def test_sync_close_mid_stream_stops_generation(sim: simulator.SimServer) -> None:
    with SyncLMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Hi", model=MODEL, sim={"output_tokens": 5000})
        for event in stream:
            if isinstance(event, TextDelta):
                break
        stream.close()
        record = sim.wait_for(
            lambda r: r.id == stream.response_id and r.outcome == "client_disconnected",
            5.0,
        )
    assert record.sent_tokens < record.planned_tokens


def test_sync_text_in_the_same_read_as_an_error_comes_first(sim: simulator.SimServer) -> None:
    one_write = {"time_scale": 0, "write_events": 100, "output_tokens": 6, "error_at": 4}
    seen: list[str] = []
    with SyncLMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Hi", model=MODEL, sim=one_write)
        with pytest.raises(ServerStreamError) as info, stream:
            seen.extend(e.content for e in stream if isinstance(e, TextDelta))
    assert len(seen) == 4
    assert info.value.partial_text == "".join(seen) == stream.text


def test_sync_client_refuses_a_bad_base_url_and_hides_credentials() -> None:
    with pytest.raises(InvalidBaseURL) as info:
        SyncLMStudioClient("http://me:secret-pw@localhost:port/v1")
    assert "secret-pw" not in str(info.value)
    client = SyncLMStudioClient("http://me:secret-pw@127.0.0.1:9/v1?key=k-123456")
    try:
        assert repr(client) == "SyncLMStudioClient(base_url='http://127.0.0.1:9/v1?key=***')"
    finally:
        client.close()


def test_the_sync_stream_says_where_it_went(sim: simulator.SimServer) -> None:
    with SyncLMStudioClient(sim.base_url) as client:
        assert client.server_info().kind == "lmstudio"
        with client.stream_chat("Hi", model=MODEL, max_tokens=2) as stream:
            events = list(stream)
    assert stream.api == "native"
    assert "native chat" in stream.api_reason
    assert events[-1].stats.completion_tokens == 2
