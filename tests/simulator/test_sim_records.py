"""Request records: client disconnects are seen, generation stops, waits are bounded."""

from __future__ import annotations

import time

import httpx
import pytest
from sim_helpers import chat_body


def test_client_closing_mid_generation_stops_generation(sim, client):
    body = chat_body(stream=True, sim={"output_tokens": 2000, "gen_tps": 200})
    with client.stream("POST", sim.base_url + "/chat/completions", json=body) as response:
        lines = response.iter_lines()
        rid = None
        for _ in range(10):
            line = next(lines)
            if line.startswith("data: {"):
                rid = line.split('"id":"', 1)[1].split('"', 1)[0]
        closed_at = time.monotonic()
    # leaving the block closed the response mid-stream

    record = sim.wait_for(lambda r: r.id == rid and r.outcome != "running", timeout=5)
    assert record.outcome == "client_disconnected"
    assert record.disconnect_phase == "generation"
    assert record.ended_at is not None
    assert record.ended_at >= closed_at
    assert record.planned_tokens == 2000
    assert 5 <= record.sent_tokens < 100
    with pytest.raises(TimeoutError):  # and it does not grow any more
        sim.wait_for(lambda r: r.id == rid and r.sent_tokens > record.sent_tokens, timeout=0.3)


def test_client_closing_during_prompt_processing(sim, client):
    started = time.monotonic()
    # 25000 prompt tokens at 5000 tok/s: 5 s of silence before the first token
    body = chat_body("z" * 100_000, stream=True, sim={"output_tokens": 5})
    with client.stream("POST", sim.base_url + "/chat/completions", json=body) as response:
        assert response.status_code == 200  # headers arrive at once, then nothing

    record = sim.wait_for(lambda r: r.started_at >= started and r.outcome != "running", timeout=2)
    assert record.outcome == "client_disconnected"
    assert record.disconnect_phase == "prefill"
    assert record.sent_tokens == 0
    assert record.prompt_tokens == 25000


def test_client_giving_up_on_non_streaming_request(sim):
    started = time.monotonic()
    timeout = httpx.Timeout(5.0, read=0.3)
    with httpx.Client(timeout=timeout) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post(
            sim.base_url + "/chat/completions",
            json=chat_body(sim={"output_tokens": 500, "gen_tps": 100}),
        )

    record = sim.wait_for(lambda r: r.started_at >= started and r.outcome != "running", timeout=2)
    assert record.outcome == "client_disconnected"
    assert record.disconnect_phase == "generation"
    assert 10 <= record.sent_tokens < 100


def test_records_are_snapshots_in_arrival_order(sim, client):
    started = time.monotonic()
    client.get(sim.base_url + "/models")
    client.post(sim.base_url + "/chat/completions", json=chat_body(sim={"output_tokens": 3}))
    sim.wait_for(
        lambda r: (
            r.started_at >= started
            and r.path == "/v1/chat/completions"
            and r.outcome == "completed"
        ),
        timeout=5,
    )

    mine = [r for r in sim.records() if r.started_at >= started]
    assert [(r.method, r.path) for r in mine] == [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
    ]
    models, chat = mine
    assert models.id == ""
    assert models.status_code == 200
    assert chat.id.startswith("chatcmpl-")
    assert chat.stream is False
    assert (chat.planned_tokens, chat.sent_tokens) == (3, 3)
    assert chat.ended_at is not None
    assert chat.started_at is not None
    assert chat.ended_at >= chat.started_at
    with pytest.raises(AttributeError):
        chat.outcome = "running"  # type: ignore[misc]


def test_wait_for_times_out_with_a_clear_message(sim):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no request record matched within 0\.2 s"):
        sim.wait_for(lambda r: r.path == "/never", timeout=0.2)
    assert 0.15 <= time.monotonic() - started < 10, "it waits its timeout, then gives up"

    assert 0.15 <= time.monotonic() - started < 1.0


def test_a_record_keeps_the_messages_up_to_a_bound(sim, client):
    from lmstream_nb.simulator._records import MESSAGES_KEPT_CHARS

    short = chat_body("Hi there", sim={"output_tokens": 2})
    long = chat_body("z" * (MESSAGES_KEPT_CHARS + 1), sim={"output_tokens": 2})
    for body in (short, long):
        assert client.post(sim.base_url + "/chat/completions", json=body).status_code == 200
    *_, kept, dropped = [r for r in sim.records() if r.method == "POST"]
    assert kept.messages == (("user", "Hi there"),)
    assert dropped.messages == ()
