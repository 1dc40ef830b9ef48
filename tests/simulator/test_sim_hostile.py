"""Hostile scenarios, read with plain httpx: each does what it says, and each ends by itself."""

from __future__ import annotations

import time
import zlib

import httpx
import pytest
from sim_helpers import chat_body, parse_sse

from lmstream_nb import simulator
from lmstream_nb.simulator._scenario import ScenarioError, apply_overrides

MiB = 1 << 20


def _since(started: float):
    return lambda record: record.started_at >= started and record.outcome != "running"


def test_write_events_puts_text_and_the_fault_in_one_write(sim, client):
    body = chat_body(
        stream=True, sim={"time_scale": 0, "write_events": 100, "output_tokens": 5, "error_at": 3}
    )
    with client.stream("POST", sim.base_url + "/chat/completions", json=body) as response:
        reads = [piece for piece in response.iter_raw() if piece]
    assert len(reads) == 1
    events, _ = parse_sse(reads[0])
    assert [e.event for e in events] == [None, None, None, "error"]


def test_write_events_never_holds_text_back_across_a_pause(sim, client):
    """Events are written before each pause, so a slow stream still arrives as it is made."""
    body = chat_body(
        stream=True, sim={"write_events": 100, "output_tokens": 4, "gen_tps": 20, "jitter": 0}
    )
    with client.stream("POST", sim.base_url + "/chat/completions", json=body) as response:
        reads = [piece for piece in response.iter_raw() if piece]
    assert len(reads) >= 4


def test_malformed_data_is_sent_as_given(sim, client):
    body = chat_body(
        stream=True,
        sim={"output_tokens": 3, "malformed_at": 1, "malformed_data": '{"choices": "x"}'},
    )
    response = client.post(sim.base_url + "/chat/completions", json=body)
    events, _ = parse_sse(response.content)
    assert events[1].data == '{"choices": "x"}'


@pytest.mark.parametrize("stream", [True, False])
def test_raw_body_is_the_whole_answer(sim, client, stream):
    raw = 'data: {"anything": 1}\n\nevent: error\ndata: x\n\n' if stream else '{"any": "thing"}'
    response = client.post(
        sim.base_url + "/chat/completions", json=chat_body(stream=stream, sim={"raw_body": raw})
    )
    assert response.status_code == 200
    assert response.text == raw
    expected = "text/event-stream" if stream else "application/json"
    assert response.headers["content-type"].startswith(expected)


@pytest.mark.parametrize(("flood", "stream"), [("line", True), ("data", True), ("line", False)])
def test_a_flood_sends_flood_bytes_then_ends(sim, client, flood, stream):
    body = chat_body(stream=stream, sim={"flood": flood, "flood_bytes": 2 * MiB})
    response = client.post(sim.base_url + "/chat/completions", json=body)
    content = response.content
    assert 2 * MiB - 70_000 <= len(content) <= 2 * MiB + 70_000
    if flood == "line":
        assert b"\n" not in content
        assert content.startswith(b'data: {"choices"' if stream else b'{"choices"')
    else:
        assert b"\n\n" not in content
        assert content.count(b"\ndata: ") > 1000


def test_a_gzip_bomb_is_small_on_the_wire_and_large_inflated(sim):
    body = chat_body(stream=True, sim={"flood": "gzip", "flood_bytes": 32 * MiB})
    headers = {"Accept-Encoding": "identity"}
    with (
        httpx.Client(timeout=30) as raw_client,
        raw_client.stream(
            "POST", sim.base_url + "/chat/completions", json=body, headers=headers
        ) as response,
    ):
        assert response.headers["content-encoding"] == "gzip"
        wire = b"".join(response.iter_raw())
    assert len(wire) < 64 * 1024
    inflated = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(wire, 64)
    assert inflated.startswith(b'data: {"choices"')


def test_a_client_leaving_stops_the_flood(sim, client):
    started = time.monotonic()
    body = chat_body(stream=True, sim={"flood": "line", "flood_bytes": 1 << 40})
    with client.stream("POST", sim.base_url + "/chat/completions", json=body) as response:
        for _ in response.iter_raw():
            break
    record = sim.wait_for(_since(started), timeout=10)
    assert record.outcome == "client_disconnected"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 200])
def test_redirect_to_answers_a_redirect(sim, client, status):
    body = chat_body(sim={"redirect_to": "http://elsewhere.test/v1", "http_status": status})
    response = client.post(sim.base_url + "/chat/completions", json=body)
    assert response.status_code == (status if status != 200 else 307)
    assert response.headers["location"] == "http://elsewhere.test/v1"


def test_server_wide_redirect_and_flood_apply_to_the_model_lists(client):
    moved = simulator.Scenario(redirect_to="http://elsewhere.test/v1/models")
    with simulator.serve(profile="test-fast", defaults=moved) as server:
        root = server.base_url.removesuffix("/v1")
        for url in (root + "/v1/models", root + "/api/v0/models"):
            response = client.get(url)
            assert response.status_code == 307
    flooded = simulator.Scenario(flood="line", flood_bytes=MiB)
    with simulator.serve(profile="test-fast", defaults=flooded) as server:
        response = client.get(server.base_url + "/models")
        assert len(response.content) >= MiB - 70_000


def test_echo_request_repeats_the_credentials_and_url(sim, client):
    body = chat_body(sim={"http_status": 400, "echo_request": True})
    response = client.post(
        sim.base_url + "/chat/completions?key=q1",
        json=body,
        headers={"Authorization": "Bearer sk-echo"},
    )
    message = response.json()["error"]["message"]
    assert "Authorization: Bearer sk-echo" in message
    assert "/v1/chat/completions?key=q1" in message


def test_records_carry_the_auth_scheme_and_the_query(sim, client):
    client.get(sim.base_url + "/models?x=1", headers={"Authorization": "Basic Zm9vOmJhcg=="})
    client.get(sim.base_url + "/models")
    first, second = sim.records()[-2:]
    assert (first.auth, first.query) == ("Basic", "x=1")
    assert (second.auth, second.query) == (None, "")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"flood": "lots"}, "flood must be one of line, data, gzip"),
        ({"flood_bytes": 0}, "flood_bytes must be an integer >= 1"),
        ({"write_events": 0}, "write_events must be an integer >= 1"),
        ({"echo_request": 1}, "echo_request must be true or false"),
        ({"raw_body": 5}, "raw_body must be a string or null"),
        ({"redirect_to": []}, "redirect_to must be a string or null"),
    ],
)
def test_hostile_fields_are_validated(fields, message):
    with pytest.raises(ScenarioError, match=message):
        apply_overrides(simulator.Scenario(), fields)
