"""Parallel predictions: ``parallel`` slots per model, the queue behind them, and how requests in
the slots share the model's speed (the model in ``simulator._pace``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sim_helpers import TIMEOUT, chat_body, native_body

from lmstream_nb import simulator
from lmstream_nb.simulator._pace import Engine, prompt_steps

# Every held stream sends one token, then pauses for a minute: it keeps its slot until closed.
_HOLD = {"stall_at": 1, "stall_s": 60, "output_tokens": 3}


@contextmanager
def holding(url: str, count: int) -> Iterator[list[threading.Event]]:
    """``count`` streams that each read their first token and then hold their slot until their
    event is set (or the block ends)."""
    leave = [threading.Event() for _ in range(count)]
    errors: list[BaseException] = []

    def hold(i: int) -> None:
        try:
            with (
                httpx.Client(timeout=TIMEOUT) as client,
                client.stream(
                    "POST", url, json={**chat_body(f"hold {i}", sim=_HOLD), "stream": True}
                ) as response,
            ):
                lines = response.iter_lines()  # kept open: closing it closes the stream
                while '"content"' not in next(lines):
                    pass
                leave[i].wait(20)
        except BaseException as exc:  # reported by the test, not lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield leave
    finally:
        for event in leave:
            event.set()
        for thread in threads:
            thread.join(20)
    assert not errors, errors


def generating(records: list[simulator.RequestRecord]) -> int:
    return sum(r.stage == "generation" and r.sent_tokens >= 1 for r in records)


@pytest.mark.parametrize("slots", [4, 1])
def test_requests_beyond_the_slots_wait_for_one(client, slots):
    with simulator.serve(profile="test-fast", parallel=slots) as sim:
        url = sim.base_url + "/chat/completions"
        with holding(url, slots) as leave:
            sim.wait_until(
                lambda rs: generating(rs) == slots, 10, f"{slots} streams never generated at once"
            )
            late: list[httpx.Response] = []
            waiter = threading.Thread(
                target=lambda: late.append(
                    httpx.post(url, json=chat_body("late", sim={"output_tokens": 4}), timeout=20)
                )
            )
            waiter.start()
            queued = sim.wait_until(
                lambda rs: next((r for r in rs if r.stage == "queued"), None),
                10,
                "the extra request was never queued",
            )
            assert queued.sent_tokens == 0
            assert generating(sim.records()) == slots  # the held ones go on meanwhile
            leave[0].set()  # one slot frees up: the queued request gets it
            waiter.join(20)
            answered = sim.wait_for(
                lambda r: r.started_at == queued.started_at and r.outcome != "running", 10
            )
            [freed] = [r for r in sim.records() if r.outcome == "client_disconnected"]

    assert [r.status_code for r in late] == [200]
    assert late[0].json()["usage"]["completion_tokens"] == 4
    assert answered.outcome == "completed"
    assert freed.ended_at is not None
    assert answered.ended_at is not None
    assert answered.ended_at > freed.ended_at


async def _rates(root_url: str, count: int, path: str = "/api/v1/chat") -> list[float]:
    body = native_body("Share.", sim={"gen_tps": 100, "output_tokens": 100, "jitter": 0.0})
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
        replies = await asyncio.gather(
            *(client.post(root_url + path, json={**body, "seed": i}) for i in range(count))
        )
    return [r.json()["stats"]["tokens_per_second"] for r in replies]


def test_streams_in_the_slots_share_the_generation_speed():
    """Four at once each generate well below their speed alone (the model: 0.44x). Lateness of a
    busy machine can only lower a measured speed, so this bound cannot flip by load."""
    with simulator.serve(profile="test-fast", parallel=4) as sim:
        shared = asyncio.run(_rates(sim.root_url, 4))

    assert max(shared) < 100 * 0.7, shared  # alone: 100 tok/s


def test_prompts_processed_at_once_share_the_prompt_speed():
    """Two 5000-token prompts at 5000 tok/s: 1 s each alone, 2 s each side by side. The bound
    leaves half a second for the two requests to arrive apart; lateness only adds to it."""
    body = native_body("p" * 4 * 5000, sim={"prefill_tps": 5000, "output_tokens": 1})

    async def both(root_url: str) -> list[float]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            replies = await asyncio.gather(
                *(client.post(root_url + "/api/v1/chat", json={**body, "seed": i}) for i in (1, 2))
            )
        return [r.json()["stats"]["time_to_first_token_seconds"] for r in replies]

    with simulator.serve(profile="test-fast", parallel=4) as sim:
        ttfts = asyncio.run(both(sim.root_url))

    assert min(ttfts) >= 1.5, ttfts


def test_the_pace_model():
    alone, one_slot, unlimited, four = Engine(4), Engine(1), Engine(None), Engine(4)
    four.generating, four.prefilling = 4, 3
    one_slot.generating = unlimited.generating = 4

    assert alone.gen_factor() == alone.prefill_factor() == 1.0
    assert four.prefill_factor() == 3.0  # the prompt speed is split evenly
    assert four.gen_factor() == pytest.approx(4 / 1.75)  # total 1.75x, shared by four
    two = Engine(4)
    two.generating = 2
    assert 1 / two.gen_factor() == pytest.approx(0.625)
    assert one_slot.gen_factor() == unlimited.gen_factor() == 1.0
    assert not one_slot.shared
    assert not unlimited.shared


def test_prompt_steps():
    assert prompt_steps(3635, 2048, bounded=False) == [2048, 3635]
    assert prompt_steps(100, 2048, bounded=False) == [100]
    assert prompt_steps(1, 512, bounded=True) == [1]
    many = prompt_steps(100_000, 1, bounded=True)
    assert len(many) <= 64
    assert many[-1] == 100_000
