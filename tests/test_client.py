"""LMStudioClient against the simulator over real loopback HTTP: text, stats, every failure."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from lmstream_nb import (
    AuthenticationError,
    Budgets,
    FirstTokenTimeout,
    HTTPStatusError,
    LMStudioClient,
    ModelNotFound,
    ModelNotLoaded,
    ProtocolError,
    ReasoningDelta,
    RequestError,
    Retries,
    ServerStreamError,
    ServerUnreachable,
    StreamFinished,
    StreamInterrupted,
    StreamStalled,
    StreamStarted,
    TextDelta,
    simulator,
)
from lmstream_nb._client import ChatStream
from lmstream_nb._errors import render

pytestmark = pytest.mark.anyio

MODEL = "lmstream-sim-8b"
FAST_RETRIES = Retries(attempts=2, backoff=0.05, max_backoff=0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def drain(stream: ChatStream) -> list[Any]:
    async with stream:
        return [event async for event in stream]


def requests_for(
    sim: simulator.SimServer, response_id: str | None
) -> list[simulator.RequestRecord]:
    return [r for r in sim.records() if r.id == response_id]


# -- the good path --------------------------------------------------------------------------


async def test_streams_text_events_and_stats(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Hello there", model=MODEL, sim={"output_tokens": 20})
        events = await drain(stream)
        blocking = await client.complete("Hello there", model=MODEL, sim={"output_tokens": 20})
    assert isinstance(events[0], StreamStarted)
    assert events[0].model == MODEL
    assert len(events[0].request_id) == 32
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 20
    finished = events[-1]
    assert isinstance(finished, StreamFinished)
    assert finished.finish_reason == "stop"
    assert finished.model == MODEL
    assert (finished.response_id or "").startswith("chatcmpl-")
    stats = finished.stats
    assert stats.completion_tokens == 20
    assert (stats.prompt_tokens or 0) > 0
    assert stats.ttft_s is not None
    assert 0 < stats.ttft_s <= stats.duration_s
    assert (stats.tokens_per_s or 0) > 0
    assert stats.chunks >= 20
    assert stream.text == "".join(d.content for d in deltas)
    assert stats.text_chars == len(stream.text)
    assert blocking.text == stream.text, "same seed and prompt: same text either way"
    assert blocking.finish_reason == "stop"


async def test_max_tokens_gives_length_finish(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        events = await drain(client.stream_chat("Hi", model=MODEL, max_tokens=5))
    assert sum(isinstance(e, TextDelta) for e in events) == 5
    assert events[-1].finish_reason == "length"


async def test_reasoning_arrives_separately(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat(
            "Think",
            model=MODEL,
            sim={"reasoning": "separate", "reasoning_tokens": 6, "output_tokens": 4},
        )
        events = await drain(stream)
    kinds = [type(e).__name__ for e in events if isinstance(e, TextDelta | ReasoningDelta)]
    assert kinds == ["ReasoningDelta"] * 6 + ["TextDelta"] * 4
    assert stream.reasoning
    assert stream.text
    assert stream.reasoning not in stream.text


@pytest.mark.parametrize("dialect", ["openai", "llamacpp"])
async def test_other_server_dialects(sim: simulator.SimServer, dialect: str) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Hi", model=MODEL, sim={"dialect": dialect, "output_tokens": 7})
        events = await drain(stream)
    assert sum(isinstance(e, TextDelta) for e in events) == 7
    assert events[-1].stats.completion_tokens == 7


@pytest.mark.parametrize("line_ending", ["crlf", "cr"])
async def test_line_endings_and_bom_end_to_end(sim: simulator.SimServer, line_ending: str) -> None:
    async with LMStudioClient(sim.base_url) as client:
        plain = await client.stream_chat("Hi", model=MODEL, sim={"output_tokens": 9}).collect()
        odd = await client.stream_chat(
            "Hi", model=MODEL, sim={"output_tokens": 9, "line_ending": line_ending, "bom": True}
        ).collect()
    assert odd.text == plain.text
    assert odd.finish_reason == "stop"


async def test_keepalive_comments_during_prompt_processing(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        done = await client.stream_chat(
            "x" * 400,
            model=MODEL,
            sim={"prefill_tps": 500, "ping_s": 0.02, "output_tokens": 3},
        ).collect()
    assert done.finish_reason == "stop"
    assert done.text


async def test_one_mebibyte_data_line(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        done = await client.stream_chat(
            "Big", model=MODEL, sim={"output_tokens": 2, "chunk_chars": 1 << 20}
        ).collect()
    assert len(done.text) == 2 << 20
    assert done.finish_reason == "stop"


async def test_first_token_later_than_idle_budget_succeeds(sim: simulator.SimServer) -> None:
    # 100 prompt tokens at 200 tok/s: the first token comes after ~0.5 s, the idle budget is
    # 0.2 s; only the first-token budget applies before the first token.
    budgets = Budgets(first_token=10.0, idle=0.2)
    async with LMStudioClient(sim.base_url, budgets=budgets) as client:
        done = await client.stream_chat(
            "y" * 400, model=MODEL, sim={"prefill_tps": 200, "output_tokens": 5}
        ).collect()
    assert done.finish_reason == "stop"
    assert done.stats.ttft_s is not None
    assert done.stats.ttft_s > 0.2


async def test_eight_concurrent_streams_never_mix(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:

        async def one(seed: int) -> str:
            done = await client.stream_chat(
                "Same prompt", model=MODEL, seed=seed, sim={"output_tokens": 60}
            ).collect()
            return done.text

        alone = [await one(seed) for seed in range(8)]
        together = await asyncio.gather(*(one(seed) for seed in range(8)))
    assert together == alone
    assert len(set(alone)) == 8


async def test_server_ignoring_stream_true_is_tolerated(sim: simulator.SimServer) -> None:
    # The same request with stream=false returns one JSON completion; the stream API accepts it.
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Hi", model=MODEL, stream=False, sim={"output_tokens": 4})
        events = await drain(stream)
    assert sum(isinstance(e, TextDelta) for e in events) == 1
    assert events[-1].finish_reason == "stop"
    assert stream.text


# -- failures before any text ---------------------------------------------------------------


async def test_unreachable_server_names_url_and_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with LMStudioClient(url, retries=FAST_RETRIES) as client:
        with pytest.raises(ServerUnreachable) as info:
            await client.stream_chat("Hi", model=MODEL).collect()
        with pytest.raises(ServerUnreachable):
            await client.list_models()
    message = str(info.value)
    assert url in message
    assert "Start Server" in message
    assert info.value.url == url


async def test_connection_refused_is_retried_until_the_server_is_up() -> None:
    port = free_port()
    retries = Retries(attempts=8, backoff=0.2, max_backoff=0.2)
    async with LMStudioClient(f"http://127.0.0.1:{port}/v1", retries=retries) as client:
        task = asyncio.create_task(client.stream_chat("Hi", model=MODEL).collect())
        await asyncio.sleep(0.3)  # let the first attempts be refused
        assert not task.done()
        with simulator.serve(profile="test-fast", port=port) as late:
            done = await asyncio.wait_for(task, 10)
            assert len(late.records()) == 1
    assert done.finish_reason == "stop"


async def test_model_not_found_404(sim: simulator.SimServer) -> None:
    scenario = {
        "http_status": 404,
        "error_body": "string",
        "error_message": 'Model "nope" not found',
    }
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(ModelNotFound) as info:
            await client.stream_chat("Hi", model="nope", sim=scenario).collect()
    assert info.value.status == 404
    assert info.value.model == "nope"
    assert "SyncLMStudioClient().list_models()" in str(info.value)
    assert "`lmstream models`" in render(info.value, "cli")


async def test_unknown_model_id_400(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url, api="openai") as client:
        with pytest.raises(ModelNotFound) as info:
            await client.stream_chat("Hi", model="no-such-model").collect()
    assert info.value.status == 400
    assert "Invalid model identifier" in (info.value.server_message or "")


async def test_no_model_loaded(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(ModelNotLoaded) as info:
            await client.stream_chat("Hi", model=MODEL, sim={"no_model": True}).collect()
    assert "lms load" in str(info.value)


async def test_400_with_string_error_carries_server_message(sim: simulator.SimServer) -> None:
    scenario = {"http_status": 400, "error_body": "string", "error_message": "Bad temperature"}
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(HTTPStatusError) as info:
            await client.stream_chat("Hi", model=MODEL, sim=scenario).collect()
    assert type(info.value) is HTTPStatusError
    assert info.value.status == 400
    assert info.value.server_message == "Bad temperature"
    assert "Bad temperature" in str(info.value)
    assert sim.base_url in str(info.value)


@pytest.mark.parametrize("error_body", ["object", "html", "empty"])
async def test_500_bodies(sim: simulator.SimServer, error_body: str) -> None:
    scenario = {"http_status": 500, "error_body": error_body, "error_message": "Engine crashed"}
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(HTTPStatusError) as info:
            await client.stream_chat("Hi", model=MODEL, sim=scenario).collect()
    err = info.value
    assert err.status == 500
    if error_body == "empty":
        assert err.server_message is None
        assert "no message" in str(err)
    else:
        assert "Engine crashed" in (err.server_message or "")
        assert "<" not in (err.server_message or "")


async def test_503_is_retried_then_reported(sim: simulator.SimServer) -> None:
    before = len(sim.chats())
    async with LMStudioClient(sim.base_url, retries=FAST_RETRIES) as client:
        with pytest.raises(HTTPStatusError) as info:
            await client.stream_chat("Hi", model=MODEL, sim={"http_status": 503}).collect()
    assert info.value.status == 503
    assert len(sim.chats()) - before == 1 + FAST_RETRIES.attempts


async def test_400_is_not_retried(sim: simulator.SimServer) -> None:
    before = len(sim.chats())
    async with LMStudioClient(sim.base_url, retries=FAST_RETRIES) as client:
        with pytest.raises(HTTPStatusError):
            await client.stream_chat("Hi", model=MODEL, sim={"http_status": 400}).collect()
    assert len(sim.chats()) - before == 1


async def test_wrong_path_200_string_error(sim: simulator.SimServer) -> None:
    root = sim.base_url.removesuffix("/v1")
    async with LMStudioClient(root) as client:
        with pytest.raises(HTTPStatusError) as info:
            await client.stream_chat("Hi", model=MODEL).collect()
    assert "Unexpected endpoint" in (info.value.server_message or "")
    assert "/v1" in str(info.value)


async def test_non_sse_content_type(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(ProtocolError) as info:
            await client.stream_chat("Hi", model=MODEL, sim={"content_type": "text/html"}).collect()
    assert "text/html" in str(info.value)
    assert "event stream" in str(info.value)


async def test_authentication(sim: simulator.SimServer) -> None:
    with simulator.serve(profile="test-fast", api_key="s3cret-token") as locked:
        async with LMStudioClient(locked.base_url) as client:
            with pytest.raises(AuthenticationError) as info:
                await client.stream_chat("Hi", model=MODEL).collect()
        assert info.value.status == 401
        assert "LMSTREAM_API_KEY" in str(info.value)
        async with LMStudioClient(locked.base_url, api_key="s3cret-token") as client:
            assert "s3cret" not in repr(client)
            done = await client.stream_chat("Hi", model=MODEL).collect()
    assert done.finish_reason == "stop"


async def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSTREAM_API_KEY", "from-env")
    with simulator.serve(profile="test-fast", api_key="from-env") as locked:
        monkeypatch.setenv("LMSTREAM_BASE_URL", locked.base_url)
        async with LMStudioClient() as client:
            assert client.base_url == locked.base_url
            assert await client.list_models()


async def test_first_token_timeout_is_not_retried(sim: simulator.SimServer) -> None:
    before = len(sim.chats())
    budgets = Budgets(first_token=0.3, idle=5)
    async with LMStudioClient(sim.base_url, budgets=budgets, retries=FAST_RETRIES) as client:
        with pytest.raises(FirstTokenTimeout) as info:
            await client.stream_chat("x" * 400, model=MODEL, sim={"prefill_tps": 10}).collect()
    assert info.value.budget == 0.3
    assert "first_token_timeout" in str(info.value)
    assert len(sim.chats()) - before == 1


async def test_transient_failures_before_the_first_token_are_retried(
    sim: simulator.SimServer,
) -> None:
    """A drop after the headers, an empty body and a 503 on the first attempt: the retry wins."""
    async with LMStudioClient(sim.base_url, retries=FAST_RETRIES) as client:
        for i, fault in enumerate(({"disconnect_at": 0}, {"end_at": 0}, {"http_status": 503})):
            before = len(sim.chats())
            done = await client.stream_chat(
                f"transient {i}",
                model=MODEL,
                sim={**fault, "fault_attempts": 1, "output_tokens": 4},
            ).collect()
            assert done.finish_reason == "stop", fault
            assert len(sim.chats()) - before == 2, fault


@pytest.mark.parametrize(
    ("fault", "retried"),
    [
        ({"http_status": 503}, True),
        ({"http_status": 429}, True),
        ({"http_status": 500}, False),
        ({"http_status": 400}, False),
        ({"disconnect_at": 0}, True),
    ],
)
async def test_the_stream_and_the_blocking_request_retry_the_same_failures(
    sim: simulator.SimServer, fault: dict[str, Any], retried: bool
) -> None:
    """One retry loop serves both: the same fault is retried (or not) the same way."""
    counts = []
    async with LMStudioClient(sim.base_url, retries=FAST_RETRIES) as client:
        requests = (
            lambda: client.stream_chat("Hi", model=MODEL, sim=fault).collect(),
            lambda: client.complete("Hi", model=MODEL, sim=fault),
        )
        for request in requests:
            before = len(sim.chats())
            with pytest.raises(RequestError):
                await request()
            counts.append(len(sim.chats()) - before)
    assert counts == [1 + FAST_RETRIES.attempts if retried else 1] * 2


async def test_a_body_that_always_ends_empty_is_reported_after_the_retries(
    sim: simulator.SimServer,
) -> None:
    before = len(sim.chats())
    async with LMStudioClient(sim.base_url, retries=FAST_RETRIES) as client:
        with pytest.raises(StreamInterrupted, match="ended before the first token") as info:
            await client.stream_chat("Hi", model=MODEL, sim={"end_at": 0}).collect()
    assert info.value.partial_text == ""
    assert len(sim.chats()) - before == 1 + FAST_RETRIES.attempts


# A queueing server (one answer at a time, like LM Studio): every request takes 0.3 s of
# prompt processing and 0.3 s of generation, so the second of two waits 0.9 s for its first
# token, longer than a first-token budget of 0.6 s but not while the first one is answered.
_QUEUED = {"prefill_tps": 333, "gen_tps": 50, "output_tokens": 15, "jitter": 0.0}


async def test_a_queued_request_waits_while_the_one_ahead_is_answered() -> None:
    budgets = Budgets(first_token=0.6, idle=5)
    with simulator.serve(profile="test-fast", parallel=1) as server:
        async with LMStudioClient(server.base_url, budgets=budgets) as client:
            done = await asyncio.gather(
                *(
                    client.stream_chat("q" * 400, model=MODEL, seed=i, sim=_QUEUED).collect()
                    for i in range(2)
                )
            )
    assert [d.finish_reason for d in done] == ["stop", "stop"]
    assert max(d.stats.ttft_s or 0.0 for d in done) > 0.6  # it did wait past the budget


async def test_a_queued_request_waits_while_the_one_ahead_reports_progress() -> None:
    """LM Studio 0.4's native chat reports the prompt processing of the request ahead (1.2 s, in
    eight steps): the one queued behind it is waiting its turn, not stuck, though nothing of
    either has been answered yet."""
    budgets = Budgets(first_token=0.6, idle=5)
    # A marker in the prompt and no seed: the native chat takes neither a ``sim`` nor a ``seed``.
    marker = "[[sim " + json.dumps({**_QUEUED, "batch_size": 50}) + "]]"
    prompt = marker + "q" * (1600 - len(marker))
    with simulator.serve(profile="test-fast", parallel=1) as server:
        async with LMStudioClient(server.base_url, budgets=budgets) as client:
            streams = [client.stream_chat(prompt, model=MODEL) for _ in range(2)]
            done = await asyncio.gather(*(stream.collect() for stream in streams))
    assert [s.api for s in streams] == ["native", "native"]
    assert [d.finish_reason for d in done] == ["stop", "stop"]
    first = sorted(d.stats.first_progress_s or 0.0 for d in done)
    assert first[1] > 1.2  # the second heard nothing of its own for longer than the budget


async def test_without_a_sibling_stream_the_queue_wait_counts() -> None:
    """Two separate clients know nothing of each other: the queued one runs out of budget."""
    budgets = Budgets(first_token=0.6, idle=5)
    with simulator.serve(profile="test-fast", parallel=1) as server:
        clients = [LMStudioClient(server.base_url, budgets=budgets) for _ in range(2)]
        try:
            outcomes = await asyncio.gather(
                *(
                    c.stream_chat("q" * 400, model=MODEL, seed=i, sim=_QUEUED).collect()
                    for i, c in enumerate(clients)
                ),
                return_exceptions=True,
            )
        finally:
            for c in clients:
                await c.aclose()
    assert sorted(type(o).__name__ for o in outcomes) == ["Completion", "FirstTokenTimeout"]


async def test_a_silent_server_still_times_out_with_a_sibling_waiting() -> None:
    """Two waiting streams do not keep each other alive: nothing was answered, both give up."""
    budgets = Budgets(first_token=0.3, idle=5)
    with simulator.serve(profile="test-fast") as server:
        async with LMStudioClient(server.base_url, budgets=budgets) as client:
            outcomes = await asyncio.gather(
                *(
                    client.stream_chat(
                        "x" * 400, model=MODEL, seed=i, sim={"prefill_tps": 10}
                    ).collect()
                    for i in range(2)
                ),
                return_exceptions=True,
            )
    assert [type(o).__name__ for o in outcomes] == ["FirstTokenTimeout"] * 2


# -- failures after text has arrived: partial text is kept -------------------------------------


async def expect_partial(
    sim: simulator.SimServer,
    error: type[Exception],
    scenario: dict[str, Any],
    tokens: int,
    budgets: Budgets | None = None,
) -> Any:
    async with LMStudioClient(sim.base_url, budgets=budgets, retries=FAST_RETRIES) as client:
        stream = client.stream_chat("Tell me", model=MODEL, sim=scenario)
        seen: list[str] = []

        async def consume() -> None:
            async with stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        seen.append(event.content)

        with pytest.raises(error) as info:
            await consume()
    assert len(seen) == tokens
    assert info.value.partial_text == "".join(seen) == stream.text  # type: ignore[attr-defined]
    assert len(requests_for(sim, stream.response_id)) == 1, "never retried after text"
    return info.value


async def test_connection_reset_mid_stream_keeps_partial_text(sim: simulator.SimServer) -> None:
    err = await expect_partial(sim, StreamInterrupted, {"disconnect_at": 5}, 5)
    assert ".partial_text" in str(err)


async def test_stream_without_done_is_interrupted(sim: simulator.SimServer) -> None:
    err = await expect_partial(sim, StreamInterrupted, {"end_at": 6}, 6)
    assert "without a finish signal" in str(err)


async def test_malformed_json_line_is_named(sim: simulator.SimServer) -> None:
    err = await expect_partial(sim, ProtocolError, {"malformed_at": 3}, 3)
    assert err.line == '{"id": broken'
    assert '{"id": broken' in str(err)


async def test_in_stream_error_object(sim: simulator.SimServer) -> None:
    err = await expect_partial(sim, ServerStreamError, {"error_at": 4}, 4)
    assert err.server_message == "Compute error."
    assert "Compute error." in str(err)


async def test_stall_longer_than_idle_budget(sim: simulator.SimServer) -> None:
    budgets = Budgets(first_token=10, idle=0.3)
    err = await expect_partial(
        sim, StreamStalled, {"stall_at": 3, "stall_s": 30}, 3, budgets=budgets
    )
    assert err.budget == 0.3
    assert "idle_timeout" in str(err)


async def test_stall_shorter_than_idle_budget_is_fine(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url, idle_timeout=2.0) as client:
        done = await client.stream_chat(
            "Hi", model=MODEL, sim={"stall_at": 3, "stall_s": 0.3, "output_tokens": 6}
        ).collect()
    assert done.finish_reason == "stop"


# -- cancellation closes the response and the server stops -------------------------------------


async def wait_disconnected(sim: simulator.SimServer, response_id: str | None) -> Any:
    record = await asyncio.to_thread(
        sim.wait_for,
        lambda r: r.id == response_id and r.outcome == "client_disconnected",
        5.0,
    )
    assert record.sent_tokens < record.planned_tokens
    return record


async def test_breaking_out_of_the_loop_stops_generation(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Long", model=MODEL, sim={"output_tokens": 5000})
        async with stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    break
        await wait_disconnected(sim, stream.response_id)


async def test_cancelling_the_task_stops_generation(sim: simulator.SimServer) -> None:
    got_text = asyncio.Event()
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Long", model=MODEL, sim={"output_tokens": 5000})

        async def consume() -> None:
            async for event in stream:
                if isinstance(event, TextDelta):
                    got_text.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_text.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        record = await wait_disconnected(sim, stream.response_id)
    assert record.disconnect_phase == "generation"
    assert stream.text, "the text received before the cancel is still there"


async def test_idle_budget_does_not_count_consumer_time(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url, idle_timeout=0.2) as client:
        stream = client.stream_chat("Hi", model=MODEL, sim={"output_tokens": 3})
        async with stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    await asyncio.sleep(0.3)  # slow consumer, not a slow server
    assert stream.finished is not None
    assert stream.finished.finish_reason == "stop"


async def test_breaking_without_async_with_still_closes(sim: simulator.SimServer) -> None:
    """An abandoned stream is closed by the event loop's async-generator finaliser at once."""
    response_id = None
    async with LMStudioClient(sim.base_url) as client:
        async for event in client.stream_chat("Long", model=MODEL, sim={"output_tokens": 5000}):
            if isinstance(event, TextDelta):
                break
        record = await asyncio.to_thread(
            sim.wait_for,
            lambda r: r.outcome == "client_disconnected" and r.sent_tokens < 5000,
            5.0,
        )
        response_id = record.id
    assert response_id


