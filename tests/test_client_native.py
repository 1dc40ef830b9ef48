"""LMStudioClient on LM Studio 0.4's native chat and on llama.cpp, against the simulator:
where each request goes, every native event, progress and the budgets that follow it, and the
context check before sending."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from lmstream_nb import (
    Budgets,
    FirstTokenTimeout,
    HTTPStatusError,
    LMStudioClient,
    LoadProgress,
    ModelNotFound,
    PromptProgress,
    PromptTooLong,
    ReasoningDelta,
    Retries,
    ServerStreamError,
    StreamFinished,
    StreamInterrupted,
    StreamStarted,
    TextDelta,
    UnsupportedRequest,
    simulator,
)
from lmstream_nb._client import ChatStream

pytestmark = pytest.mark.anyio

MODEL = "lmstream-sim-8b"
OTHER = "other-3b"


async def drain(stream: ChatStream) -> list[Any]:
    async with stream:
        return [event async for event in stream]


def progress_of(events: list[Any]) -> list[LoadProgress | PromptProgress]:
    return [e for e in events if isinstance(e, (LoadProgress, PromptProgress))]


# -- where a request goes ---------------------------------------------------------------------


async def test_a_plain_request_goes_to_the_native_chat_and_says_why(
    sim: simulator.SimServer,
) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            model=MODEL,
            temperature=0.2,
            max_tokens=5,
        )
        events = await drain(stream)
    assert stream.api == "native"
    assert "reports model loading and prompt processing" in stream.api_reason
    started = events[0]
    assert isinstance(started, StreamStarted)
    assert (started.api, started.context_length) == ("native", 131072)
    record = sim.wait_for(lambda r: r.id == stream.response_id and r.outcome != "running")
    assert record.path == "/api/v1/chat"
    assert record.sent_tokens == 5
    finished = events[-1]
    assert isinstance(finished, StreamFinished)
    assert finished.finish_reason == "length"  # all of max_tokens was used


@pytest.mark.parametrize(
    ("messages", "extra", "why"),
    [
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"},
            ],
            {},
            "assistant turns",
        ),
        ("Hi", {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ("Hi", {"tools": []}, "'tools'"),
    ],
    ids=["assistant turns", "response_format", "tools"],
)
async def test_what_the_native_chat_cannot_carry_goes_to_chat_completions(
    sim: simulator.SimServer, messages: Any, extra: dict[str, Any], why: str
) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat(messages, model=MODEL, max_tokens=3, **extra)
        await drain(stream)
        assert stream.api == "openai"
        assert why in stream.api_reason
        with pytest.raises(UnsupportedRequest) as info:
            async with LMStudioClient(sim.base_url, api="native") as native:
                await native.stream_chat(messages, model=MODEL, **extra).collect()
    assert why in info.value.reason
    assert "api='auto'" in str(info.value)


async def test_api_openai_never_probes_for_the_native_chat(sim: simulator.SimServer) -> None:
    before = len(sim.records())
    async with LMStudioClient(sim.base_url, api="openai", check_context=False) as client:
        stream = client.stream_chat("Hi", model=MODEL, max_tokens=2)
        await drain(stream)
    assert stream.api == "openai"
    assert [r.path for r in sim.records()[before:]] == ["/v1/chat/completions"]


async def test_the_server_is_probed_once_per_client_even_by_eight_streams_at_once() -> None:
    with simulator.serve(profile="test-fast", parallel=8) as sim:
        async with LMStudioClient(sim.base_url) as client:
            streams = [
                client.stream_chat(f"Question {i}", model=MODEL, max_tokens=20) for i in range(8)
            ]
            results = await asyncio.gather(*(s.collect() for s in streams))
        probes = [r for r in sim.records() if r.path == "/api/v1/models"]
        chats = sim.chats()
    assert len(probes) == 1
    assert [r.path for r in chats] == ["/api/v1/chat"] * 8
    assert all(r.outcome == "completed" for r in chats)
    assert all(s.api == "native" for s in streams)
    assert len({c.response_id for c in results}) == 8
    assert all(c.stats.completion_tokens == 20 for c in results)
    # Different questions, different answers, none mixed into another
    assert len({c.text for c in results}) == 8


async def test_a_base_url_without_v1_is_not_taken_for_the_native_api(
    sim: simulator.SimServer,
) -> None:
    async with LMStudioClient(sim.base_url.removesuffix("/v1")) as client:
        with pytest.raises(HTTPStatusError) as info:
            await client.stream_chat("Hi", model=MODEL).collect()
    assert "/v1" in str(info.value)
    assert "Unexpected endpoint" in (info.value.server_message or "")


# -- every native event --------------------------------------------------------------------------


async def test_text_reasoning_progress_and_the_servers_own_stats(
    sim: simulator.SimServer,
) -> None:
    async with LMStudioClient(sim.base_url, api="native") as client:
        stream = client.stream_chat(
            "think " * 2000,
            model=MODEL,
            sim={"reasoning": "separate", "reasoning_tokens": 6, "output_tokens": 10},
        )
        events = await drain(stream)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "StreamStarted"
    first_text = kinds.index("ReasoningDelta")
    assert set(kinds[1:first_text]) == {"PromptProgress"}
    assert "TextDelta" in kinds[first_text:]
    assert kinds[-1] == "StreamFinished"
    reasoning = "".join(e.content for e in events if isinstance(e, ReasoningDelta))
    text = "".join(e.content for e in events if isinstance(e, TextDelta))
    assert (reasoning, text) == (stream.reasoning, stream.text)
    assert reasoning
    assert text
    finished = events[-1]
    server = finished.server_stats
    assert server is not None
    assert server.output_tokens == 16
    assert server.reasoning_tokens == 6
    assert server.input_tokens == finished.stats.prompt_tokens > 2000
    assert finished.stats.completion_tokens == 16
    assert server.ttft_s is not None
    assert server.ttft_s > 0
    stats = finished.stats
    assert stats.first_progress_s is not None
    assert stats.ttft_s is not None
    assert 0 < stats.first_progress_s < stats.ttft_s
    assert stats.prompt_s is not None
    assert stats.prompt_tokens_per_s is not None


async def test_prompt_progress_rises_and_is_paced(sim: simulator.SimServer) -> None:
    """Many readings (a 64-token batch) reach the consumer as a few events a second."""
    async with LMStudioClient(sim.base_url, api="native") as client:
        stream = client.stream_chat(
            "p" * 16000, model=MODEL, sim={"batch_size": 64, "prefill_tps": 2000}
        )
        events = await drain(stream)
    progress = progress_of(events)
    fractions = [p.fraction for p in progress]
    assert fractions[0] == 0.0
    assert fractions[-1] == 1.0
    assert all(a < b for a, b in itertools.pairwise(fractions))
    assert all(isinstance(p, PromptProgress) for p in progress)
    # at most one event per 0.25 s, plus the start and the end of the phase
    span = progress[-1].elapsed_s - progress[0].elapsed_s
    assert len(progress) <= span / 0.25 + 3
    assert progress[0].eta_s is None
    later = [p.eta_s for p in progress[1:-1]]
    assert later
    assert all(eta is not None and eta > 0 for eta in later)
    assert progress[-1].eta_s == 0.0


async def test_a_jit_load_reports_loading_then_prompt_progress() -> None:
    with simulator.serve(profile="test-fast", models=(MODEL, OTHER)) as sim:
        async with LMStudioClient(sim.base_url, api="native") as client:
            stream = client.stream_chat(
                "Load me. " * 100, model=OTHER, sim={"load_s": 0.6, "output_tokens": 3}
            )
            events = await drain(stream)
    progress = progress_of(events)
    loading = [p for p in progress if isinstance(p, LoadProgress)]
    prompt = [p for p in progress if isinstance(p, PromptProgress)]
    assert loading
    assert prompt
    assert progress.index(loading[-1]) < progress.index(prompt[0])
    assert next(p.fraction for p in loading) == 0.0
    assert loading[-1].fraction == 1.0
    stats = events[-1].stats
    assert stats.load_s is not None
    assert stats.load_s >= 0.6
    assert events[-1].server_stats.load_s == stats.load_s


async def test_unknown_and_tool_events_are_ignored_and_text_is_not_duplicated() -> None:
    body = (
        'event: chat.start\ndata: {"type":"chat.start","model_instance_id":"m"}\n\n'
        'event: future.thing\ndata: {"type":"future.thing","x":[1,2]}\n\n'
        'event: tool_call.start\ndata: {"type":"tool_call.start","tool":"web"}\n\n'
        'data: {"type":"message.delta","content":"Hel"}\n\n'
        'event: message.delta\ndata: {"type":"message.delta","content":"lo"}\n\n'
        'event: chat.end\ndata: {"type":"chat.end","result":{"model_instance_id":"m",'
        '"output":[{"type":"message","content":"Hello"}],"stats":{"input_tokens":3,'
        '"total_output_tokens":2},"response_id":"resp_1"}}\n\n'
    )
    defaults = simulator.Scenario(raw_body=body)
    with simulator.serve(profile="test-fast", defaults=defaults) as sim:
        async with LMStudioClient(sim.base_url, api="native") as client:
            result = await client.stream_chat("Hi", model=MODEL).collect()
    assert result.text == "Hello"
    assert (result.model, result.response_id) == ("m", "resp_1")
    assert result.stats.completion_tokens == 2


# -- errors, cancellation, retries ----------------------------------------------------------------


async def test_an_unknown_model_is_model_not_found(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(ModelNotFound) as info:
            await client.stream_chat("Hi", model="no-such-model").collect()
    assert info.value.status == 404
    assert "not found" in (info.value.server_message or "")


async def test_an_error_during_the_stream_keeps_the_text() -> None:
    defaults = simulator.Scenario(output_tokens=12, error_at=6, write_events=3)
    with simulator.serve(profile="test-fast", defaults=defaults) as sim:
        async with LMStudioClient(sim.base_url) as client:
            stream = client.stream_chat("Hi", model=MODEL)
            seen: list[str] = []

            async def read() -> None:
                async with stream:
                    async for event in stream:
                        if isinstance(event, TextDelta):
                            seen.append(event.content)

            with pytest.raises(ServerStreamError) as info:
                await read()
    assert stream.api == "native"
    assert seen
    assert info.value.partial_text == "".join(seen) == stream.text
    assert "Compute error" in (info.value.server_message or "")


async def test_closing_a_native_stream_stops_the_server() -> None:
    with simulator.serve(profile="test-fast") as sim:
        async with LMStudioClient(sim.base_url, api="native") as client:
            stream = client.stream_chat("Hi", model=MODEL, sim={"output_tokens": 100000})
            async with stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        break
        record = sim.wait_for(lambda r: r.path == "/api/v1/chat" and r.outcome != "running")
    assert (record.outcome, record.disconnect_phase) == ("client_disconnected", "generation")
    assert record.sent_tokens < 100000


async def test_a_failure_before_the_first_token_is_retried_on_the_native_chat() -> None:
    defaults = simulator.Scenario(http_status=503, fault_attempts=1, output_tokens=8)
    retries = Retries(attempts=2, backoff=0.05, max_backoff=0.1)
    with simulator.serve(profile="test-fast", defaults=defaults) as sim:
        async with LMStudioClient(sim.base_url, retries=retries) as client:
            stream = client.stream_chat("Hi", model=MODEL)
            result = await stream.collect()
        chats = sim.chats()
    assert [r.status_code for r in chats] == [503, 200]
    assert stream.api == "native"
    assert result.stats.completion_tokens == 8
    assert len(result.text.split()) >= 1
    assert result.text == stream.text


# -- budgets that understand progress -------------------------------------------------------------


async def test_a_prompt_ten_times_the_first_token_budget_succeeds_while_progress_comes(
    sim: simulator.SimServer,
) -> None:
    budgets = Budgets(first_token=0.3, idle=5.0)
    async with LMStudioClient(sim.base_url, budgets=budgets, api="native") as client:
        stream = client.stream_chat(
            "q" * 12000, model=MODEL, sim={"prefill_tps": 1000, "batch_size": 200}
        )
        result = await stream.collect()
    assert stream.api == "native"
    assert result.stats.ttft_s is not None
    assert result.stats.ttft_s > 3.0
    assert result.stats.first_progress_s is not None
    assert result.stats.first_progress_s < 0.3


async def test_progress_that_stops_fails_after_the_idle_budget_and_says_where() -> None:
    budgets = Budgets(first_token=0.2, idle=0.5)
    scenario = {"batch_size": 100, "prompt_stall_at": 430, "stall_s": 60, "prefill_tps": 20000}
    with simulator.serve(profile="test-fast") as sim:
        async with LMStudioClient(sim.base_url, budgets=budgets, api="native") as client:
            stream = client.stream_chat("w" * 4000, model=MODEL, sim=scenario)
            with pytest.raises(FirstTokenTimeout) as info:
                await drain(stream)
        record = sim.wait_for(lambda r: r.path == "/api/v1/chat" and r.outcome != "running")
    error = info.value
    assert (error.phase, error.fraction, error.budget) == ("prompt", 0.43, 0.5)
    assert str(error).startswith("Prompt processing stopped at 43%: nothing new came from")
    assert "idle_timeout" in str(error)
    assert (record.outcome, record.disconnect_phase) == ("client_disconnected", "prefill")


async def test_no_progress_and_no_token_fails_on_the_first_token_budget_as_before(
    sim: simulator.SimServer,
) -> None:
    budgets = Budgets(first_token=0.3, idle=5.0)
    async with LMStudioClient(sim.base_url, budgets=budgets, api="openai") as client:
        with pytest.raises(FirstTokenTimeout) as info:
            await client.stream_chat("x" * 4000, model=MODEL, sim={"prefill_tps": 100}).collect()
    assert (info.value.phase, info.value.fraction, info.value.budget) == (None, None, 0.3)
    assert "first-token budget of 0.3 s" in str(info.value)


# -- llama.cpp: return_progress and the context check --------------------------------------------


@pytest.fixture
def llamacpp() -> Any:
    defaults = simulator.Scenario(dialect="llamacpp")
    with simulator.serve(profile="test-fast", defaults=defaults, context_length=4096) as server:
        yield server


async def test_llamacpp_reports_prompt_progress_with_token_counts(llamacpp: Any) -> None:
    async with LMStudioClient(llamacpp.base_url) as client:
        stream = client.stream_chat(
            "t" * 12000, model="any", sim={"batch_size": 512, "prefill_tps": 2000}
        )
        events = await drain(stream)
        info = await client.server_info()
    assert (info.kind, info.context_of("any"), info.slots.get("*")) == ("llamacpp", 4096, 4)
    assert stream.api == "openai"
    progress = progress_of(events)
    assert len(progress) >= 2
    assert all(isinstance(p, PromptProgress) and p.total == 3000 for p in progress)
    processed = [p.processed for p in progress]
    assert processed[0] == 0
    assert processed[-1] == 3000
    assert processed == sorted(processed)
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert events.index(progress[-1]) < first_text  # a progress chunk is not the first token
    stats = events[-1].stats
    assert stats.prompt_s is not None
    assert stats.prompt_tokens_per_s is not None
    assert events[-1].server_stats.prompt_s == stats.prompt_s  # llama.cpp's own timings


async def test_llamacpp_a_prompt_over_the_context_is_refused_before_it_is_sent(
    llamacpp: Any,
) -> None:
    async with LMStudioClient(llamacpp.base_url) as client:
        with pytest.raises(PromptTooLong) as info:
            await client.stream_chat("z" * 20000, model="any").collect()
    error = info.value
    assert (error.prompt_tokens, error.context_length, error.status) == (5000, 4096, 0)
    assert "5,000 tokens" in str(error)
    assert "4,096-token context" in str(error)
    assert "not sent" in str(error)
    assert not llamacpp.chats(), "nothing was sent for completion"


async def test_llamacpp_the_context_check_can_be_switched_off(llamacpp: Any) -> None:
    async with LMStudioClient(llamacpp.base_url, check_context=False) as client:
        with pytest.raises(PromptTooLong) as info:
            await client.stream_chat("z" * 20000, model="any").collect()
    error = info.value
    assert error.status == 400  # the server's own refusal, with its own numbers
    assert (error.prompt_tokens, error.context_length) == (5000, 4096)
    assert "(5,000 tokens)" in str(error)
    assert "context window of 4,096 tokens" in str(error)
    assert [r.path for r in llamacpp.chats()] == ["/v1/chat/completions"]


async def test_llamacpp_a_prompt_that_fills_the_context_exactly_is_refused_too(
    llamacpp: Any,
) -> None:
    """llama.cpp refuses it as well: nothing would be left for the answer."""
    async with LMStudioClient(llamacpp.base_url) as client:
        with pytest.raises(PromptTooLong) as info:
            await client.stream_chat("z" * (4096 * 4), model="any").collect()
        fits = await client.stream_chat("z" * (4095 * 4), model="any", max_tokens=1).collect()
    assert info.value.prompt_tokens == 4096
    assert fits.stats.prompt_tokens == 4095


async def test_an_empty_stream_from_llama_cpp_python_names_the_likely_cause() -> None:
    """That server answers a streamed prompt over its context with 200 and no events at all."""
    defaults = simulator.Scenario(dialect="llamacpp-python")
    retries = Retries(attempts=1, backoff=0.05, max_backoff=0.05)
    with simulator.serve(profile="test-fast", defaults=defaults, context_length=1000) as server:
        async with LMStudioClient(server.base_url, retries=retries) as client:
            info = await client.server_info()
            with pytest.raises(StreamInterrupted) as failed:
                await client.stream_chat("e" * 8000, model=MODEL).collect()
            ok = await client.stream_chat("Short.", model=MODEL, max_tokens=3).collect()
    assert info.kind == "openai"  # it says neither what it is nor its context
    message = str(failed.value)
    assert "llama-cpp-python" in message
    assert "2,000 tokens" in message
    assert "check that the server is still running" not in message
    assert ok.stats.completion_tokens == 3


async def test_an_empty_stream_elsewhere_keeps_the_general_sentence() -> None:
    defaults = simulator.Scenario(raw_body="")
    retries = Retries(attempts=1, backoff=0.05, max_backoff=0.05)
    with simulator.serve(profile="test-fast", defaults=defaults) as server:
        async with LMStudioClient(server.base_url, retries=retries) as client:
            with pytest.raises(StreamInterrupted) as failed:
                await client.stream_chat("Hi", model=MODEL).collect()
    assert "ended before the first token" in str(failed.value)
    assert "check that the server is still running" in str(failed.value)


def test_only_rising_progress_or_the_next_phase_gains_time() -> None:
    """A server that sends falling fractions, or goes back to loading, cannot hold a stream
    open for ever: such readings are shown but do not move the deadline."""
    from lmstream_nb._client import _ProgressClock
    from lmstream_nb._sse import Reading

    clock = _ProgressClock()
    steps = [
        (Reading("loading", 0.0), True),
        (Reading("loading", 0.5), True),
        (Reading("loading", 0.5), False),  # no change
        (Reading("prompt", 0.1), True),
        (Reading("prompt", 0.05), False),  # falling
        (Reading("prompt", 0.2), True),
        (Reading("loading", 0.9), False),  # back to an earlier phase
    ]
    advanced = [clock.take(reading, float(i), 0.0)[0] for i, (reading, _) in enumerate(steps)]
    assert advanced == [expected for _, expected in steps]
    assert clock.where() == "model loading stopped at 90%"


@pytest.mark.parametrize("line_ending", ["lf", "crlf", "cr"])
@pytest.mark.parametrize("bom", [False, True])
async def test_the_native_stream_follows_the_sse_rules(line_ending: str, bom: bool) -> None:
    defaults = simulator.Scenario(line_ending=line_ending, bom=bom, output_tokens=12)
    plain_defaults = simulator.Scenario(output_tokens=12)
    with simulator.serve(profile="test-fast", seed=3, defaults=plain_defaults) as plain:
        async with LMStudioClient(plain.base_url) as client:
            expected = await client.stream_chat("Same words", model=MODEL).collect()
    with simulator.serve(profile="test-fast", seed=3, defaults=defaults) as sim:
        async with LMStudioClient(sim.base_url) as client:
            stream = client.stream_chat("Same words", model=MODEL)
            events = await drain(stream)
    assert stream.api == "native"
    assert stream.text == expected.text
    assert progress_of(events), "progress events survive every framing"
    assert events[-1].stats.completion_tokens == 12
