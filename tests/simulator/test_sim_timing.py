"""Timing: time to first token, token pace, time scale, concurrency, JIT load and queueing."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from sim_helpers import MODEL, TIMEOUT, chat_body, stream

from lmstream_nb import simulator


def test_time_to_first_token_grows_with_prompt_length(sim, client):
    url = sim.base_url + "/chat/completions"
    fast = {"output_tokens": 2, "prefill_tps": 2000}
    short = stream(client, url, chat_body("x" * 400, sim=fast), time_events=True)  # 100 tokens
    long = stream(client, url, chat_body("x" * 6000, sim=fast), time_events=True)  # 1500 tokens

    assert short.ttft < 0.3
    assert 0.7 <= long.ttft < 1.3
    assert long.ttft - short.ttft > 0.6


def test_token_pace_follows_gen_tps(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 41, "gen_tps": 100}),
        time_events=True,
    )

    span = result.arrivals[40] - result.arrivals[0]  # 40 intervals of 10 ms ± 20 %
    assert 0.34 <= span <= 0.55


def test_time_scale_shrinks_a_300_second_scenario(sim, client):
    # laptop-gpu speeds: 4500 prompt tokens at 150 tok/s (30 s), then 8100 tokens at 30 tok/s
    # (270 s); at time_scale 0.01 that is 0.3 s + 2.7 s.
    scenario = {
        "prefill_tps": 150,
        "gen_tps": 30,
        "output_tokens": 8100,
        "time_scale": 0.01,
    }
    started = time.monotonic()
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body("y" * 18000, sim=scenario),
        time_events=True,
    )
    elapsed = time.monotonic() - started

    assert len(result.chunks) == 8101
    assert 0.25 <= result.ttft <= 0.6
    assert 2.9 <= elapsed <= 4.5


def test_eight_concurrent_streams_keep_their_speed():
    """The simulator itself keeps up with eight streams (no slots: none slows another down)."""
    body = chat_body(sim={"output_tokens": 101, "gen_tps": 100})

    async def one(client: httpx.AsyncClient) -> float:
        arrivals = []
        async with client.stream(
            "POST", sim.base_url + "/chat/completions", json={**body, "stream": True}
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 101
        return 100 / (arrivals[-1] - arrivals[0])

    async def main() -> tuple[list[float], float]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
            started = time.monotonic()
            rates = await asyncio.gather(*(one(client) for _ in range(8)))
            return list(rates), time.monotonic() - started

    with simulator.serve(profile="test-fast", parallel=None) as sim:
        rates, wall = asyncio.run(main())

    assert min(rates) >= 80, rates
    assert wall < 1.6


def test_instant_profile_streams_without_delay(client):
    with simulator.serve(profile="instant") as fast:
        started = time.monotonic()
        result = stream(
            client, fast.base_url + "/chat/completions", chat_body(sim={"output_tokens": 5000})
        )
        elapsed = time.monotonic() - started

    assert len(result.chunks) == 5001
    assert elapsed < 3.0


def test_stall_pauses_between_tokens(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 10, "stall_at": 5, "stall_s": 0.5}),
        time_events=True,
    )

    gaps = [b - a for a, b in zip(result.arrivals, result.arrivals[1:], strict=False)]
    assert len(result.chunks) == 11
    assert gaps[4] >= 0.45  # between the fifth and the sixth token
    assert max(gaps[:4] + gaps[5:9]) < 0.2


def test_jit_load_delays_the_first_request_only(client):
    with simulator.serve(profile="test-fast", models=("main-8b", "other-3b")) as sim:
        url = sim.base_url + "/chat/completions"
        before = client.get(sim.root_url + "/api/v0/models/other-3b").json()["state"]
        body = chat_body(model="other-3b", sim={"output_tokens": 2, "load_s": 0.6})
        first = stream(client, url, body, time_events=True)
        after = client.get(sim.root_url + "/api/v0/models/other-3b").json()["state"]
        second = stream(client, url, body, time_events=True)

    assert before == "not-loaded"
    assert first.ttft >= 0.55
    assert first.chunks[0]["model"] == "other-3b"
    assert after == "loaded"
    assert second.ttft < 0.3


def test_one_slot_queues_per_model(client):
    with simulator.serve(profile="test-fast", parallel=1) as sim:
        url = sim.base_url + "/chat/completions"
        body = chat_body(sim={"output_tokens": 40, "gen_tps": 80})  # about 0.5 s each
        results = {}

        def run(name: str) -> None:
            with httpx.Client(timeout=TIMEOUT) as own:
                results[name] = stream(own, url, body, time_events=True)

        threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)

    first, second = sorted(results.values(), key=lambda r: r.arrivals[0])
    assert first.ttft < second.ttft  # the first was not queued (no real-time bound: CPU load)
    assert second.arrivals[0] >= first.arrivals[-1]  # waited for the first generation
    assert second.ttft >= 0.4
    assert first.chunks[0]["model"] == second.chunks[0]["model"] == MODEL
