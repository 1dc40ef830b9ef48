"""run_many(): failed rows recorded and the rest succeed in order; interrupt; resume; two URLs."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from waiting import await_until

from lmstream_nb import (
    AuthenticationError,
    BatchResult,
    Budgets,
    FirstTokenTimeout,
    HTTPStatusError,
    MissingVariables,
    ModelNotFound,
    Prompt,
    PromptStore,
    PromptTooLong,
    ProtocolError,
    ServerUnreachable,
    StreamInterrupted,
    StreamStalled,
    arun_many,
    run_many,
    simulator,
)
from lmstream_nb._batch import _every_one_ended, concurrency_note
from lmstream_nb._errors import rerun_could_help

MODEL = "lmstream-sim-8b"
STALL = '[[sim {"stall_at": 3, "stall_s": 60}]]'


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PromptStore]:
    with PromptStore(tmp_path / "batch.db") as s:
        yield s


def test_failed_rows_are_recorded_and_the_rest_succeed_in_order(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    prompt = Prompt("Describe {{animal}} in {{place}}. {{extra}}", model=MODEL)
    rows = [
        {"animal": "owls", "place": "barns", "extra": ""},
        {"animal": "bats", "extra": ""},  # no place: refused, recorded as failed
        {"animal": "cats", "place": "homes", "extra": STALL},  # stalls after 3 tokens
        {"animal": "eels", "place": "rivers", "extra": ""},
        {"animal": "ants", "place": "hills", "extra": ""},
    ]
    before = len(sim.records())
    batch = run_many(
        prompt,
        rows,
        concurrency=3,
        store=store,
        base_url=sim.base_url,
        budgets=Budgets(idle=0.5),
        progress=False,
        max_tokens=8,
    )
    assert isinstance(batch, BatchResult)
    assert [r.status for r in batch] == ["ok", "error", "stalled", "ok", "ok"]
    assert "place" in (batch[1].error or "")
    assert batch[2].text.strip(), "the stalled row keeps its partial text"
    assert store.get_run(batch[2].run_id).text == batch[2].text
    assert (batch.succeeded, batch.failed) == (3, 2)
    recorded = {r.id: r for r in store.history(limit=None)}
    assert len(recorded) == 5
    assert {r.batch_id for r in recorded.values()} == {batch.batch_id}
    sent_to = {
        "native" if r.path.startswith("/api/v1/chat") else "openai"
        for r in sim.records()[before:]
        if r.method == "POST"
    }
    for index, result in enumerate(batch):
        rec = store.get_run(result.run_id)
        assert rec.batch_row == index
        assert rec.status == result.status
        # Rows go through arun like any run: the endpoint and the progress figures recorded.
        assert rec.first_progress_s == result.stats.first_progress_s
        assert rec.prompt_tokens_per_s == result.stats.prompt_tokens_per_s
        if index == 1:
            assert rec.api is None  # refused before anything was sent
        else:
            assert rec.api in sent_to, (rec.api, sent_to)
    texts = [r.text for r in batch if r.ok]
    assert len(set(texts)) == 3, "each row got its own answer"


def test_dataframe_in_dataframe_out(sim: simulator.SimServer, store: PromptStore) -> None:
    frame = pd.DataFrame({"topic": ["rain", "snow", "hail", "fog"]})
    out = run_many(
        Prompt("Write about {{topic}}.", model=MODEL),
        frame,
        concurrency=2,
        store=store,
        base_url=sim.base_url,
        progress=False,
        max_tokens=5,
    )
    assert list(out["topic"]) == ["rain", "snow", "hail", "fog"]
    assert list(out["status"]) == ["ok"] * 4
    assert all(t.strip() for t in out["text"])
    assert len(set(out["text"])) == 4
    assert out.attrs["batch_id"]


def test_api_chooses_the_endpoint_of_every_row(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    before = len(sim.chats())
    out = run_many(
        Prompt("Write about {{topic}}.", model=MODEL),
        [{"topic": "rain"}, {"topic": "snow"}],
        store=store,
        base_url=sim.base_url,
        progress=False,
        max_tokens=3,
        api="openai",
    )
    assert [r.status for r in out] == ["ok", "ok"]
    assert {r.path for r in sim.chats()[before:]} == {"/v1/chat/completions"}
    assert {store.get_run(r.run_id).api for r in out} == {"openai"}


def test_resume_runs_only_the_rows_that_did_not_succeed(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    prompt = Prompt("Row {{n}} {{extra}}", model=MODEL)
    first_rows = [{"n": "0", "extra": ""}, {"n": "1", "extra": STALL}, {"n": "2", "extra": ""}]
    first = run_many(
        prompt,
        first_rows,
        store=store,
        base_url=sim.base_url,
        budgets=Budgets(idle=0.3),
        progress=False,
        max_tokens=4,
    )
    assert [r.status for r in first] == ["ok", "stalled", "ok"]
    fixed_rows = [{"n": "0", "extra": ""}, {"n": "1", "extra": ""}, {"n": "2", "extra": ""}]
    before = len(sim.chats())
    again = run_many(
        prompt,
        fixed_rows,
        store=store,
        base_url=sim.base_url,
        resume=first.batch_id,
        progress=False,
        max_tokens=4,
    )
    assert len(sim.chats()) - before == 1, "only the failed row was sent again"
    assert again.batch_id == first.batch_id
    assert [r.status for r in again] == ["ok", "ok", "ok"]
    assert again[0].run_id == first[0].run_id
    assert again[2].run_id == first[2].run_id
    assert again[1].run_id != first[1].run_id


def test_two_base_urls_both_receive_rows(store: PromptStore) -> None:
    with simulator.serve(profile="test-fast") as a, simulator.serve(profile="test-fast") as b:
        rows = [{"n": str(i)} for i in range(8)]
        batch = run_many(
            Prompt("Item {{n}}", model=MODEL),
            rows,
            concurrency=4,
            store=store,
            base_url=[a.base_url, b.base_url],
            progress=False,
            max_tokens=3,
        )
        served_a, served_b = len(a.chats()), len(b.chats())
    assert batch.succeeded == 8
    assert served_a > 0
    assert served_b > 0
    assert served_a + served_b == 8


@pytest.mark.anyio
async def test_interrupt_mid_batch_keeps_finished_rows_and_cancels_in_flight(
    store: PromptStore,
) -> None:
    defaults = simulator.Scenario(gen_tps=100, jitter=0)
    with simulator.serve(profile="test-fast", defaults=defaults) as paced:
        rows = [{"n": str(i), "size": "5" if i < 2 else "2000"} for i in range(6)]
        prompt = Prompt('Item {{n}} [[sim {"output_tokens": {{size}}}]]', model=MODEL)
        task = asyncio.create_task(
            arun_many(
                prompt, rows, concurrency=3, store=store, base_url=paced.base_url, progress=False
            )
        )
        await await_until(
            lambda: sum(r.status == "ok" for r in store.history(limit=None)) == 2,
            timeout=10,
            what="the two short rows finished",
        )
        await await_until(
            lambda: any(r.outcome == "running" and r.sent_tokens for r in paced.records()),
            timeout=10,
            what="a long row is streaming",
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        disconnected = await asyncio.to_thread(
            paced.wait_for, lambda r: r.outcome == "client_disconnected", 5.0
        )
    assert disconnected.sent_tokens < disconnected.planned_tokens
    runs = store.history(limit=None)
    statuses = sorted(r.status for r in runs)
    assert statuses.count("ok") == 2
    assert "cancelled" in statuses
    assert "unfinished" not in statuses, [
        (r.id, r.status, r.error, r.text_chars, r.batch_row) for r in runs
    ]
    assert len(statuses) <= 5, "rows never started are not recorded"


def _http(cls: type, status: int, **extra: object) -> Exception:
    error: Exception = cls("x", url="u", status=status, server_message=None, **extra)
    return error


@pytest.mark.parametrize(
    ("error", "helps"),
    [
        (None, False),
        (ServerUnreachable("x", url="u"), True),
        (StreamStalled("x", url="u", budget=1.0), True),
        (FirstTokenTimeout("x", url="u", budget=1.0), True),
        (StreamInterrupted("x", url="u"), True),
        (_http(HTTPStatusError, 503), True),
        (_http(HTTPStatusError, 429), True),
        (_http(HTTPStatusError, 400), False),
        (_http(ModelNotFound, 404, model="m"), False),
        (_http(PromptTooLong, 400), False),
        (_http(AuthenticationError, 401), False),
        (ProtocolError("x", url="u", line=""), False),
        (MissingVariables(["name"]), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_a_rerun_is_suggested_only_for_failures_of_the_moment(
    error: BaseException | None, helps: bool
) -> None:
    assert rerun_could_help(error) is helps


def test_a_batch_says_why_its_rows_failed(sim: simulator.SimServer, store: PromptStore) -> None:
    prompt = store.save("pet", "Tell me about {{animal}}.")
    rows = [{"animal": "owls"}, {"x": 1}, {"y": 2}]
    batch = run_many(prompt, rows, store=store, base_url=sim.base_url, progress=False)
    [(sentence, count, alike)] = batch.failures()
    assert (count, alike) == (2, True)
    assert sentence.startswith("The template needs a value for the variable animal")
    assert not batch.rerun_could_help


@pytest.mark.anyio
async def test_a_stopped_batch_waits_for_every_row_still_recording() -> None:
    """A row that takes its time to record its cancellation is waited for, also through a
    second cancellation; gather alone returns as soon as the quickest row has ended."""
    recorded: list[str] = []
    release = asyncio.Event()

    async def row(name: str, slow: bool) -> None:
        try:
            await asyncio.Event().wait()  # streaming, until cancelled
        except asyncio.CancelledError:
            if slow:
                await asyncio.shield(release.wait())  # a write in a worker thread
            recorded.append(name)
            raise

    tasks = [asyncio.ensure_future(row("quick", False)), asyncio.ensure_future(row("slow", True))]
    waiter = asyncio.ensure_future(_every_one_ended(tasks))
    await await_until(lambda: recorded == ["quick"], timeout=5, what="the quick row recorded")
    waiter.cancel()  # a second Ctrl-C while the slow row still records
    for _ in range(5):  # turns of the loop in which a waiter that gave up would have ended
        await asyncio.sleep(0)
    assert not waiter.done(), "it returned before the slow row was recorded"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert recorded == ["quick", "slow"]


# -- how many rows at once: the slots each server reports ---------------------------------------

HOLD = '[[sim {"prompt_stall_at": 0, "stall_s": 60}]]'  # every row waits in prompt processing


def most_at_once(records: list[simulator.RequestRecord]) -> int:
    """The most chat requests the server held at once, from its own records: at each arrival,
    the requests that had arrived and not yet ended (the server records a request's end in the
    same turn of its loop as its last byte, before it can read the next request)."""
    spans = [(r.started_at or 0.0, r.ended_at or math.inf) for r in records]
    return max((sum(s <= start < e for s, e in spans) for start, _ in spans), default=0)


async def held_batch(
    servers: list[simulator.SimServer],
    store: PromptStore,
    holding: int,
    **kwargs: object,
) -> list[list[simulator.RequestRecord]]:
    """Rows that wait in prompt processing until cancelled: once ``holding`` of them are on
    the servers, the batch is stopped; the servers' chat records, once every request ended."""
    prompt = Prompt(f"Item {{{{n}}}} {HOLD}", model=MODEL)
    task = asyncio.create_task(
        arun_many(
            prompt,
            [{"n": str(i)} for i in range(8)],
            store=store,
            base_url=[s.base_url for s in servers],
            budgets=Budgets(first_token=120, idle=120),
            progress=False,
            **kwargs,  # type: ignore[arg-type]
        )
    )
    await await_until(
        lambda: sum(r.stage == "prefill" for s in servers for r in s.chats()) == holding,
        timeout=20,
        what=f"{holding} rows are processing their prompt",
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for server in servers:
        await await_until(
            lambda server=server: all(r.outcome != "running" for r in server.chats()),
            timeout=10,
            what="every request ended",
        )
    return [s.chats() for s in servers]


@pytest.mark.anyio
async def test_each_server_runs_as_many_rows_as_it_has_slots(store: PromptStore) -> None:
    """LM Studio says ``parallel`` per loaded instance, llama.cpp ``total_slots``: by default
    each server gets that many rows at once, none queued behind its slots."""
    llamacpp = simulator.Scenario(dialect="llamacpp")
    with (
        simulator.serve(profile="test-fast", parallel=3) as lmstudio,
        simulator.serve(profile="test-fast", parallel=2, defaults=llamacpp) as llama,
    ):
        on_lmstudio, on_llama = await held_batch([lmstudio, llama], store, holding=5)
    assert (most_at_once(on_lmstudio), most_at_once(on_llama)) == (3, 2)
    assert (len(on_lmstudio), len(on_llama)) == (3, 2), "no row waited in a server's queue"
    assert {r.path for r in on_lmstudio} == {"/api/v1/chat"}
    assert {r.path for r in on_llama} == {"/v1/chat/completions"}


def test_a_batch_says_how_many_rows_ran_at_once_where(store: PromptStore) -> None:
    with (
        simulator.serve(profile="test-fast", parallel=4) as four,
        simulator.serve(profile="test-fast", parallel=1) as one,
    ):
        rows = [{"n": str(i)} for i in range(10)]
        batch = run_many(
            Prompt("Item {{n}}", model=MODEL),
            rows,
            store=store,
            base_url=[four.base_url, one.base_url],
            progress=False,
            max_tokens=3,
        )
        chats = (four.chats(), one.chats())
    assert batch.succeeded == 10
    assert batch.concurrency == {four.base_url: 4, one.base_url: 1}
    assert batch.concurrency_note == "2 servers: 4 + 1 slots"
    assert "2 servers: 4 + 1 slots" in repr(batch)
    assert most_at_once(chats[0]) <= 4
    assert most_at_once(chats[1]) == 1
    assert len(chats[0]) + len(chats[1]) == 10


def test_a_server_that_reports_no_slots_gets_three_rows_at_once(store: PromptStore) -> None:
    """LM Studio 0.3 (no native API) says nothing of slots: the documented fallback."""
    with simulator.serve(profile="test-fast", native_api=False, parallel=1) as old:
        frame = pd.DataFrame({"n": [str(i) for i in range(4)]})
        out = run_many(
            Prompt("Item {{n}}", model=MODEL),
            frame,
            store=store,
            base_url=old.base_url,
            progress=False,
            max_tokens=3,
        )
    assert list(out["status"]) == ["ok"] * 4
    assert out.attrs["concurrency"] == {old.base_url: 3}


@pytest.mark.anyio
async def test_an_explicit_concurrency_still_caps_the_total(store: PromptStore) -> None:
    with (
        simulator.serve(profile="test-fast", parallel=3) as a,
        simulator.serve(profile="test-fast", parallel=3) as b,
    ):
        on_a, on_b = await held_batch([a, b], store, holding=3, concurrency=3)
    # Dealt out in turn, as before servers were asked: 2 + 1, under the 3 + 3 slots.
    assert (most_at_once(on_a), most_at_once(on_b)) == (2, 1)
    assert (len(on_a), len(on_b)) == (2, 1)


@pytest.mark.parametrize(
    ("shares", "note"),
    [
        ([(4, True)], "4 slots"),
        ([(4, True), (1, True)], "2 servers: 4 + 1 slots"),
        ([(3, False)], "3 at once"),
        ([(2, False), (1, False)], "2 servers: 2 + 1 at once"),
        ([(4, True), (3, False)], "2 servers: 4 slots + 3 at once"),
        ([], ""),
    ],
)
def test_the_concurrency_in_words(shares: list[tuple[int, bool]], note: str) -> None:
    assert concurrency_note(shares) == note


def test_a_schema_gives_parsed_columns_and_resume_reads_them_again(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
        "required": ["city", "people"],
    }
    frame = pd.DataFrame({"topic": ["rain", "snow", 'hail [[sim {"schema_fault": "wrong_type"}]]']})
    out = run_many(
        Prompt("A city with {{topic}}.", model=MODEL),
        frame,
        schema=schema,
        store=store,
        base_url=sim.base_url,
        progress=False,
    )
    assert list(out["status"]) == ["ok", "ok", "invalid_output"]
    assert list(out.columns[-2:]) == ["parsed.city", "parsed.people"]
    assert all(isinstance(c, str) for c in out["parsed.city"][:2])
    assert out["parsed.people"][:2].map(type).tolist() == [int, int]
    assert out["parsed.city"][2] is None
    assert "does not match the schema at $.city" in out["error"][2]

    before = len(sim.chats())
    again = run_many(
        Prompt("A city with {{topic}}.", model=MODEL),
        [{"topic": t} for t in ["rain", "snow", "hail"]],
        schema=schema,
        store=store,
        base_url=sim.base_url,
        resume=out.attrs["batch_id"],
        progress=False,
    )
    assert len(sim.chats()) - before == 1
    assert [r.status for r in again] == ["ok"] * 3
    assert again[0].parsed == {"city": out["parsed.city"][0], "people": out["parsed.people"][0]}
    assert set(again.parsed_columns()) == {"parsed.city", "parsed.people"}
