"""Faults a client must survive: drops, truncation, error frames, broken lines, odd replies."""

from __future__ import annotations

import time

import httpx
import pytest
from sim_helpers import chat_body, parse_sse, stream


def _read_into(response: httpx.Response, received: bytearray) -> None:
    for piece in response.iter_raw():
        received += piece


def _since(started: float):
    return lambda record: record.started_at >= started and record.outcome != "running"


def test_disconnect_mid_stream_is_a_remote_protocol_error(sim, client):
    started = time.monotonic()
    received = bytearray()
    body = chat_body(stream=True, sim={"output_tokens": 20, "disconnect_at": 3})
    url = sim.base_url + "/chat/completions"
    with (
        client.stream("POST", url, json=body) as response,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        _read_into(response, received)

    events, _ = parse_sse(bytes(received))
    assert len(events) == 3
    record = sim.wait_for(_since(started), timeout=5)
    assert record.outcome == "fault_disconnect"
    assert record.sent_tokens == 3
    assert record.status_code == 200


def test_disconnect_right_after_headers(sim, client):
    body = chat_body(stream=True, sim={"disconnect_at": 0})
    with client.stream("POST", sim.base_url + "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()


def test_disconnect_in_non_streaming_request(sim, client):
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(
            sim.base_url + "/chat/completions",
            json=chat_body(sim={"output_tokens": 10, "disconnect_at": 4}),
        )

    record = sim.wait_for(_since(started), timeout=5)
    assert record.outcome == "fault_disconnect"
    assert record.sent_tokens == 4


def test_end_at_finishes_body_without_finish_chunk_or_done(sim, client):
    started = time.monotonic()
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 10, "end_at": 4}),
    )

    assert result.status == 200
    assert len(result.events) == 4
    assert all(c["choices"][0]["finish_reason"] is None for c in result.chunks)
    assert b"[DONE]" not in result.raw
    assert sim.wait_for(_since(started), timeout=5).outcome == "truncated"


def test_end_at_zero_is_an_empty_stream(sim, client):
    result = stream(client, sim.base_url + "/chat/completions", chat_body(sim={"end_at": 0}))

    assert result.status == 200
    assert result.raw == b""


def test_error_at_sends_error_event_and_no_done(sim, client):
    started = time.monotonic()
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 10, "error_at": 2, "error_message": "Out of memory."}),
    )

    assert len(result.chunks) == 2
    last = result.events[-1]
    assert last.event == "error"
    assert last.json() == {
        "error": {"message": "Out of memory.", "type": "server_error"},
        "message": "Out of memory.",
    }
    assert b"[DONE]" not in result.raw
    record = sim.wait_for(_since(started), timeout=5)
    assert record.outcome == "stream_error"
    assert record.sent_tokens == 2


def test_error_at_default_message(sim, client):
    result = stream(client, sim.base_url + "/chat/completions", chat_body(sim={"error_at": 0}))

    assert result.raw.startswith(b"event: error\ndata: ")
    assert result.events[0].json()["message"] == "Compute error."


def test_error_at_in_non_streaming_request_is_500(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions", json=chat_body(sim={"output_tokens": 5, "error_at": 1})
    )

    assert response.status_code == 500
    assert response.json()["error"]["message"] == "Compute error."


def test_malformed_line_then_stream_continues(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 5, "malformed_at": 2}),
    )

    data_lines = [e.data for e in result.events]
    assert data_lines[2] == '{"id": broken'
    assert data_lines[-1] == "[DONE]"
    assert len(data_lines) == 5 + 1 + 1 + 1  # tokens, broken line, finish, [DONE]


@pytest.mark.parametrize(
    ("error_body", "content_type", "expected"),
    [
        ("string", "application/json; charset=utf-8", b'{"error":"Overloaded."}'),
        (
            "object",
            "application/json; charset=utf-8",
            b'{"error":{"message":"Overloaded.","type":"invalid_request_error",'
            b'"param":null,"code":null}}',
        ),
        ("html", "text/html; charset=utf-8", b"<pre>Overloaded.</pre>"),
        ("empty", None, b""),
    ],
)
def test_http_status_with_each_error_body(sim, client, error_body, content_type, expected):
    scenario = {"http_status": 503, "error_body": error_body, "error_message": "Overloaded."}

    response = client.post(
        sim.base_url + "/chat/completions", json=chat_body(stream=True, sim=scenario)
    )

    assert response.status_code == 503
    assert response.headers.get("content-type") == content_type
    if expected:
        assert expected in response.content
    else:
        assert response.content == b""
    assert response.headers["x-powered-by"] == "Express"


def test_http_status_default_message(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions", json=chat_body(sim={"http_status": 429})
    )

    assert response.status_code == 429
    assert "Too Many Requests" in response.json()["error"]["message"]


def test_content_type_html_instead_of_stream(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions",
        json=chat_body(stream=True, sim={"content_type": "text/html"}),
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html"
    assert response.text.startswith("<!DOCTYPE html>")


def test_content_type_json_instead_of_stream(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions",
        json=chat_body(
            stream=True, sim={"content_type": "application/json", "error_message": "Busy."}
        ),
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["message"] == "Busy."


def test_scenario_marker_in_the_prompt_applies_to_that_request() -> None:
    from lmstream_nb import simulator as sim_mod

    with sim_mod.serve(profile="test-fast") as server:
        body = {
            "model": "lmstream-sim-8b",
            "stream": False,
            "messages": [{"role": "user", "content": 'Go [[sim {"output_tokens": 3}]] now'}],
        }
        reply = httpx.post(server.base_url + "/chat/completions", json=body, timeout=10)
        bad = httpx.post(
            server.base_url + "/chat/completions",
            timeout=10,
            json={**body, "messages": [{"role": "user", "content": "[[sim {nope}]]"}]},
        )
    assert reply.json()["usage"]["completion_tokens"] == 3
    assert bad.status_code == 400
    assert "marker" in bad.text


def test_fault_attempts_makes_a_fault_transient(sim, client):
    """The first request with these messages meets the fault; the retry is answered in full."""
    body = chat_body(stream=True, sim={"output_tokens": 5, "http_status": 503, "fault_attempts": 1})
    body["messages"] = [{"role": "user", "content": "transient fault, unique text 7f3a"}]
    url = sim.base_url + "/chat/completions"
    assert client.post(url, json=body).status_code == 503
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        events, _ = parse_sse(response.read())
    assert events[-1].data == "[DONE]"
    other = dict(body, messages=[{"role": "user", "content": "another prompt, unique 7f3b"}])
    assert client.post(url, json=other).status_code == 503  # counted per message list
