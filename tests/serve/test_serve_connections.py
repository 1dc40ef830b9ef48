"""``lmstream serve`` against clients that hold connections: slowloris and idle sockets.

300 raw sockets on loopback, each bounded (it stops by itself after its payload, or when the
server closes it), while real requests are made on fresh connections. The server must close
the slow ones within its request deadline (``request_timeout``), make room beyond its cap
(``max_connections``) by closing the idle ones, answer every real request, and never cut a
long event stream, whose request arrived whole.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serve_helpers import SSE, TIMEOUT, read_events, service
from waiting import await_until, wait_until

from lmstream_nb import PromptStore, simulator
from lmstream_nb.serve import ServeHandle

pytestmark = pytest.mark.timeout(90)

MODEL = "lmstream-sim-8b"
SLOW_CLIENTS = 300
# Three seconds of steady text: longer than the request deadline the tests set.
LONG = '[[sim {"gen_tps": 20, "output_tokens": 60, "jitter": 0}]] '


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    store = PromptStore(tmp_path / "lmstream.db")
    store.save("long", LONG + "Write at length about {{topic}}.", model=MODEL)
    store.close()
    return tmp_path / "lmstream.db"


@dataclass
class Slow:
    opened: float = 0.0
    closed: float | None = None  # when the server closed it (None: it never did)
    answer: bytes = b""


async def slow_client(port: int, payload: bytes, per_byte: float, patience: float) -> Slow:
    """Send ``payload`` a byte every ``per_byte`` seconds; note when the server hangs up.

    Bounded: it gives up after the payload and ``patience`` more seconds.
    """
    slow = Slow(opened=time.monotonic())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def read_to_end() -> None:
        while chunk := await reader.read(4096):
            slow.answer += chunk
        slow.closed = time.monotonic()

    reading = asyncio.create_task(read_to_end())
    try:
        for byte in payload:
            if reading.done():
                break
            writer.write(bytes([byte]))
            await asyncio.wait([reading], timeout=per_byte)
        await asyncio.wait([reading], timeout=patience)
    except (ConnectionError, OSError):
        pass  # reset by the server: it closed the connection
    finally:
        reading.cancel()
        writer.close()
        if slow.closed is None and reader.at_eof():
            slow.closed = time.monotonic()
    return slow


async def real_requests(url: str, count: int, every: float) -> list[tuple[int, float]]:
    """``count`` requests, each on a fresh connection (a new client): (status, seconds)."""
    results = []
    for _ in range(count):
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            t0 = time.monotonic()
            response = await client.get("/api/runs", params={"limit": 1})
            results.append((response.status_code, time.monotonic() - t0))
        await asyncio.sleep(every)
    return results


def follow_in_thread(server: ServeHandle, client: httpx.Client) -> tuple[threading.Thread, list]:
    response = client.post("/api/prompts/long/runs", json={"variables": {"topic": "tides"}})
    assert response.status_code == 201, response.text
    got: list[list[SSE]] = []
    thread = threading.Thread(
        target=lambda: got.append(read_events(client, response.json()["events_url"])[0])
    )
    thread.start()
    return thread, got


def test_slowloris_clients_are_timed_out_while_real_ones_are_answered(
    store_path: Path, sim: simulator.SimServer
) -> None:
    deadline = 2.0
    with (
        service(store_path, sim.base_url, request_timeout=deadline) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        follower, got = follow_in_thread(server, client)
        payload = f"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()

        async def attack() -> tuple[list[Slow], list[tuple[int, float]]]:
            slow = [
                slow_client(server.port, payload, per_byte=1.0, patience=deadline + 5)
                for _ in range(SLOW_CLIENTS)
            ]
            gathered = asyncio.gather(*slow)
            await await_until(
                lambda: server.connections() > SLOW_CLIENTS,
                timeout=10,
                what="all the slow clients are connected",
            )
            real = await real_requests(server.url, count=15, every=0.2)
            return await gathered, real

        slow, real = asyncio.run(attack())
        follower.join(20)

    assert [status for status, _ in real] == [200] * 15
    assert max(seconds for _, seconds in real) < 5.0  # answered, not queued behind the 300
    lived = sorted((s.closed - s.opened) for s in slow if s.closed is not None)
    assert len(lived) == SLOW_CLIENTS, "some slow clients were never closed by the server"
    assert lived[0] >= deadline - 0.1  # not before the deadline...
    assert lived[-1] < deadline + 4.0  # ...and soon after it, however loaded the machine
    for s in slow:  # part of a request had come: the client is told why
        head, _, body = s.answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), s.answer[:80]
        assert "did not arrive whole" in json.loads(body)["error"]
    # The event stream outlived the deadline: its request had arrived whole.
    assert got, "the event stream did not end"
    assert got[0][-1].event == "done"


def test_beyond_the_cap_the_idle_connections_make_room(
    store_path: Path, sim: simulator.SimServer
) -> None:
    cap = 50
    with (
        service(store_path, sim.base_url, max_connections=cap, request_timeout=60) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        follower, got = follow_in_thread(server, client)
        wait_until(
            lambda: (
                server.snapshot() and all(run["listeners"] for run in server.snapshot().values())
            ),
            timeout=10,
            what="the follower is attached",
        )

        async def crowd() -> tuple[list[Slow], list[tuple[int, float]], int]:
            idle = [
                slow_client(server.port, b"", per_byte=0, patience=8.0) for _ in range(SLOW_CLIENTS)
            ]
            gathered = asyncio.gather(*idle)
            await asyncio.sleep(1.0)
            open_now = await asyncio.to_thread(server.connections)
            real = await real_requests(server.url, count=10, every=0.1)
            return await gathered, real, open_now

        idle, real, open_now = asyncio.run(crowd())
        follower.join(20)

    assert open_now <= cap + 1
    assert [status for status, _ in real] == [200] * 10
    assert max(seconds for _, seconds in real) < 5.0
    closed = [s for s in idle if s.closed is not None]
    assert len(closed) >= SLOW_CLIENTS - cap  # evicted, oldest idle first
    assert all(s.answer == b"" for s in closed)  # an idle socket is just closed
    assert got, "the event stream did not end"
    assert got[0][-1].event == "done"  # busy connections are never evicted


def test_when_every_connection_is_busy_a_new_one_gets_a_503(
    store_path: Path, sim: simulator.SimServer
) -> None:
    with (
        service(store_path, sim.base_url, max_connections=2) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as first,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as second,
    ):
        follower, got = follow_in_thread(server, first)  # the POST's connection is reused
        other, got_other = follow_in_thread(server, second)
        wait_until(
            lambda: sum(run["listeners"] for run in server.snapshot().values()) == 2,
            timeout=10,
            what="both streams are attached",
        )

        async def one_more() -> Slow:
            return await slow_client(server.port, b"", per_byte=0, patience=5.0)

        refused = asyncio.run(one_more())
        follower.join(20)
        other.join(20)
    head, _, body = refused.answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), refused.answer[:80]
    assert "all of them are busy" in json.loads(body)["error"]
    assert got[0][-1].event == "done"
    assert got_other[0][-1].event == "done"


def test_keep_alive_connections_get_a_fresh_deadline_per_request(
    store_path: Path, sim: simulator.SimServer
) -> None:
    """A client that sends requests one after another on one connection is never cut, however
    long the connection lives, as long as each request arrives whole in time."""
    with (
        service(store_path, sim.base_url, request_timeout=0.5) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        ports = set()
        for _ in range(8):
            response = client.get("/api/runs")
            assert response.status_code == 200
            sock = response.extensions["network_stream"].get_extra_info("socket")
            ports.add(sock.getsockname()[1])
            time.sleep(0.2)
        assert len(ports) == 1  # one connection for 1.6 s, three times the deadline
        assert server.connections() == 1
