"""One mapping from how a run ended to what every front end shows, on real runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lmstream_nb import (
    Budgets,
    LMStudioClient,
    Prompt,
    PromptStore,
    StreamStalled,
    TextDelta,
    arun,
    simulator,
)
from lmstream_nb._outcome import CANCELLED, CANCELLED_MESSAGE, DONE, FAILED, ending, view_state
from lmstream_nb._store import STATUSES
from lmstream_nb.serve._events import final_event
from lmstream_nb.serve._hub import Outcome

pytestmark = pytest.mark.anyio

MODEL = "lmstream-sim-8b"


@pytest.fixture
def store(tmp_path: Path) -> PromptStore:
    with PromptStore(tmp_path / "runs.db") as s:
        yield s


@pytest.mark.parametrize("status", STATUSES)
def test_every_status_has_one_ending_and_the_relay_agrees(status: str) -> None:
    expected = {"ok": DONE, "cancelled": CANCELLED}.get(status, FAILED)
    assert view_state(status) == expected
    name, data = final_event(Outcome(status, "said", None, {}, 0))
    assert (name == "done") == (expected == DONE)
    assert data["status"] == status


async def test_done(sim: simulator.SimServer, store: PromptStore) -> None:
    async with LMStudioClient(sim.base_url) as client:
        result = await arun(Prompt("Hi", model=MODEL), store=store, client=client, max_tokens=3)
    end = ending(result)
    assert (end.state, end.message, end.run_id, end.ok) == (DONE, None, result.run_id, True)


async def test_a_result_and_the_error_it_would_raise_end_the_same(store: PromptStore) -> None:
    stall = simulator.Scenario(stall_at=3, stall_s=30)
    budgets = Budgets(idle=0.3)
    with simulator.serve(profile="test-fast", defaults=stall) as stalling:
        async with LMStudioClient(stalling.base_url, budgets=budgets) as client:
            prompt = Prompt("Hi", model=MODEL)
            returned = await arun(prompt, store=store, client=client, raise_errors=False)
            with pytest.raises(StreamStalled) as raised:
                await arun(prompt, store=store, client=client)
    from_result, from_error = ending(returned), ending(raised.value)
    assert from_result.state == from_error.state == FAILED
    assert from_result.message == from_error.message == returned.error
    assert from_error.run_id == raised.value.run_id
    assert from_error.run_id is not None
    assert not from_error.ok


def test_a_cancellation_ends_cancelled() -> None:
    """The sentence is the one ``arun`` records (the runner's Stop test checks it on a real run)."""
    for cancelled in (asyncio.CancelledError(), KeyboardInterrupt()):
        end = ending(cancelled)
        assert (end.state, end.message, end.run_id) == (CANCELLED, CANCELLED_MESSAGE, None)


async def test_a_bug_in_a_callback_fails_with_the_recorded_sentence(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    def explode(event: Any) -> None:
        if isinstance(event, TextDelta):
            raise ValueError("boom")

    async with LMStudioClient(sim.base_url) as client:
        with pytest.raises(ValueError, match="boom") as raised:
            await arun(Prompt("Hi", model=MODEL), store=store, client=client, on_event=explode)
    end = ending(raised.value)
    assert end.state == FAILED
    [summary] = store.history()
    assert end.message == summary.error
    assert "ValueError('boom')" in (end.message or "")
