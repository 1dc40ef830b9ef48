"""The client against hostile or odd servers, over loopback HTTP to the simulator.

Text before an error is never lost, every chunk shape is checked, memory is bounded by the
text and not by the server, redirects are reported and never followed, and the client's
secrets never reach a message, an attribute or a record.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmstream_nb import (
    AuthenticationError,
    HTTPStatusError,
    LMStreamError,
    LMStudioClient,
    Prompt,
    PromptStore,
    ProtocolError,
    RedirectNotFollowed,
    ServerStreamError,
    StreamFinished,
    TextDelta,
    arun,
    simulator,
)
from lmstream_nb._client import ChatStream

pytestmark = pytest.mark.anyio

MODEL = "lmstream-sim-8b"
KiB = 1024
MiB = 1024 * KiB
# No delays at all, and the whole stream in one network write: text, fault and end together.
ONE_WRITE: dict[str, Any] = {"time_scale": 0, "write_events": 1000, "output_tokens": 6}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PromptStore]:
    with PromptStore(tmp_path / "runs.db") as s:
        yield s


async def consume(stream: ChatStream) -> list[str]:
    """Read a stream that must fail; return the texts the loop saw before the error."""
    seen: list[str] = []
    async with stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                seen.append(event.content)
    raise AssertionError(f"the stream ended without an error after {seen!r}")


async def request(client: LMStudioClient, call: str, scenario: dict[str, Any]) -> None:
    """One request of the given kind that must fail: a stream read to its end, or complete()."""
    if call == "stream":
        await consume(client.stream_chat("Hi", model=MODEL, sim=scenario))
    else:
        await client.complete("Hi", model=MODEL, sim=scenario)


async def failing(stream: ChatStream) -> tuple[LMStreamError, list[str]]:
    seen: list[str] = []
    try:
        async with stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    seen.append(event.content)
    except LMStreamError as exc:
        return exc, seen
    raise AssertionError(f"the stream ended without an error after {seen!r}")


# -- text before an error is never lost ------------------------------------------------------

FAULTS_AFTER_FOUR_TOKENS = {
    "event: error frame": ({"error_at": 4}, ServerStreamError),
    "error key in a data line": (
        {"malformed_at": 4, "malformed_data": '{"error": {"message": "out of memory"}}'},
        ServerStreamError,
    ),
    "data line that is not JSON": ({"malformed_at": 4}, ProtocolError),
    "chunk of the wrong shape": (
        {"malformed_at": 4, "malformed_data": '{"choices": [{"delta": {"content": 7}}]}'},
        ProtocolError,
    ),
}


def test_the_simulator_sends_text_and_fault_in_one_write(sim: simulator.SimServer) -> None:
    """The premise of the next tests: with write_events the text and the error are one read."""
    import httpx

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "sim": {**ONE_WRITE, "error_at": 4},
    }
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", sim.base_url + "/chat/completions", json=body) as response,
    ):
        reads = [part for part in response.iter_raw() if part]
    assert len(reads) == 1, [len(r) for r in reads]
    assert reads[0].count(b'"content"') == 4
    assert b"event: error" in reads[0]


@pytest.mark.parametrize("fault", FAULTS_AFTER_FOUR_TOKENS, ids=list(FAULTS_AFTER_FOUR_TOKENS))
async def test_text_in_the_same_read_as_an_error_reaches_the_loop_first(
    sim: simulator.SimServer, fault: str
) -> None:
    scenario, error = FAULTS_AFTER_FOUR_TOKENS[fault]
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Hi", model=MODEL, sim={**ONE_WRITE, **scenario})
        exc, seen = await failing(stream)
    assert isinstance(exc, error), exc
    assert len(seen) == 4
    assert "".join(seen) == exc.partial_text == stream.text  # type: ignore[attr-defined]
    assert stream.stats().ttft_s is not None, "the first token came in that read"


@pytest.mark.parametrize("fault", FAULTS_AFTER_FOUR_TOKENS, ids=list(FAULTS_AFTER_FOUR_TOKENS))
async def test_through_arun_on_event_sees_the_text_and_the_run_records_it(
    sim: simulator.SimServer, store: PromptStore, fault: str
) -> None:
    scenario, error = FAULTS_AFTER_FOUR_TOKENS[fault]
    seen: list[str] = []

    def on_event(event: object) -> None:
        if isinstance(event, TextDelta):
            seen.append(event.content)

    with pytest.raises(error) as info:
        await arun(
            Prompt("Tell me"),
            store=store,
            base_url=sim.base_url,
            model=MODEL,
            on_event=on_event,
            sim={**ONE_WRITE, **scenario},
        )
    run_id = info.value.run_id
    assert run_id is not None
    record = store.get_run(run_id)
    assert len(seen) == 4
    assert record.text == "".join(seen) == info.value.partial_text  # type: ignore[attr-defined]
    assert record.status == "error"
    assert record.error == str(info.value)
    assert record.ttft_s is not None, "the first-token time comes from that text"


async def test_a_first_token_in_the_failing_read_sets_the_first_token_time(
    sim: simulator.SimServer,
) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat("Hi", model=MODEL, sim={**ONE_WRITE, "error_at": 1})
        exc, seen = await failing(stream)
    assert isinstance(exc, ServerStreamError)
    assert len(seen) == 1
    ttft = stream.stats().ttft_s
    assert ttft is not None
    assert ttft <= stream.stats().duration_s


# -- every chunk shape is checked ------------------------------------------------------------

BAD_CHUNKS = [
    ('{"choices": "x"}', "choices is a string, not an array"),
    ('{"choices": {}}', "choices is an object, not an array"),
    ('{"choices": 0}', "choices is a number, not an array"),
    ('{"choices": [7]}', "choices[0] is a number, not an object"),
    ('{"choices": [null]}', "choices[0] is null, not an object"),
    ('{"choices": [{"delta": "hi"}]}', "choices[0].delta is a string, not an object or null"),
    ('{"choices": [{"delta": []}]}', "choices[0].delta is an array"),
    ('{"choices": [{"delta": {"content": 5}}]}', "choices[0].delta.content is a number"),
    ('{"choices": [{"delta": {"content": false}}]}', "choices[0].delta.content is a boolean"),
    ('{"choices": [{"delta": {"content": ["a"]}}]}', "choices[0].delta.content is an array"),
    ('{"choices": [{"delta": {"content": {}}}]}', "choices[0].delta.content is an object"),
    (
        '{"choices": [{"delta": {"reasoning_content": {}}}]}',
        "choices[0].delta.reasoning_content is an object",
    ),
    ('{"choices": [{"delta": {"reasoning": 1}}]}', "choices[0].delta.reasoning is a number"),
    ('{"choices": [{"delta": {"tool_calls": "x"}}]}', "choices[0].delta.tool_calls is a string"),
    (
        '{"choices": [{"delta": {"role": "assistant", "content": "a", "tool_calls": {}}}]}',
        "choices[0].delta.tool_calls is an object",
    ),
    ('{"choices": [{"delta": {}, "finish_reason": 3}]}', "choices[0].finish_reason is a number"),
    ('{"choices": [{"delta": {}, "finish_reason": ["stop"]}]}', "finish_reason is an array"),
    ('{"choices": [], "usage": [1]}', "usage is an array, not an object or null"),
    ('{"choices": [], "usage": "many"}', "usage is a string"),
    ('{"choices": [], "usage": {"completion_tokens": "7"}}', "usage.completion_tokens is a string"),
    ('{"choices": [], "usage": {"prompt_tokens": true}}', "usage.prompt_tokens is a boolean"),
    ('{"choices": [], "usage": {"total_tokens": 1.5}}', "usage.total_tokens is a number"),
    ('{"choices": [], "usage": {"completion_tokens": 1}, "timings": "fast"}', "timings is a str"),
    ('{"id": 5, "choices": []}', "id is a number, not a string or null"),
    ('{"model": ["m"], "choices": []}', "model is an array, not a string or null"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than any chat server sends"),
    ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested deeper than any chat server sends"),
]


@pytest.mark.parametrize(("data", "what"), BAD_CHUNKS, ids=[w for _, w in BAD_CHUNKS])
async def test_a_chunk_of_the_wrong_shape_is_a_protocol_error_naming_it(
    sim: simulator.SimServer, data: str, what: str
) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat(
            "Hi", model=MODEL, sim={"malformed_at": 0, "malformed_data": data}
        )
        with pytest.raises(ProtocolError) as info:
            await consume(stream)
    assert what in str(info.value)
    assert str(info.value).endswith("check that the base URL points at an OpenAI-compatible API.")
    assert info.value.line == (data if len(data) <= 200 else data[:200] + "…")


# Fields read in every chunk (id and model are read in the first one only).
EVERY_CHUNK = [(d, w) for d, w in BAD_CHUNKS if not d.startswith(('{"id"', '{"model"'))][::2]


@pytest.mark.parametrize(("data", "what"), EVERY_CHUNK, ids=[w for _, w in EVERY_CHUNK])
async def test_a_run_meeting_a_bad_chunk_is_recorded_as_an_error_never_unfinished(
    sim: simulator.SimServer, store: PromptStore, data: str, what: str
) -> None:
    result = await arun(
        Prompt("Hi"),
        store=store,
        base_url=sim.base_url,
        model=MODEL,
        raise_errors=False,
        sim={"output_tokens": 5, "malformed_at": 2, "malformed_data": data},
    )
    record = store.get_run(result.run_id)
    assert record.status == result.status == "error"
    assert record.error is not None
    assert what in record.error
    assert record.text == result.text
    assert len(record.text) > 0, "the two tokens before it are kept"


BAD_COMPLETIONS = [
    ('{"choices": "x"}', "choices is a string, not an array"),
    ('{"choices": [1]}', "choices[0] is a number, not an object"),
    ('{"choices": [{"message": "hi"}]}', "choices[0].message is a string, not an object or null"),
    ('{"choices": [{"message": {"content": 1}}]}', "choices[0].message.content is a number"),
    (
        '{"choices": [{"message": {"reasoning_content": []}}]}',
        "choices[0].message.reasoning_content is an array",
    ),
    ('{"choices": [{"message": {"tool_calls": 1}}]}', "choices[0].message.tool_calls is a number"),
    (
        '{"choices": [{"message": {"content": "a"}, "finish_reason": {}}]}',
        "choices[0].finish_reason is an object",
    ),
    ('{"choices": [], "usage": "none"}', "usage is a string"),
    ('{"choices": [], "usage": {"completion_tokens": -1}}', "usage.completion_tokens is a number"),
    ('{"id": 1, "choices": []}', "id is a number"),
    ('{"model": false, "choices": []}', "model is a boolean"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than any chat server sends"),
    ('"just a string"', "an answer that is not valid JSON"),
]


@pytest.mark.parametrize(("data", "what"), BAD_COMPLETIONS, ids=[w for _, w in BAD_COMPLETIONS])
async def test_a_whole_completion_of_the_wrong_shape_is_a_protocol_error(
    sim: simulator.SimServer, data: str, what: str
) -> None:
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(ProtocolError) as info:
            await client.complete("Hi", model=MODEL, sim={"raw_body": data})
    assert what in str(info.value)


# Completions with a "choices" array (without one the body is not taken for a completion).
WHOLE = BAD_COMPLETIONS[1:7]


@pytest.mark.parametrize(("data", "what"), WHOLE, ids=[w for _, w in WHOLE])
async def test_a_server_ignoring_stream_true_with_a_bad_completion(
    sim: simulator.SimServer, data: str, what: str
) -> None:
    async with LMStudioClient(sim.base_url) as client:
        stream = client.stream_chat(
            "Hi", model=MODEL, sim={"raw_body": data, "content_type": "application/json"}
        )
        with pytest.raises(ProtocolError) as info:
            await consume(stream)
    assert what in str(info.value)


# -- memory is bounded by the text, not by the server ----------------------------------------


async def test_an_endless_line_stops_at_the_line_limit(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url, max_event_bytes=256 * KiB) as client:
        stream = client.stream_chat(
            "Hi", model=MODEL, sim={"flood": "line", "flood_bytes": 8 * MiB}
        )
        with pytest.raises(ProtocolError) as info:
            await consume(stream)
    message = str(info.value)
    assert "an SSE line longer than the limit of 256 KiB (max_event_bytes)" in message
    assert info.value.line.startswith('data: {"choices"')
    assert len(info.value.line) <= 201


async def test_endless_data_lines_stop_at_the_event_limit(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url, max_event_bytes=256 * KiB) as client:
        stream = client.stream_chat(
            "Hi", model=MODEL, sim={"flood": "data", "flood_bytes": 8 * MiB}
        )
        with pytest.raises(ProtocolError) as info:
            await consume(stream)
    assert "an SSE event longer than the limit of 256 KiB (max_event_bytes)" in str(info.value)


async def test_the_default_limit_is_16_mib(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        assert client.max_event_bytes == 16 * MiB
        stream = client.stream_chat(
            "Hi", model=MODEL, sim={"flood": "line", "flood_bytes": 24 * MiB}
        )
        with pytest.raises(ProtocolError) as info:
            await consume(stream)
    assert "limit of 16 MiB" in str(info.value)


async def test_the_limit_is_per_event_not_per_answer(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url, max_event_bytes=256 * KiB) as client:
        stream = client.stream_chat(
            "Hi", model=MODEL, sim={"chunk_chars": 128 * KiB, "output_tokens": 16, "jitter": 0}
        )
        async with stream:
            events = [event async for event in stream]
    assert isinstance(events[-1], StreamFinished)
    assert len(stream.text) == 2 * MiB


async def test_text_before_an_oversized_event_is_kept(sim: simulator.SimServer) -> None:
    big = "x" * (300 * KiB)
    data = '{"choices": [{"delta": {"content": "' + big + '"}}]}'
    async with LMStudioClient(sim.base_url, max_event_bytes=256 * KiB) as client:
        stream = client.stream_chat(
            "Hi", model=MODEL, sim={"output_tokens": 6, "malformed_at": 3, "malformed_data": data}
        )
        exc, seen = await failing(stream)
    assert isinstance(exc, ProtocolError)
    assert "longer than the limit" in str(exc)
    assert len(seen) == 3
    assert exc.partial_text == "".join(seen)


@pytest.mark.parametrize("call", ["stream", "complete"])
async def test_a_gzip_bomb_is_refused_without_reading_it(
    sim: simulator.SimServer, call: str
) -> None:
    scenario = {"flood": "gzip", "flood_bytes": 64 * MiB}
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(ProtocolError) as info:
            await request(client, call, scenario)
    assert "compressed answer (Content-Encoding: gzip)" in str(info.value)
    assert str(info.value).endswith(
        "turn compression off in the server or the proxy in front of it."
    )


async def test_a_blocking_answer_is_bounded(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url, max_event_bytes=256 * KiB) as client:
        with pytest.raises(ProtocolError) as info:
            await client.complete("Hi", model=MODEL, sim={"flood": "line", "flood_bytes": 8 * MiB})
    assert "larger than the limit of 256 KiB (max_event_bytes)" in str(info.value)


@pytest.mark.parametrize("flood", ["line", "gzip"])
async def test_the_model_list_is_bounded(flood: str) -> None:
    defaults = simulator.Scenario(flood=flood, flood_bytes=8 * MiB)
    with simulator.serve(profile="test-fast", defaults=defaults) as hostile:
        async with LMStudioClient(hostile.base_url, max_event_bytes=256 * KiB) as client:
            with pytest.raises(ProtocolError) as info:
                await client.list_models()
    assert ("larger than the limit" if flood == "line" else "compressed answer") in str(info.value)


@pytest.mark.parametrize("call", ["stream", "complete"])
async def test_an_endless_error_body_is_read_only_as_far_as_a_message_needs(
    sim: simulator.SimServer, call: str
) -> None:
    scenario = {"http_status": 500, "flood": "line", "flood_bytes": 64 * MiB}
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(HTTPStatusError) as info:
            await request(client, call, scenario)
    assert info.value.status == 500
    assert len(str(info.value)) < 600
    assert (info.value.server_message or "").startswith(
        'data: {"choices"' if call == "stream" else '{"choices"'
    )
    assert len(info.value.server_message or "") <= 1 * MiB + 1


# -- redirects are reported and never followed -----------------------------------------------

REDIRECTS = (301, 302, 303, 307, 308)


@pytest.fixture(scope="module")
def target() -> Iterator[simulator.SimServer]:
    """Where the redirects point: a server that would accept the key, and must never see it."""
    with simulator.serve(profile="test-fast", api_key="sk-never-leaves-1234") as server:
        yield server


@pytest.mark.parametrize("status", REDIRECTS)
@pytest.mark.parametrize("call", ["stream", "complete"])
async def test_a_redirect_is_reported_with_status_and_location_never_followed(
    sim: simulator.SimServer, target: simulator.SimServer, status: int, call: str
) -> None:
    location = target.base_url + "/chat/completions"
    scenario = {"http_status": status, "redirect_to": location}
    before = len(target.records())
    async with LMStudioClient(sim.base_url, api_key="sk-never-leaves-1234") as client:
        with pytest.raises(RedirectNotFollowed) as info:
            await request(client, call, scenario)
    exc = info.value
    assert exc.status == status
    assert exc.location == location
    message = str(exc)
    assert f"answered HTTP {status}, a redirect to {location}" in message
    assert f"set the base URL to {target.base_url} and run again." in message
    assert "before the first token" not in message
    assert len(target.records()) == before, "the redirect was followed"


@pytest.mark.parametrize("status", REDIRECTS)
async def test_a_redirect_of_the_model_list(target: simulator.SimServer, status: int) -> None:
    defaults = simulator.Scenario(http_status=status, redirect_to=target.base_url + "/models")
    before = len(target.records())
    with simulator.serve(profile="test-fast", defaults=defaults) as moved:
        async with LMStudioClient(moved.base_url, api_key="sk-never-leaves-1234") as client:
            with pytest.raises(RedirectNotFollowed) as info:
                await client.list_models()
    assert info.value.status == status
    assert f"set the base URL to {target.base_url} and run again." in str(info.value)
    assert len(target.records()) == before


async def test_a_relative_redirect_and_one_with_credentials(sim: simulator.SimServer) -> None:
    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(RedirectNotFollowed) as relative:
            await client.complete("Hi", model=MODEL, sim={"redirect_to": "/v2/chat/completions"})
        with pytest.raises(RedirectNotFollowed) as secret:
            await client.complete(
                "Hi",
                model=MODEL,
                sim={"redirect_to": "http://bob:hunter22@elsewhere.test:8/v1/models?sig=abcdef"},
            )
    assert relative.value.location == sim.base_url.removesuffix("/v1") + "/v2/chat/completions"
    assert "hunter22" not in str(secret.value)
    assert "abcdef" not in str(secret.value)
    assert secret.value.location == "http://elsewhere.test:8/v1/models?sig=***"


# -- secrets ---------------------------------------------------------------------------------

KEY = "sk-the-real-key-5678"


@pytest.fixture(scope="module")
def locked() -> Iterator[simulator.SimServer]:
    with simulator.serve(profile="test-fast", api_key=KEY) as server:
        yield server


def with_userinfo(base_url: str, userinfo: str) -> str:
    return base_url.replace("http://", f"http://{userinfo}@", 1)


async def test_the_api_key_is_sent_even_with_credentials_in_the_url(
    locked: simulator.SimServer,
) -> None:
    url = with_userinfo(locked.base_url, "alice:wonderland")
    async with LMStudioClient(url, api_key=KEY) as client:
        assert await client.list_models()
        completion = await client.stream_chat("Hi", model=MODEL, max_tokens=3).collect()
    assert completion.text
    assert {r.auth for r in locked.records()[-2:]} == {"Bearer"}


async def test_userinfo_is_basic_auth_only_without_an_api_key(locked: simulator.SimServer) -> None:
    url = with_userinfo(locked.base_url, "alice:wonderland")
    async with LMStudioClient(url) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.list_models()
    assert locked.records()[-1].auth == "Basic"
    assert "wonderland" not in str(info.value)
    assert "alice" not in str(info.value)


async def test_the_query_string_goes_with_every_request(sim: simulator.SimServer) -> None:
    url = sim.base_url + "?api-version=2024-06-01&key=q-secret-9876"
    async with LMStudioClient(url) as client:
        assert client.url == sim.base_url + "?api-version=***&key=***"
        assert "q-secret" not in repr(client)
        await client.list_models()
        await client.stream_chat("Hi", model=MODEL, max_tokens=2).collect()
        await client.complete("Hi", model=MODEL, max_tokens=2)
    records = sim.records()[-4:]
    assert [r.path for r in records] == [
        "/v1/models",
        "/api/v1/models",  # the probe for LM Studio's native API, once per client
        "/api/v1/chat",
        "/v1/chat/completions",
    ]
    assert {r.query for r in records} == {"api-version=2024-06-01&key=q-secret-9876"}


ECHOES = {
    "error status": {"http_status": 400},
    "in-stream error": {"output_tokens": 4, "error_at": 2},
    "offending line": {"output_tokens": 4, "malformed_at": 2},
    "not an event stream": {"content_type": "text/plain"},
}


@pytest.mark.parametrize("echo", ECHOES, ids=list(ECHOES))
async def test_text_a_server_echoes_back_is_scrubbed_of_our_secrets(
    sim: simulator.SimServer, store: PromptStore, echo: str
) -> None:
    url = with_userinfo(sim.base_url, "carol:pa55word-xyz") + "?token=tok-abcdef-123"
    scenario = {**ECHOES[echo], "echo_request": True}
    async with LMStudioClient(url, api_key=KEY) as client:
        with pytest.raises(LMStreamError) as info:
            await arun(Prompt("Hi"), store=store, client=client, model=MODEL, sim=scenario)
    exc = info.value
    assert "Authorization: Bearer ***" in str(exc), "the server did echo the request"
    record = store.get_run(exc.run_id or 0)
    shown = [
        str(exc),
        repr(exc),
        *(str(v) for v in vars(exc).values()),
        record.error or "",
        record.base_url,
    ]
    for secret in (KEY, "pa55word-xyz", "carol", "tok-abcdef-123"):
        assert not any(secret in text for text in shown), secret


async def test_a_basic_token_echoed_back_is_scrubbed_too(sim: simulator.SimServer) -> None:
    url = with_userinfo(sim.base_url, "dave:correct-horse")
    token = base64.b64encode(b"dave:correct-horse").decode()
    async with LMStudioClient(url) as client:
        with pytest.raises(HTTPStatusError) as info:
            await client.complete("Hi", model=MODEL, sim={"http_status": 418, "echo_request": True})
    assert "Authorization: Basic ***" in str(info.value)
    assert token not in str(info.value)
    assert token not in (info.value.server_message or "")
