"""run()/arun() against the simulator: render, stream, record; failures and cancels recorded."""

from __future__ import annotations

import asyncio
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from lmstream_nb import (
    Budgets,
    HTTPStatusError,
    InvalidOutput,
    InvalidSchema,
    InvalidSetting,
    LMStudioClient,
    MissingVariables,
    Prompt,
    PromptEstimate,
    PromptNotFound,
    PromptProgress,
    PromptStore,
    StreamInterrupted,
    StreamStalled,
    StreamStarted,
    SyncLMStudioClient,
    TextDelta,
    arun,
    history,
    run,
    run_many,
    simulator,
    stats,
)
from lmstream_nb._errors import render
from lmstream_nb._estimate import MIN_RUNS

MODEL = "lmstream-sim-8b"


@pytest.fixture
def store(tmp_path: Path) -> PromptStore:
    with PromptStore(tmp_path / "runs.db") as s:
        s.save("summary", "Summarise {{topic}} for {{audience}}.", system="You help {{team}}.")
        yield s


def sync_client(sim: simulator.SimServer, **kwargs: Any) -> SyncLMStudioClient:
    return SyncLMStudioClient(sim.base_url, **kwargs)


def test_run_stored_prompt_records_everything(sim: simulator.SimServer, store: PromptStore) -> None:
    seen: list[Any] = []
    with sync_client(sim) as client:
        result = run(
            "summary",
            {"topic": "rivers", "audience": "kids", "team": "docs"},
            store=store,
            client=client,
            on_event=seen.append,
            sim={"output_tokens": 25},
        )
    assert result.ok
    assert result.status == "ok"
    assert result.prompt == "summary@1"
    assert result.text == "".join(e.content for e in seen if isinstance(e, TextDelta))
    assert result.stats.completion_tokens == 25
    assert result.finish_reason == "stop"
    assert str(result) == result.text
    assert "run #" in repr(result)
    rec = store.get_run(result.run_id)
    assert (rec.prompt_name, rec.prompt_version, rec.status) == ("summary", 1, "ok")
    assert rec.text == result.text
    assert rec.model == MODEL
    assert rec.variables == {"topic": "rivers", "audience": "kids", "team": "docs"}
    assert rec.messages == [
        {"role": "system", "content": "You help docs."},
        {"role": "user", "content": "Summarise rivers for kids."},
    ]
    assert rec.base_url == sim.base_url
    assert rec.ttft_s is not None
    assert rec.duration_s is not None
    assert rec.chunks >= 25
    assert rec.completion_tokens == 25
    assert rec.finish_reason == "stop"


def test_run_records_the_exact_version(sim: simulator.SimServer, store: PromptStore) -> None:
    store.save("summary", "Version two about {{topic}}.", system=None)  # drop {{team}}
    with sync_client(sim) as client:
        latest = run("summary", {"topic": "x"}, store=store, client=client)
        first = run(
            "summary",
            {"topic": "x", "audience": "a", "team": "t"},
            version=1,
            store=store,
            client=client,
        )
    assert store.get_run(latest.run_id).prompt_version == 2
    assert store.get_run(first.run_id).prompt_version == 1


@pytest.mark.anyio
async def test_arun_inline_prompt(sim: simulator.SimServer, store: PromptStore) -> None:
    async with LMStudioClient(sim.base_url) as client:
        result = await arun(
            Prompt("Tell me about {{x}}", model=MODEL),
            {"x": "{{y}}"},
            store=store,
            client=client,
            sim={"output_tokens": 5},
        )
    rec = store.get_run(result.run_id)
    assert rec.prompt_name is None
    assert rec.template == "Tell me about {{x}}"
    assert rec.messages[-1]["content"] == "Tell me about {{y}}", "values are never re-expanded"
    assert result.prompt == "(inline)"


