"""The llama.cpp dialect: ``prompt_progress`` chunks on request, and a llama.cpp server's
``/props``, ``/tokenize``, ``/v1/chat/completions/input_tokens`` and context overflow."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sim_helpers import chat_body, stream

from lmstream_nb import simulator


def progress_chunks(chunks: list[dict]) -> list[dict]:
    return [c for c in chunks if "prompt_progress" in c]


def test_prompt_progress_once_per_batch_when_asked(sim, client):
    body = chat_body("p" * 4 * 350, sim={"dialect": "llamacpp", "batch_size": 100})
    asked = stream(client, sim.base_url + "/chat/completions", {**body, "return_progress": True})
    silent = stream(client, sim.base_url + "/chat/completions", body)

    chunks = asked.chunks
    progress = progress_chunks(chunks)
    assert [p["prompt_progress"]["processed"] for p in progress] == [0, 100, 200, 300, 350]
    assert all(
        set(p["prompt_progress"]) == {"total", "cache", "processed", "time_ms"} for p in progress
    )
    assert {p["prompt_progress"]["total"] for p in progress} == {350}
    assert {p["prompt_progress"]["cache"] for p in progress} == {0}
    times = [p["prompt_progress"]["time_ms"] for p in progress]
    assert times == sorted(times)
    assert times[0] == 0
    for p in progress:  # a sign of life, never text
        assert p["choices"][0]["delta"] == {"role": "assistant", "content": None}
        assert p["choices"][0]["finish_reason"] is None
        assert p["object"] == "chat.completion.chunk"
    assert chunks[: len(progress)] == progress  # all of them before the first token
    assert asked.text == silent.text
    assert not progress_chunks(silent.chunks)


def test_the_default_batch_is_llama_cpp_s(sim, client):
    """3,635 tokens, llama-server's default batch of 2048: three progress chunks, as measured."""
    body = chat_body("q" * 4 * 3635, sim={"dialect": "llamacpp", "output_tokens": 2})
    result = stream(client, sim.base_url + "/chat/completions", {**body, "return_progress": True})

    processed = [p["prompt_progress"]["processed"] for p in progress_chunks(result.chunks)]
    assert processed == [0, 2048, 3635]


def test_other_dialects_ignore_return_progress(sim, client):
    body = {**chat_body("r" * 4000, sim={"batch_size": 100}), "return_progress": True}
    result = stream(client, sim.base_url + "/chat/completions", body)

    assert not progress_chunks(result.chunks)


@pytest.fixture(scope="module")
def llama() -> Iterator[simulator.SimServer]:
    defaults = simulator.Scenario(dialect="llamacpp")
    with simulator.serve(
        profile="test-fast", defaults=defaults, parallel=2, context_length=1000
    ) as server:
        yield server


def test_props_tell_the_context_and_the_slots(llama, client):
    response = client.get(llama.root_url + "/props")
    props = response.json()
    slots = client.get(llama.root_url + "/slots").json()

    assert response.headers["server"] == "llama.cpp"
    assert "x-powered-by" not in response.headers
    assert slots == [
        {"id": 0, "n_ctx": 1000, "is_processing": False},
        {"id": 1, "n_ctx": 1000, "is_processing": False},
    ]
    assert props["n_ctx"] == 1000
    assert props["default_generation_settings"]["n_ctx"] == 1000
    assert props["total_slots"] == 2


def test_counting_tokens_before_sending(llama, client):
    tokens = client.post(llama.root_url + "/tokenize", json={"content": "hello world"}).json()
    messages = [{"role": "user", "content": "a" * 400}]
    counted = client.post(
        llama.base_url + "/chat/completions/input_tokens", json={"messages": messages}
    ).json()
    sent = client.post(
        llama.base_url + "/chat/completions", json={"model": "x", "messages": messages}
    ).json()

    assert len(tokens["tokens"]) == 2
    assert all(isinstance(t, int) for t in tokens["tokens"])
    assert counted == {"input_tokens": 100, "object": "response.input_tokens"}
    assert sent["usage"]["prompt_tokens"] == counted["input_tokens"]


def test_bad_token_count_requests(llama, client):
    no_content = client.post(llama.root_url + "/tokenize", json={"text": "x"})
    no_messages = client.post(llama.base_url + "/chat/completions/input_tokens", json={})

    assert no_content.status_code == no_messages.status_code == 400


def test_a_prompt_over_the_context_is_refused_as_llama_cpp_does(llama, client):
    body = {**chat_body("s" * 4 * 1200), "stream": True}
    response = client.post(llama.base_url + "/chat/completions", json=body)

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "error": {
            "code": 400,
            "message": "request (1200 tokens) exceeds the available context size (1000 tokens), "
            "try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 1200,
            "n_ctx": 1000,
        }
    }


def test_an_lm_studio_server_has_no_llama_cpp_extras(sim, client):
    response = client.get(sim.root_url + "/props")

    assert response.status_code == 200  # LM Studio's answer to an unknown path
    assert response.json() == {"error": "Unexpected endpoint or method. (GET /props)"}


def test_slots_show_a_request_being_processed(client):
    defaults = simulator.Scenario(dialect="llamacpp")
    with simulator.serve(profile="test-fast", defaults=defaults, parallel=2) as server:
        body = {**chat_body("t", sim={"stall_at": 1, "stall_s": 60}), "stream": True}
        with client.stream("POST", server.base_url + "/chat/completions", json=body) as response:
            lines = response.iter_lines()  # kept open: closing it closes the stream
            while '"content":"' not in next(lines):
                pass
            busy = client.get(server.root_url + "/slots").json()
        freed = server.wait_for(lambda r: r.outcome == "client_disconnected")

    assert [s["is_processing"] for s in busy] == [True, False]
    assert freed.disconnect_phase == "generation"


def test_llama_cpp_python_answers_an_over_long_stream_with_nothing(client):
    """As measured on ``python -m llama_cpp.server``: 200, an event stream, no event at all;
    it names itself ``uvicorn``, has no native API or /props, and counts tokens."""
    defaults = simulator.Scenario(dialect="llamacpp-python")
    with simulator.serve(profile="test-fast", defaults=defaults, context_length=100) as sim:
        long_body = chat_body("x" * 2000, stream=True)
        with client.stream("POST", sim.base_url + "/chat/completions", json=long_body) as response:
            raw = response.read()
        short = client.post(sim.base_url + "/chat/completions", json=chat_body("Hi"))
        count = client.post(sim.root_url + "/extras/tokenize/count", json={"input": "x" * 400})
        native = client.get(sim.root_url + "/api/v1/models")
        props = client.get(sim.root_url + "/props")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert raw == b""
    assert response.headers["server"] == "uvicorn"
    assert short.json()["choices"][0]["message"]["content"]
    assert count.json() == {"count": 100}
    assert (native.status_code, native.json()) == (404, {"detail": "Not Found"})
    assert props.status_code == 404
