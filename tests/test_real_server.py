"""The client and the CLI against a server nobody here wrote: llama.cpp's own ``llama-server``.

``tools/llama_server.py`` (the project's launcher) builds it once (about 6 minutes on 2 cores,
then cached) and serves SmolLM2-135M as ``smollm2`` on 127.0.0.1. Its wire format differs from
LM Studio's (``content: null`` openers, ``timings``, plain-JSON 400s on stream requests), which
is the point. A second server, with four slots and small batches, reports prompt progress
often enough for the progress tests to stay short. These tests are skipped, with the reason
shown, only when the build is impossible here (no compiler or cmake); a build that fails is a
test failure.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from notebook_kernel import running_kernel
from pty_run import read_stderr_on_a_terminal
from real_llama import Server, launcher
from waiting import wait_until

from lmstream_nb import (
    Budgets,
    ChatStream,
    Event,
    LMStudioClient,
    Prompt,
    PromptProgress,
    PromptStore,
    PromptTooLong,
    StreamFinished,
    TextDelta,
    arun,
)

# The first test also pays for the one-time build; the clients below carry their own budgets.
pytestmark = [pytest.mark.real_server, pytest.mark.anyio, pytest.mark.timeout(1700)]

MODEL = "smollm2"
BUDGETS = Budgets(connect=10, first_token=120, idle=30)


def wait_for_log(server: Server, needle: str, offset: int, timeout: float) -> str:
    """The server's log after ``offset`` once it holds ``needle`` (an external process offers
    no event to wait on, so this polls, bounded)."""
    return wait_until(
        lambda: needle in (text := server.log_text(offset)) and text,
        timeout=timeout,
        what=f"the server logged {needle!r}",
    )


def started(**knobs: int) -> Server:
    """A server with the launcher's ``knobs``; skipped only when it cannot be built here."""
    reason = launcher.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    try:
        return launcher.start(**knobs)
    except launcher.Unavailable as exc:
        pytest.fail(f"llama.cpp's server did not start: {exc}")


@pytest.fixture(scope="module")
def real_server() -> Iterator[Server]:
    """The launcher's defaults: one slot, an 8192-token context, batches of 2048 tokens."""
    with started() as server:
        yield server


# llama.cpp reports prompt progress once per batch: batches of 256 tokens give a report about
# every second on 2 idle cores (it processes 150-290 prompt tokens/s there), every 5-15 s on a
# busy machine. Four slots of 4096 tokens each.
SLOTS = 4
SLOT_CONTEXT = 4096
BATCH = 256


@pytest.fixture(scope="module")
def progress_server() -> Iterator[Server]:
    with started(n_ctx=SLOTS * SLOT_CONTEXT, n_parallel=SLOTS, n_batch=BATCH) as server:
        yield server


async def test_streams_text_with_usage(real_server: Server) -> None:
    async with LMStudioClient(real_server.base_url, budgets=BUDGETS) as client:
        assert MODEL in await client.list_models()
        stream = client.stream_chat(
            "Write one sentence about rivers.", model=MODEL, max_tokens=32, temperature=0
        )
        done = await stream.collect()
    assert done.text.strip()
    assert done.finish_reason in ("stop", "length")
    assert done.stats.completion_tokens
    assert done.stats.completion_tokens > 0
    assert done.stats.prompt_tokens
    assert done.stats.prompt_tokens > 0
    assert done.stats.tokens_per_s
    assert done.stats.tokens_per_s > 0
    assert done.stats.ttft_s is not None


async def test_streamed_text_equals_blocking_text(real_server: Server) -> None:
    """The same greedy answer either way, however loaded the machine is.

    ``cache_prompt: false`` makes both requests evaluate the whole prompt from scratch: with the
    cache on (llama.cpp's default) the second request re-evaluates only the prompt's last token,
    in a batch of one, and llama.cpp does not promise bit-identical logits across batch sizes.
    The blocking request has no total timeout: on a busy machine a 24-token answer was measured
    taking 63 s, so any figure load can reach would make this a test of the machine.
    """
    prompt = "Name three colours."
    same = {"max_tokens": 24, "temperature": 0, "seed": 1, "cache_prompt": False}
    async with LMStudioClient(real_server.base_url, budgets=BUDGETS) as client:
        streamed = await client.stream_chat(prompt, model=MODEL, **same).collect()
        blocking = await client.complete(prompt, model=MODEL, **same)
    assert streamed.text.strip()
    assert streamed.text == blocking.text