@pytest.mark.parametrize(
    ("model_id", "kind", "chat"),
    [
        ("lmstream-sim-8b", None, True),
        ("text-embedding-nomic-embed-text-v1.5", None, False),
        ("BGE-M3-Embed", None, False),
        ("qwen2.5-7b-instruct", "llm", True),
        ("qwen2-vl-7b", "vlm", True),
        ("some-encoder", "embeddings", False),  # LM Studio's /api/v0 type wins over the id
    ],
)
def test_which_models_can_chat(model_id: str, kind: str | None, chat: bool) -> None:
    from lmstream_nb._client import is_chat_model

    assert is_chat_model(model_id, kind) is chat


async def test_chat_models_leave_out_the_embedding_model(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        assert await client.list_models() == ["lmstream-sim-8b", "lmstream-sim-embed"]
        assert await client.chat_models() == ["lmstream-sim-8b"]
        assert await client.default_model() == "lmstream-sim-8b"


async def test_a_cancel_as_the_awaited_result_lands_is_not_lost() -> None:
    """The race asyncio.wait_for loses before Python 3.12: the result and the cancel arrive in
    the same turn of the loop; the cancel must win, as a Ctrl-C or a Stop must."""
    from lmstream_nb._client import within

    loop = asyncio.get_running_loop()
    answer: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.ensure_future(within(answer, 10))
    await asyncio.sleep(0)  # one turn: `within` is now waiting on `answer`
    answer.set_result(1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    never: asyncio.Future[int] = loop.create_future()
    with pytest.raises(asyncio.TimeoutError):
        await within(never, 0.01)
    assert never.cancelled(), "what timed out is cancelled, as wait_for does"