def test_missing_variables_are_refused_before_anything_happens(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    before = len(sim.records())
    with sync_client(sim) as client, pytest.raises(MissingVariables) as info:
        run("summary", {"topic": "x"}, store=store, client=client)
    assert info.value.names == ("audience", "team")
    assert len(sim.records()) == before
    assert len(store.history()) == 0


def test_unknown_prompt_suggests_close_names(store: PromptStore) -> None:
    with pytest.raises(PromptNotFound) as info:
        run("sumary", {}, store=store)
    assert "summary" in str(info.value)


@pytest.mark.parametrize(
    ("scenario", "budgets", "error", "status"),
    [
        ({"disconnect_at": 6}, None, StreamInterrupted, "interrupted"),
        ({"stall_at": 4, "stall_s": 30}, Budgets(idle=0.3), StreamStalled, "stalled"),
        ({"http_status": 500}, None, HTTPStatusError, "error"),
    ],
)
def test_failures_are_recorded_with_partial_text(
    sim: simulator.SimServer,
    store: PromptStore,
    scenario: dict[str, Any],
    budgets: Budgets | None,
    error: type[Exception],
    status: str,
) -> None:
    values = {"topic": "x", "audience": "y", "team": "z"}
    with sync_client(sim, budgets=budgets) as client:
        with pytest.raises(error) as info:
            run("summary", values, store=store, client=client, sim=scenario)
        returned = run(
            "summary", values, store=store, client=client, sim=scenario, raise_errors=False
        )
    run_id = info.value.run_id  # type: ignore[attr-defined]
    assert run_id is not None
    rec = store.get_run(run_id)
    assert rec.status == status
    assert rec.error == str(info.value)
    assert rec.text == getattr(info.value, "partial_text", "")
    assert returned.status == status
    assert not returned.ok
    assert returned.error
    assert store.get_run(returned.run_id).text == returned.text


def test_first_token_timeout_is_recorded(sim: simulator.SimServer, store: PromptStore) -> None:
    with sync_client(sim, budgets=Budgets(first_token=0.3)) as client:
        result = run(
            Prompt("z" * 400, model=MODEL),
            store=store,
            client=client,
            sim={"prefill_tps": 10},
            raise_errors=False,
        )
    assert result.status == "first_token_timeout"
    assert store.get_run(result.run_id).status == "first_token_timeout"


@pytest.mark.anyio
async def test_cancelled_run_is_recorded_then_reraised(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    got_text = asyncio.Event()

    def on_event(event: Any) -> None:
        if isinstance(event, TextDelta):
            got_text.set()

    async with LMStudioClient(sim.base_url) as client:
        task = asyncio.create_task(
            arun(
                Prompt("long", model=MODEL),
                store=store,
                client=client,
                on_event=on_event,
                sim={"output_tokens": 5000},
            )
        )
        await asyncio.wait_for(got_text.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    [summary] = store.history()
    rec = store.get_run(summary.id)
    assert rec.status == "cancelled"
    assert rec.text
    assert sim.wait_for(lambda r: r.outcome == "client_disconnected", 5.0)


def test_run_works_inside_a_running_event_loop(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    """In a Jupyter cell an event loop already runs in the calling thread."""

    async def cell() -> str:
        with sync_client(sim) as client:
            return run(Prompt("Hi", model=MODEL), store=store, client=client).text

    assert asyncio.run(cell())


def test_default_store_and_module_level_history_and_stats(
    sim: simulator.SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LMSTREAM_BASE_URL", sim.base_url)
    first = run(Prompt("Hi {{who}}"), {"who": "you"}, sim={"output_tokens": 3})
    second = run(Prompt("Hi"), sim={"disconnect_at": 1}, raise_errors=False)
    assert first.model == MODEL, "the server's chat model is used when none is given"
    assert (tmp_path / "home" / "lmstream.db").exists()
    runs = history()
    assert [r.id for r in runs] == [second.run_id, first.run_id]
    report = stats()
    assert report.overall.runs == 2
    assert report.overall.success_rate == 0.5
    assert report.overall.by_status == {"ok": 1, "interrupted": 1}


# -- crash safety and Ctrl-C, in real processes ----------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from lmstream_nb import Prompt, PromptStore, SyncLMStudioClient, TextDelta, run
    store = PromptStore(sys.argv[1])
    first = True
    def on_event(event):
        global first
        if first and isinstance(event, TextDelta):
            first = False
            print("streaming", flush=True)
    with SyncLMStudioClient(sys.argv[2]) as client:
        run(Prompt("Go", model="lmstream-sim-8b"), store=store, client=client,
            on_event=on_event, sim={"output_tokens": 100000, "gen_tps": 200, "jitter": 0})
    """
)


def start_child(db: Path, base_url: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), base_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready
    assert proc.stdout.readline().strip() == "streaming"
    return proc


def wait_for_flushed_text(db: Path, timeout: float) -> int:
    """The id of the run another process is recording, once some of its text is on disk (no
    event crosses processes, so this polls, bounded)."""

    def flushed() -> int | None:
        runs = reader.history()
        return runs[0].id if runs and runs[0].text_chars > 0 else None

    with PromptStore(db) as reader:
        return wait_until(flushed, timeout=timeout, what="text was flushed to the database")


def test_a_killed_process_leaves_its_run_with_its_text_and_the_next_store_ends_it(
    sim: simulator.SimServer, tmp_path: Path
) -> None:
    db = tmp_path / "crash.db"
    PromptStore(db).close()
    proc = start_child(db, sim.base_url)
    try:
        run_id = wait_for_flushed_text(db, timeout=10)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    with PromptStore(db) as reader:  # the owner is gone: opening ends the run
        rec = reader.get_run(run_id)
    assert rec.status == "interrupted"
    assert len(rec.text) > 10


def test_ctrl_c_in_a_script_records_a_cancelled_run(
    sim: simulator.SimServer, tmp_path: Path
) -> None:
    db = tmp_path / "sigint.db"
    PromptStore(db).close()
    proc = start_child(db, sim.base_url)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert "KeyboardInterrupt" in err
    with PromptStore(db) as reader:
        [summary] = reader.history()
        rec = reader.get_run(summary.id)
    assert rec.status == "cancelled"
    assert rec.text


BATCH_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from lmstream_nb import LMStudioClient, Prompt, PromptStore, arun
    async def main():
        store = PromptStore(sys.argv[1])
        limit = asyncio.Semaphore(8)
        async with LMStudioClient(sys.argv[2]) as client:
            async def one(i):
                async with limit:
                    r = await arun(Prompt("Item {{i}}", model="lmstream-sim-8b"), {"i": i},
                                   store=store, client=client, sim={"output_tokens": 3})
                    return r.status
            statuses = await asyncio.gather(*(one(i) for i in range(int(sys.argv[3]))))
        print(sum(s == "ok" for s in statuses))
    asyncio.run(main())
    """
)


@pytest.mark.timeout(180)
def test_two_processes_with_eight_concurrent_runs_each_lose_nothing(
    sim: simulator.SimServer, tmp_path: Path
) -> None:
    db = tmp_path / "shared.db"
    PromptStore(db).close()
    runs_each = 500
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BATCH_CHILD, str(db), sim.base_url, str(runs_each)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=150) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == str(runs_each)
        assert "locked" not in err
    with PromptStore(db) as reader:
        report = reader.stats()
        rows = reader.history(limit=None)
    assert report.overall.runs == 2 * runs_each == len(rows)
    assert report.overall.by_status == {"ok": 2 * runs_each}
    assert len({r.id for r in rows}) == 2 * runs_each


def test_a_failing_callback_is_recorded_and_reraised(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    def explode(event: Any) -> None:
        if isinstance(event, TextDelta):
            raise ValueError("boom")

    with sync_client(sim) as client, pytest.raises(ValueError, match="boom"):
        run(Prompt("Hi", model=MODEL), store=store, client=client, on_event=explode)
    [summary] = store.history()
    assert summary.status == "error"
    assert "boom" in (summary.error or "")


def test_blocking_mode_records_timeouts_and_answers(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    with sync_client(sim) as client:
        done = run(
            Prompt("Hi", model=MODEL),
            store=store,
            client=client,
            mode="blocking",
            timeout=10,
            sim={"output_tokens": 6},
        )
        late = run(
            Prompt("z" * 400, model=MODEL),
            store=store,
            client=client,
            mode="blocking",
            timeout=0.3,
            sim={"prefill_tps": 10},
            raise_errors=False,
        )
    assert done.ok
    assert done.stats.completion_tokens == 6
    assert store.get_run(done.run_id).text == done.text
    assert late.status == "timeout"
    assert "total timeout of 0.3 s" in (late.error or "")
    assert store.get_run(late.run_id).status == "timeout"
    # the time it took until the timeout, not nothing (a plot of blocking waits needs it)
    assert 0.3 <= late.stats.duration_s < 10
    assert store.get_run(late.run_id).duration_s == late.stats.duration_s
    with pytest.raises(ValueError, match="mode"):
        run(Prompt("Hi"), store=store, mode="sideways")


PROGRESS_FIGURES = ("first_progress_s", "load_s", "prompt_s", "prompt_tokens_per_s")


def api_of(path: str) -> str:
    """The endpoint a chat request went to, as the run record names it."""
    if path.startswith("/api/v1/chat"):
        return "native"
    assert path.endswith("/chat/completions"), path
    return "openai"


def chat_paths(sim: simulator.SimServer, since: int) -> list[str]:
    """The paths of the chat requests the simulator received after its first ``since``."""
    return [r.path for r in sim.records()[since:] if r.method == "POST"]


def test_a_run_records_its_endpoint_and_the_progress_figures_of_its_stats(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    """What the stream says, for a run that succeeds, one that times out and a blocking one;
    the endpoint is also the one the simulator saw the request at."""
    streams: list[Any] = []
    before = len(sim.records())
    with sync_client(sim, budgets=Budgets(first_token=0.3)) as client:
        done = run(
            Prompt("Hi", model=MODEL),
            store=store,
            client=client,
            on_stream=streams.append,
            sim={"output_tokens": 5},
        )
        late = run(
            Prompt("z" * 400, model=MODEL),
            store=store,
            client=client,
            on_stream=streams.append,
            sim={"prefill_tps": 10},
            raise_errors=False,
        )
        blocking = run(
            Prompt("Hi", model=MODEL),
            store=store,
            client=client,
            mode="blocking",
            timeout=10,
            sim={"output_tokens": 3},
        )
    assert (done.status, late.status, blocking.status) == ("ok", "first_token_timeout", "ok")
    sent = chat_paths(sim, before)
    assert len(sent) == 3, sent
    for result, stream, path in zip((done, late), streams, sent[:2], strict=True):
        rec = store.get_run(result.run_id)
        assert rec.api == stream.api == api_of(path)
        for name in PROGRESS_FIGURES:
            assert getattr(rec, name) == getattr(result.stats, name), name
    rec = store.get_run(blocking.run_id)
    assert rec.api == api_of(sent[2]) == "openai"  # complete() posts to /chat/completions
    for name in PROGRESS_FIGURES:
        assert getattr(rec, name) == getattr(blocking.stats, name), name


@pytest.mark.anyio
async def test_a_run_is_recorded_before_a_repeated_cancellation_goes_on() -> None:
    """The final write is not abandoned by a second cancel (``asyncio.shield`` alone would be):
    the cancelled caller hears of it only once the write is done."""
    from lmstream_nb._run import _despite_cancellation

    release = asyncio.Event()
    written: list[str] = []

    async def write() -> None:
        await release.wait()
        written.append("row")

    task = asyncio.create_task(_despite_cancellation(write()))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done(), "a cancel must not cut the write short"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert written == ["row"]


@pytest.mark.anyio
async def test_a_run_cancelled_while_its_row_is_written_is_recorded_as_cancelled(
    sim: simulator.SimServer, tmp_path: Path
) -> None:
    """The row is written in a worker thread, which finishes even when the run is cancelled
    meanwhile (a batch being stopped): the run must then end as cancelled, not unfinished."""
    import threading

    class SlowToRecord(PromptStore):
        entered = threading.Event()
        release = threading.Event()

        def start_run(self, **fields: Any) -> int:
            self.entered.set()
            assert self.release.wait(10)
            return super().start_run(**fields)

    store = SlowToRecord(tmp_path / "slow.db")
    task = asyncio.create_task(arun(Prompt("Hi"), store=store, base_url=sim.base_url, model=MODEL))
    assert await asyncio.to_thread(store.entered.wait, 10)
    task.cancel()
    store.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    [run] = store.history()
    assert run.status == "cancelled"
    store.close()


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"temperature": 5}, "temperature=5 is not a number from 0 to 2"),
        ({"max_tokens": 0}, "max_tokens=0 is not a whole number from 1 to 2147483647, or -1"),
    ],
)
def test_settings_out_of_range_are_refused_before_anything_is_recorded(
    sim: simulator.SimServer, store: PromptStore, kwargs: dict[str, Any], shown: str
) -> None:
    with pytest.raises(InvalidSetting) as caught:
        run(Prompt("Say {{x}}"), {"x": "hi"}, store=store, base_url=sim.base_url, **kwargs)
    assert str(caught.value).startswith(shown)
    assert str(caught.value).endswith("= such a value.")  # the keyword argument to fix
    with pytest.raises(InvalidSetting):  # a batch refuses it once, before any row
        run_many(
            Prompt("Say {{x}}"),
            [{"x": "a"}],
            store=store,
            base_url=sim.base_url,
            progress=False,
            **kwargs,
        )
    with pytest.raises(InvalidSetting):  # an inline prompt's own setting too
        run(Prompt("Say {{x}}", **kwargs), {"x": "hi"}, store=store, base_url=sim.base_url)
    assert len(store.history()) == 0


def test_python_errors_name_keyword_arguments_and_attributes(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    with pytest.raises(StreamStalled) as caught:
        run(
            Prompt('Story. [[sim {"stall_at": 3, "stall_s": 30}]]'),
            store=store,
            base_url=sim.base_url,
            budgets=Budgets(idle=0.5),
        )
    said = str(caught.value)
    assert "kept in .partial_text; raise idle_timeout" in said
    assert render(caught.value) == said == render(caught.value, "python")
    assert "--idle-timeout" in render(caught.value, "cli")
    assert "Idle s (under Advanced)" in render(caught.value, "runner")
    [recorded] = store.history()
    assert recorded.error == said


# -- an estimate of the wait where the server reports nothing -------------------------------------


def sizes_run(client: SyncLMStudioClient, store: PromptStore, chars: int) -> list[Any]:
    seen: list[Any] = []
    # The scenario goes in the prompt: a "sim" setting would keep the request off the native
    # chat, which takes no such setting.
    result = run(
        Prompt('[[sim {"output_tokens": 2}]]' + "x" * chars, model=MODEL),
        store=store,
        client=client,
        on_event=seen.append,
    )
    assert result.ok
    return seen


def test_a_silent_server_gets_an_estimate_once_the_history_can_tell(store: PromptStore) -> None:
    """LM Studio 0.3 reports nothing while it processes the prompt: after enough runs of the
    model there, each stream starts with one estimate, right after it started."""
    slow = simulator.Scenario(prefill_tps=4000, jitter=0)
    with (
        simulator.serve(profile="test-fast", defaults=slow, native_api=False) as silent,
        sync_client(silent) as client,
    ):
        for i in range(MIN_RUNS):
            seen = sizes_run(client, store, 400 * (i + 1))
            assert not [e for e in seen if isinstance(e, PromptEstimate)], "too few runs yet"
        seen = sizes_run(client, store, 1800)
    kinds = [type(e).__name__ for e in seen]
    assert kinds[:2] == ["StreamStarted", "PromptEstimate"], kinds
    assert kinds.count("PromptEstimate") == 1
    guess = seen[1]
    assert guess.runs == MIN_RUNS
    assert 0 <= guess.elapsed_s < guess.expected_s
    # 1,800 chars are 450 tokens at 4,000 tokens/s: 0.11 s of prompt processing and more.
    assert guess.expected_s > 0.1


def test_a_server_that_reports_progress_gets_no_estimate(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    with sync_client(sim) as client:
        for i in range(MIN_RUNS + 1):
            seen = sizes_run(client, store, 400 * (i + 1))
            assert not [e for e in seen if isinstance(e, PromptEstimate)]
            assert [e.api for e in seen if isinstance(e, StreamStarted)] == ["native"]


def test_a_store_that_cannot_estimate_leaves_the_run_alone(store: PromptStore) -> None:
    """The estimate is a courtesy: its query failing (here its index is gone) costs nothing."""
    with (
        simulator.serve(profile="test-fast", native_api=False) as silent,
        sync_client(silent) as client,
    ):
        for i in range(MIN_RUNS):
            sizes_run(client, store, 400 * (i + 1))
        store._connection().execute("DROP INDEX runs_first_token_history")
        seen = sizes_run(client, store, 1000)
    assert not [e for e in seen if isinstance(e, PromptEstimate)]
    assert [type(e).__name__ for e in seen][-1] == "StreamFinished"


# -- structured output -------------------------------------------------------------------------

ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "price": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "price", "tags"],
}


def test_a_schema_is_sent_and_the_answer_parsed(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    seen: list[Any] = []
    with sync_client(sim) as client:
        result = run(
            Prompt("Describe a {{thing}}.", model=MODEL),
            {"thing": "kettle"},
            schema=ITEM_SCHEMA,
            store=store,
            client=client,
            on_event=seen.append,
        )
        again = run(
            Prompt("Describe a {{thing}}.", model=MODEL),
            {"thing": "kettle"},
            schema=ITEM_SCHEMA,
            store=store,
            client=client,
        )
    assert result.status == "ok"
    assert set(result.parsed) == {"name", "price", "tags"}
    assert isinstance(result.parsed["price"], float)
    assert again.parsed == result.parsed  # the simulator's JSON is seeded
    assert sum(isinstance(e, TextDelta) for e in seen) > 3  # it still streamed in pieces
    record = sim.chats()[-1]
    # LM Studio's native chat takes no response_format: the request went to /chat/completions.
    assert record.path == "/v1/chat/completions"
    assert record.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": True, "schema": ITEM_SCHEMA},
    }
    assert store.get_run(result.run_id).api == "openai"


@pytest.mark.parametrize(
    ("fault", "path", "said"),
    [
        ("invalid_json", "$", "The answer is not valid JSON"),
        ("wrong_type", "$.name", "The answer does not match the schema at $.name: 12345 is not"),
    ],
)
def test_an_answer_that_breaks_the_schema_is_recorded_with_its_text(
    sim: simulator.SimServer, store: PromptStore, fault: str, path: str, said: str
) -> None:
    prompt = Prompt("Describe a kettle.", model=MODEL)
    with sync_client(sim) as client:
        with pytest.raises(InvalidOutput) as info:
            run(prompt, schema=ITEM_SCHEMA, store=store, client=client, sim={"schema_fault": fault})
        result = run(
            prompt,
            schema=ITEM_SCHEMA,
            store=store,
            client=client,
            sim={"schema_fault": fault},
            raise_errors=False,
        )
    assert info.value.path == path
    assert str(info.value).startswith(said)
    assert info.value.run_id is not None
    assert (result.status, result.parsed) == ("invalid_output", None)
    assert result.error is not None
    assert result.error.startswith(said)
    assert result.text
    assert result.text == info.value.text
    record = store.get_run(result.run_id)
    assert (record.status, record.text, record.error) == (
        "invalid_output",
        result.text,
        result.error,
    )


def test_a_bad_schema_is_refused_before_anything_is_sent(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    before = len(sim.chats())
    with (
        sync_client(sim) as client,
        pytest.raises(InvalidSchema, match=r"not a valid JSON Schema at \$\.type"),
    ):
        run(Prompt("x", model=MODEL), schema={"type": 3}, store=store, client=client)
    assert len(sim.chats()) == before
    assert store.history() == []


def test_an_answer_cut_at_max_tokens_says_so(sim: simulator.SimServer, store: PromptStore) -> None:
    with sync_client(sim) as client:
        result = run(
            Prompt("Describe a kettle.", model=MODEL),
            schema=ITEM_SCHEMA,
            store=store,
            client=client,
            max_tokens=2,
            raise_errors=False,
        )
    assert (result.status, result.finish_reason) == ("invalid_output", "length")
    assert result.error is not None
    assert result.error.startswith("The answer stopped at the max tokens limit")
    assert store.get_run(result.run_id).text == result.text


def test_a_schema_run_on_llamacpp_still_reports_prompt_progress(store: PromptStore) -> None:
    """The route for structured output is /chat/completions; llama.cpp reports progress there."""
    seen: list[Any] = []
    defaults = simulator.Scenario(dialect="llamacpp")
    with (
        simulator.serve(profile="test-fast", defaults=defaults) as llamacpp,
        sync_client(llamacpp) as client,
    ):
        result = run(
            Prompt("t" * 8000, model=MODEL),
            schema=ITEM_SCHEMA,
            store=store,
            client=client,
            on_event=seen.append,
            sim={"batch_size": 512},
        )
        record = llamacpp.chats()[-1]
    assert result.status == "ok"
    assert set(result.parsed) == {"name", "price", "tags"}
    assert record.response_format["type"] == "json_schema"
    assert any(isinstance(e, PromptProgress) for e in seen)
    assert not any(isinstance(e, PromptEstimate) for e in seen)