async def test_cancellation_stops_generation_on_the_server(real_server: Server) -> None:
    offset = real_server.log.stat().st_size
    async with LMStudioClient(real_server.base_url, budgets=BUDGETS) as client:
        stream = client.stream_chat(
            "Write a very long story about a lighthouse keeper.", model=MODEL, max_tokens=4000
        )
        received = 0
        async with stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    received += 1
                    if received == 5:
                        break
    log = wait_for_log(real_server, "cancel task", offset, timeout=10)
    assert "cancel task" in log, log[-2000:]
    assert received == 5


async def test_server_refusing_a_prompt_over_its_context_is_one_clear_sentence(
    real_server: Server,
) -> None:
    """The server's own refusal (400), for when the check before sending is switched off."""
    async with LMStudioClient(real_server.base_url, budgets=BUDGETS, check_context=False) as client:
        with pytest.raises(PromptTooLong) as info:
            await client.stream_chat("word " * 12000, model=MODEL, max_tokens=8).collect()
    message = str(info.value)
    assert info.value.status == 400
    assert "context" in message
    assert "shorten the prompt" in message
    assert message.count(". ") == 0, "one sentence"


def test_cli_run_and_models(real_server: Server) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmstream_nb",
            "run",
            "Say hello to {{name}}.",
            "--var",
            "name=Ada",
            "--base-url",
            real_server.base_url,
            "--max-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "tokens/s" in run.stderr
    models = subprocess.run(
        [sys.executable, "-m", "lmstream_nb", "models", "--base-url", real_server.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert models.returncode == 0
    assert MODEL in models.stdout.split()


def test_cli_prompt_too_long_exits_with_one_sentence(real_server: Server) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmstream_nb",
            "run",
            "-",
            "--base-url",
            real_server.base_url,
            "--model",
            MODEL,
        ],
        input="word " * 12000,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0
    assert "context" in run.stderr


# Prompt progress (llama.cpp's ``return_progress``) and the context check before sending.


def long_prompt(tag: str, words: int) -> str:
    """About ``words`` + 40 tokens. The tag comes first, so two prompts share no more than the
    chat template's opening with each other: a slot's prompt cache cannot shorten the next one."""
    return f"Text {tag}: " + "word " * words + "\nHow many words were there?"


def ask(client: LMStudioClient, prompt: str, budgets: Budgets | None = None) -> ChatStream:
    """A short answer that has text: the model may end at once after such a prompt, so
    ``ignore_eos`` (llama.cpp's) makes it write its 4 tokens."""
    return client.stream_chat(
        prompt, model=MODEL, max_tokens=4, temperature=0, ignore_eos=True, budgets=budgets
    )


def count_tokens(server: Server, prompt: str) -> int:
    """The prompt's size as the server counts it (its chat template included)."""
    answer = httpx.post(
        f"{server.base_url}/chat/completions/input_tokens",
        json={"messages": [{"role": "user", "content": prompt}]},
        timeout=60,
    )
    answer.raise_for_status()
    tokens: int = answer.json()["input_tokens"]
    return tokens


def slots(server: Server) -> list[dict[str, Any]]:
    answer = httpx.get(server.base_url.removesuffix("/v1") + "/slots", timeout=60)
    answer.raise_for_status()
    listed: list[dict[str, Any]] = answer.json()
    return listed


async def timed(stream: ChatStream) -> list[tuple[float, Event]]:
    """Every event of ``stream`` with the seconds since it was asked for (the request is sent
    when the first event is awaited)."""
    t0 = time.monotonic()
    seen: list[tuple[float, Event]] = []
    async with stream:
        async for event in stream:
            seen.append((time.monotonic() - t0, event))
    return seen


def progress_before_text(seen: list[tuple[float, Event]]) -> list[tuple[float, PromptProgress]]:
    """The PromptProgress events before the first TextDelta, and a check that none follows."""
    first_text = next(i for i, (_, event) in enumerate(seen) if isinstance(event, TextDelta))
    after = [e for _, e in seen[first_text:] if isinstance(e, PromptProgress)]
    assert not after, f"prompt progress after the first token: {after}"
    return [(t, e) for t, e in seen[:first_text] if isinstance(e, PromptProgress)]


def assert_rising(progress: list[PromptProgress], total: int) -> None:
    fractions = [e.fraction for e in progress]
    processed = [e.processed or 0 for e in progress]
    assert all(0 <= f <= 1 for f in fractions), fractions
    assert all(a < b for a, b in pairwise(fractions)), f"not rising: {fractions}"
    assert all(a < b for a, b in pairwise(processed)), f"not rising: {processed}"
    assert {e.total for e in progress} == {total}, [e.total for e in progress]


def finished_of(seen: list[tuple[float, Event]]) -> StreamFinished:
    last = seen[-1][1]
    assert isinstance(last, StreamFinished), last
    return last


async def test_long_prompt_reports_rising_progress_before_its_first_token(
    progress_server: Server,
) -> None:
    prompt = long_prompt("rising", 2000)
    total = count_tokens(progress_server, prompt)
    async with LMStudioClient(progress_server.base_url, budgets=BUDGETS) as client:
        seen = await timed(ask(client, prompt))
    progress = progress_before_text(seen)
    assert len(progress) >= 2, f"{len(progress)} progress events for {total} prompt tokens"
    assert_rising([e for _, e in progress], total)
    first_at = progress[0][0]
    assert first_at < 2.0, f"the first progress came {first_at:.2f} s after sending"
    stats = finished_of(seen).stats
    assert stats.prompt_tokens == total
    assert stats.first_progress_s is not None
    assert stats.first_progress_s <= first_at
    assert stats.prompt_s is not None
    assert stats.prompt_s > 0
    assert stats.prompt_tokens_per_s is not None
    assert stats.prompt_tokens_per_s > 0


async def test_progress_keeps_a_prompt_alive_past_its_first_token_budget(
    progress_server: Server,
) -> None:
    budget = 2.0  # the first progress comes within it, the first token long after it
    budgets = Budgets(connect=10, first_token=budget, idle=60)  # idle: far above one batch
    async with LMStudioClient(progress_server.base_url) as client:
        done = await ask(client, long_prompt("budget", 2000), budgets).collect()
    assert done.text
    assert done.stats.ttft_s is not None
    assert done.stats.ttft_s > 2 * budget, (
        f"the prompt was processed in {done.stats.ttft_s:.1f} s, too fast to test the budget: "
        "lengthen it"
    )


async def test_four_prompts_at_once_in_four_slots_each_report_their_own_progress(
    progress_server: Server,
) -> None:
    """Four prompts at once, of four sizes. llama.cpp fills each batch slot by slot, so a
    prompt may wait (its progress repeated, not advancing) while the others are processed:
    the budgets are wide enough for that."""
    prompts = [long_prompt(f"slot {k}", 500 + 60 * k) for k in range(SLOTS)]
    totals = [count_tokens(progress_server, p) for p in prompts]
    assert len(set(totals)) == SLOTS
    before = slots(progress_server)
    waiting = Budgets(connect=10, first_token=300, idle=300)
    async with LMStudioClient(progress_server.base_url, budgets=waiting) as client:
        runs = await asyncio.gather(*(timed(ask(client, p)) for p in prompts))
    after = slots(progress_server)
    pairs = zip(before, after, strict=True)
    moved = [old["id"] for old, new in pairs if old.get("id_task") != new.get("id_task")]
    assert len(moved) == SLOTS, f"only slots {moved} took one of the prompts"
    for total, seen in zip(totals, runs, strict=True):
        progress = progress_before_text(seen)
        assert len(progress) >= 2, f"{len(progress)} progress events for {total} tokens"
        assert_rising([e for _, e in progress], total)
        assert finished_of(seen).stats.prompt_tokens == total


@pytest.mark.parametrize(
    ("which", "context"), [("real_server", 8192), ("progress_server", SLOT_CONTEXT)]
)
async def test_prompt_over_the_context_is_refused_before_it_is_sent(
    which: str, context: int, request: pytest.FixtureRequest
) -> None:
    """With several slots the context that counts is one slot's share of it."""
    server: Server = request.getfixturevalue(which)
    prompt = long_prompt("too long", context + 500)
    tokens = count_tokens(server, prompt)
    before = slots(server)
    offset = server.log.stat().st_size
    async with LMStudioClient(server.base_url, budgets=BUDGETS) as client:
        with pytest.raises(PromptTooLong) as info:
            await client.stream_chat(prompt, model=MODEL, max_tokens=8).collect()
    assert info.value.prompt_tokens == tokens
    assert info.value.context_length == context
    message = str(info.value)
    for number in (tokens, context):
        assert str(number) in message or f"{number:,}" in message, message
    assert message.count(". ") == 0, "one sentence"
    # Nothing reached a slot: the slots' last tasks are the ones before, and the log names
    # neither a new task nor the server's own refusal.
    after = slots(server)
    assert [s.get("id_task") for s in after] == [s.get("id_task") for s in before]
    assert not any(s["is_processing"] for s in after)
    log = server.log_text(offset)
    assert "launch_slot_" not in log, log[-2000:]
    assert "exceeds the available context size" not in log, log[-2000:]


def test_a_terminal_shows_the_real_servers_progress_as_a_moving_bar(
    progress_server: Server,
) -> None:
    """What a person sees in a terminal while llama.cpp processes a long prompt."""
    status, _, seen = read_stderr_on_a_terminal(
        "run",
        long_prompt("terminal", 1200),
        "--base-url",
        progress_server.base_url,
        "--model",
        MODEL,
        "--max-tokens",
        "4",
        timeout=240,
    )
    assert status == 0, seen[-400:]
    lines = [part.decode() for part in seen.split(b"\r") if b"processing prompt" in part]
    percents = [int(line.split("▏ ")[1].split("%")[0]) for line in lines]
    assert len(set(percents)) >= 2, f"the bar moved: {percents}"
    assert percents == sorted(percents)
    assert any(" tokens · " in line for line in lines), "llama.cpp counts the tokens"
    assert any("left" in line for line in lines), "an estimate of the time left"


def test_the_notebook_view_shows_the_real_servers_progress_before_any_text(
    progress_server: Server, tmp_path: Path
) -> None:
    """``%%lmstream`` in a real kernel: the view's bar moves with llama.cpp's reports, and
    the text (if the model writes any) comes after them."""
    env = {**os.environ, "LMSTREAM_HOME": str(tmp_path), "LMSTREAM_BASE_URL": "http://0.invalid"}
    with running_kernel(env) as kernel:
        assert kernel.execute("%load_ext lmstream_nb").status == "ok"
        cell = kernel.execute(
            f"%%lmstream --base-url {progress_server.base_url} --model {MODEL} --max-tokens 4\n"
            + long_prompt("view", 1200),
            timeout=240,
        )
        assert cell.status == "ok", cell.error()
        [widget] = cell.widget_ids()
        customs = [
            msg["content"]["data"]["content"]
            for msg in kernel.comm_msgs[widget]
            if msg["content"].get("data", {}).get("method") == "custom"
        ]
    bars = [c["p"] for c in customs if "p" in c]
    fractions = [b["f"] for b in bars]
    assert len(set(fractions)) >= 2, f"the bar moved: {fractions}"
    assert fractions == sorted(fractions)
    assert all(b["w"] == "processing prompt" for b in bars)
    assert any(" tokens \u00b7 " in b["x"] for b in bars), "llama.cpp counts the tokens"
    texts = [i for i, c in enumerate(customs) if c.get("t")]
    assert not texts or texts[0] > max(i for i, c in enumerate(customs) if "p" in c)
    [final] = cell.finals()
    assert final["text/plain"].startswith("lmstream: done")


async def test_structured_output_is_parsed_and_validated(
    real_server: Server, tmp_path: Path
) -> None:
    """llama.cpp takes a ``json_schema`` response_format as a grammar (since its PR #9527), so
    even a 135M model answers with JSON that matches; the client parses and checks it."""
    schema = {
        "type": "object",
        "properties": {"sunny": {"type": "boolean"}},
        "required": ["sunny"],
        "additionalProperties": False,
    }
    with PromptStore(tmp_path / "runs.db") as store:
        async with LMStudioClient(real_server.base_url, budgets=BUDGETS) as client:
            result = await arun(
                Prompt("Is it sunny in the desert? Answer in JSON.", model=MODEL),
                schema=schema,
                store=store,
                client=client,
                max_tokens=40,
                temperature=0,
            )
        record = store.get_run(result.run_id)
    assert result.status == "ok", result.error
    assert set(result.parsed) == {"sunny"}
    assert isinstance(result.parsed["sunny"], bool)
    assert (record.status, record.api, record.text) == ("ok", "openai", result.text)


async def test_a_two_turn_conversation(real_server: Server, tmp_path: Path) -> None:
    """The second turn carries the first and its answer to /chat/completions; llama.cpp counts
    them (its prompt is longer by at least the first answer) and both turns are recorded."""
    from lmstream_nb import Conversation, PromptStore

    with PromptStore(tmp_path / "runs.db") as store:
        async with LMStudioClient(real_server.base_url, budgets=BUDGETS) as client:
            chat = Conversation("real", model=MODEL, store=store, client=client)
            settings = {"max_tokens": 8, "temperature": 0}
            first = await chat.asend("Name a colour.", options=settings)
            second = await chat.asend("Name another.", options=settings)
        turns = chat.turns
        sent = store.get_run(second.run_id)
    assert (first.status, second.status) == ("ok", "ok")
    assert [(t.user, t.answer) for t in turns] == [
        ("Name a colour.", first.text),
        ("Name another.", second.text),
    ]
    assert sent.api == "openai"
    # The turn stores what it added; the two messages before it are the first turn's.
    assert sent.messages == [{"role": "user", "content": "Name another."}]
    assert sent.context_messages == 2
    assert first.stats.prompt_tokens is not None
    assert second.stats.prompt_tokens is not None
    assert first.stats.completion_tokens is not None
    assert second.stats.prompt_tokens >= first.stats.prompt_tokens + first.stats.completion_tokens


async def test_a_conversation_over_the_context_is_refused_before_sending(tmp_path: Path) -> None:
    """llama.cpp counts the turns with its own tokenizer: the second message (about 450
    tokens), with the first turn, no longer fits a 512-token context, so it is refused with
    both numbers and never sent; leaving the oldest turn out lets it through."""
    from lmstream_nb import Conversation, ConversationTooLong, PromptStore

    words = " ".join(["river"] * 150)  # about 150 tokens each
    with started(n_ctx=512) as server, PromptStore(tmp_path / "runs.db") as store:
        async with LMStudioClient(server.base_url, budgets=BUDGETS) as client:
            chat = Conversation("small", model=MODEL, store=store, client=client)
            settings = {"max_tokens": 4, "temperature": 0}
            await chat.asend(f"Count: {words}", options=settings)
            runs = len(store.history(limit=None))
            with pytest.raises(ConversationTooLong) as refused:
                await chat.asend(f"Again, {words} {words} {words}", options=settings)
            assert len(store.history(limit=None)) == runs, "nothing was sent or recorded"
            done = await chat.asend(
                f"Again, {words} {words} {words}", drop_oldest=True, options=settings
            )
        turns = chat.turns
    error = refused.value
    assert error.context_length == 512
    assert error.prompt_tokens is not None
    assert error.prompt_tokens >= 512
    assert f"{error.prompt_tokens:,} tokens" in str(error)
    assert done.ok
    assert [t.in_context for t in turns] == [False, True]


async def test_two_versions_side_by_side_with_their_parsed_fields(
    real_server: Server, tmp_path: Path
) -> None:
    """compare() on llama.cpp: every (version, row) cell runs and is recorded under one id;
    the version with a schema gets its parsed fields as columns, the other none."""
    from lmstream_nb import acompare

    schema = {
        "type": "object",
        "properties": {"sunny": {"type": "boolean"}},
        "required": ["sunny"],
        "additionalProperties": False,
    }
    with PromptStore(tmp_path / "runs.db") as store:
        store.save("weather", "Is it sunny in {{place}}? One word.", model=MODEL)
        store.save("weather", "Is it sunny in {{place}}? Answer in JSON.", schema=schema)
        result = await acompare(
            ["weather@1", "weather@2"],
            rows=[{"place": "the desert"}, {"place": "Oslo"}],
            store=store,
            base_url=real_server.base_url,
            budgets=BUDGETS,
            progress=False,
            max_tokens=12,
            temperature=0,
        )
        recorded = store.history(batch=result.comparison_id, limit=None)
    frame = result.to_pandas()
    assert list(frame["status"]) == ["ok"] * 4, list(frame["error"])
    assert sorted(r.id for r in recorded) == sorted(frame["run_id"])
    with_schema = frame[frame["version"] == "weather@2"]
    assert all(isinstance(v, bool) for v in with_schema["parsed.sunny"])
    assert list(frame[frame["version"] == "weather@1"]["parsed.sunny"]) == [None, None]
    assert list(result.summary()["success_rate"]) == [1.0, 1.0]
