"""Conversations against the simulator: what each turn sent, what the store kept."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from lmstream_nb import (
    Conversation,
    ConversationBusy,
    ConversationNotFound,
    ConversationTooLong,
    LMStudioClient,
    PromptProgress,
    PromptStore,
    PromptTooLong,
    StoreError,
    SyncLMStudioClient,
    TextDelta,
    UnknownVariables,
    simulator,
)
from lmstream_nb._errors import render

MODEL = "lmstream-sim-8b"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PromptStore]:
    with PromptStore(tmp_path / "runs.db") as s:
        s.save("tutor", "Explain {{topic}}.", system="You teach {{level}} students.")
        yield s


def sent(sim: simulator.SimServer, since: int) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """(path, messages) of each chat request the simulator received after its first ``since``."""
    return [(r.path, r.messages) for r in sim.records()[since:] if r.method == "POST"]


def reply(text: str) -> dict[str, Any]:
    return {"sim": {"reply": text}}


def test_turns_are_sent_with_the_turns_before_them_and_recorded(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    before = len(sim.records())
    with SyncLMStudioClient(sim.base_url) as client:
        chat = Conversation("lesson", "tutor", model=MODEL, store=store, client=client)
        # No scenario for the first turn: a "sim" field would not fit the native chat.
        first = chat.send(topic="tides", level="first-year")
        second = chat.send("And the sun?", options=reply("It pulls less."))
    assert first.text
    assert second.text == "It pulls less."
    assert (first.prompt, second.prompt) == ("tutor@1 (chat lesson)", "chat lesson")
    requests = sent(sim, before)
    # The first turn fits LM Studio's native chat; the second carries an answer, so it goes to
    # /chat/completions with the whole conversation.
    assert requests[0][0] == "/api/v1/chat"
    assert requests[0][1] == (
        ("system", "You teach first-year students."),
        ("user", "Explain tides."),
    )
    assert requests[1][0] == "/v1/chat/completions"
    assert requests[1][1] == (
        ("system", "You teach first-year students."),
        ("user", "Explain tides."),
        ("assistant", first.text),
        ("user", "And the sun?"),
    )
    # Read back from the store, also by a new object for the same name.
    again = Conversation("lesson", store=store)
    assert [(t.user, t.answer, t.status) for t in again.turns] == [
        ("Explain tides.", first.text, "ok"),
        ("And the sun?", "It pulls less.", "ok"),
    ]
    assert again.prompt is not None
    assert again.prompt.name == "tutor"
    # Each turn is an ordinary run in the history.
    assert [r.id for r in store.history(limit=2)] == [second.run_id, first.run_id]
    assert store.get_run(second.run_id).api == "openai"


def test_a_turn_stores_only_what_it_added(sim: simulator.SimServer, store: PromptStore) -> None:
    """The context a turn sends is the turns before it, which their runs hold: a turn stores
    its own message and the number of messages before it, so a conversation's size grows with
    its length, not its square, and the last request still carried every turn."""
    before = len(sim.records())
    with SyncLMStudioClient(sim.base_url) as client:
        chat = Conversation("long", "tutor", model=MODEL, store=store, client=client)
        results = [chat.send(topic="tides", level="young", options=reply("One."))]
        results += [chat.send(f"Question {i}?", options=reply(f"Answer {i}.")) for i in range(5)]
    runs = [store.get_run(r.run_id) for r in results]
    assert [len(r.messages) for r in runs] == [2, 1, 1, 1, 1, 1]
    assert [r.context_messages for r in runs] == [0, 3, 5, 7, 9, 11]
    assert runs[-1].messages == [{"role": "user", "content": "Question 4?"}]
    last = sent(sim, before)[-1][1]
    assert len(last) == 12
    assert last[-3:] == (
        ("user", "Question 3?"),
        ("assistant", "Answer 3."),
        ("user", "Question 4?"),
    )
    assert [t.answer for t in chat.turns] == ["One.", *(f"Answer {i}." for i in range(5))]


def test_a_fork_goes_on_separately(sim: simulator.SimServer, store: PromptStore) -> None:
    before = len(sim.records())
    with SyncLMStudioClient(sim.base_url) as client:
        chat = Conversation("trip", model=MODEL, store=store, client=client)
        chat.send("Plan a day in Lyon.", options=reply("Start at Fourvière."))
        other = chat.fork("trip-rain")
        chat.send("And the evening?", options=reply("Dinner in a bouchon."))
        other.send("It rains.", options=reply("Visit the museums."))
    requests = sent(sim, before)
    assert requests[2][1] == (
        ("user", "Plan a day in Lyon."),
        ("assistant", "Start at Fourvière."),
        ("user", "It rains."),
    )
    assert [t.user for t in chat.turns] == ["Plan a day in Lyon.", "And the evening?"]
    assert [t.user for t in other.turns] == ["Plan a day in Lyon.", "It rains."]
    forked = store.conversation("trip-rain")
    assert forked.forked_from == store.conversation("trip").id


def test_a_later_turn_takes_the_system_prompts_values_and_leaves_them_out(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    """The same values work for every turn of a stored prompt: the system prompt's are used on
    the first turn and not needed after it (nor refused); a name the prompt lacks still is."""
    before = len(sim.records())
    with SyncLMStudioClient(sim.base_url) as client:
        chat = Conversation("again", "tutor", model=MODEL, store=store, client=client)
        chat.send(topic="tides", level="young", options=reply("Water moves."))
        second = chat.send(topic="waves", level="young", options=reply("Wind."))
        with pytest.raises(UnknownVariables):
            chat.send(topic="waves", levle="young")
    assert sent(sim, before)[-1][1][-1] == ("user", "Explain waves.")
    assert store.get_run(second.run_id).variables == {"topic": "waves"}


def test_reset_starts_again_and_keeps_the_history(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    before = len(sim.records())
    with SyncLMStudioClient(sim.base_url) as client:
        chat = Conversation("quiz", "tutor", model=MODEL, store=store, client=client)
        chat.send(topic="rivers", level="young")
        chat.send("More.")
        chat.reset()
        assert chat.turns == []
        chat.send(topic="lakes", level="older")
    requests = sent(sim, before)
    assert requests[-1][1] == (("system", "You teach older students."), ("user", "Explain lakes."))
    assert len(store.history(limit=None)) == 3


def test_a_failed_turn_is_recorded_but_not_sent_again_unless_asked(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    before = len(sim.records())
    with SyncLMStudioClient(sim.base_url) as client:
        chat = Conversation("fail", model=MODEL, store=store, client=client)
        chat.send("One.", options=reply("Uno."))
        broken = chat.send(
            "Two.",
            options={"sim": {"reply": "Dos y mas.", "error_at": 2}, "raise_errors": False},
        )
        chat.send("Three.", options=reply("Tres."))
        chat.send("Four.", include_failed=True, options=reply("Cuatro."))
    assert broken.status == "error"
    assert broken.text, "the failed turn had partial text"
    requests = sent(sim, before)
    assert requests[2][1] == (
        ("user", "One."),
        ("assistant", "Uno."),
        ("user", "Three."),
    )
    assert requests[3][1] == (
        ("user", "One."),
        ("assistant", "Uno."),
        ("user", "Two."),
        ("assistant", broken.text),
        ("user", "Three."),
        ("assistant", "Tres."),
        ("user", "Four."),
    )
    turns = chat.turns
    assert [(t.user, t.status, t.in_context) for t in turns] == [
        ("One.", "ok", True),
        ("Two.", "error", False),
        ("Three.", "ok", True),
        ("Four.", "ok", True),
    ]
    assert turns[1].error


@pytest.mark.anyio
async def test_a_cancelled_turn_is_recorded_and_left_out(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    async with LMStudioClient(sim.base_url) as client:
        chat = Conversation("stop", model=MODEL, store=store, client=client)
        await chat.asend("Start.", options=reply("Started."))
        started = asyncio.Event()
        task = asyncio.ensure_future(
            chat.asend(
                "Go on.",
                options={
                    "sim": {"stall_at": 1, "stall_s": 30},
                    # cancelled once text flows (it then stalls), as a user stops a slow answer
                    "on_event": lambda e: isinstance(e, TextDelta) and started.set(),
                },
            )
        )
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        before = len(sim.records())
        await chat.asend("Again.", options=reply("Yes."))
    assert sent(sim, before)[0][1] == (
        ("user", "Start."),
        ("assistant", "Started."),
        ("user", "Again."),
    )
    assert [t.status for t in chat.turns] == ["ok", "cancelled", "ok"]


def test_a_conversation_over_the_context_is_refused_with_the_numbers_and_the_ways_out(
    store: PromptStore,
) -> None:
    defaults = simulator.Scenario(dialect="llamacpp", output_tokens=4)
    with (
        simulator.serve(profile="test-fast", defaults=defaults, context_length=300) as server,
        SyncLMStudioClient(server.base_url) as client,
    ):
        chat = Conversation("long", store=store, client=client)
        answer = chat.send("a" * 600).text  # 150 tokens and the answer's
        chats = len([r for r in server.records() if r.path.endswith("/chat/completions")])
        with pytest.raises(ConversationTooLong) as refused:
            chat.send("b" * 600)
        now = len([r for r in server.records() if r.path.endswith("/chat/completions")])
        assert now == chats, "nothing was sent"
        error = refused.value
        expected = (1200 + len(answer)) // 4  # the simulator's count: 4 characters a token
        assert (error.prompt_tokens, error.context_length) == (expected, 300)
        message = str(error)
        assert f"{expected} tokens" in message
        assert "300-token context" in message
        assert "Conversation.drop_oldest(n)" in message
        assert "drop_oldest=True" in message
        assert "%lmstream chat fork long NEW" in render(error, "magic")
        assert "lmstream chat fork long NEW" in render(error, "cli")
        assert [t.status for t in chat.turns] == ["ok"], "a refused turn is no turn"
        before = len(server.records())
        done = chat.send("b" * 600, drop_oldest=True)
        # A message too long on its own is any prompt too long: no turn to drop would help.
        with pytest.raises(PromptTooLong) as alone:
            chat.send("c" * 1300, drop_oldest=True)
    assert not isinstance(alone.value, ConversationTooLong)
    assert "shorten the prompt" in str(alone.value)
    assert done.ok
    last = next(r for r in server.records()[before:] if r.path.endswith("/chat/completions"))
    assert last.messages == (("user", "b" * 600),)
    assert [(t.status, t.in_context) for t in chat.turns] == [
        ("ok", False),
        ("ok", False),
        ("error", False),
    ]


def test_drop_oldest_leaves_turns_out_and_says_how_many(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    with SyncLMStudioClient(sim.base_url) as client:
        chat = Conversation("drop", model=MODEL, store=store, client=client)
        for word in ("a", "b", "c"):
            chat.send(word, options=reply(word.upper()))
        assert chat.drop_oldest(2) == 2
        before = len(sim.records())
        chat.send("d")
        assert chat.drop_oldest(5) == 2
    assert sent(sim, before)[0][1] == (("user", "c"), ("assistant", "C"), ("user", "d"))
    assert [t.in_context for t in chat.turns] == [False, False, False, False]


def test_an_unknown_conversation_is_named(store: PromptStore) -> None:
    Conversation("alpha", store=store)
    with pytest.raises(ConversationNotFound) as missing:
        store.conversation("alpah")
    assert "did you mean 'alpha'" in str(missing.value)
    with pytest.raises(StoreError, match="already a conversation named 'alpha'"):
        Conversation("alpha", store=store).fork("alpha")


def test_a_server_that_cannot_count_refuses_and_the_sentence_gives_the_same_ways_out(
    store: PromptStore,
) -> None:
    """LM Studio counts nothing beforehand: its refusal is the conversation's sentence too,
    and the refused turn is recorded but not sent again."""
    with (
        simulator.serve(profile="test-fast", context_length=300) as server,
        SyncLMStudioClient(server.base_url) as client,
    ):
        chat = Conversation("lm", model=MODEL, store=store, client=client)
        chat.send("a" * 600)
        with pytest.raises(ConversationTooLong) as refused:
            chat.send("b" * 600)
        quiet = chat.send("c" * 600, options={"raise_errors": False})
    error = refused.value
    assert error.status == 400
    assert error.context_length == 300
    assert "300-token context" in str(error)
    assert "so the server refused it (HTTP 400)" in str(error)
    assert "Conversation.drop_oldest(n)" in str(error)
    assert isinstance(quiet.exception, ConversationTooLong)
    assert quiet.error is not None
    assert "drop_oldest=True" in quiet.error
    assert [(t.status, t.in_context) for t in chat.turns] == [
        ("ok", True),
        ("error", False),
        ("error", False),
    ]


@pytest.mark.anyio
async def test_a_message_sent_while_the_previous_answer_streams_is_refused(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    async with LMStudioClient(sim.base_url) as client:
        chat = Conversation("busy", model=MODEL, store=store, client=client)
        started = asyncio.Event()
        slow = asyncio.ensure_future(
            chat.asend(
                "Slowly.",
                options={
                    "sim": {"output_tokens": 40, "gen_tps": 100},
                    # cancelled once text flows (it then stalls), as a user stops a slow answer
                    "on_event": lambda e: isinstance(e, TextDelta) and started.set(),
                },
            )
        )
        await asyncio.wait_for(started.wait(), 10)
        with pytest.raises(ConversationBusy) as busy:
            await Conversation("busy", store=store, client=client).asend("Meanwhile.")
        await asyncio.wait_for(slow, 30)
        await chat.asend("Afterwards.")
    assert "still waiting for its previous answer" in str(busy.value)
    assert [t.user for t in chat.turns] == ["Slowly.", "Afterwards."]


def test_a_later_turn_on_llama_cpp_still_reports_progress(store: PromptStore) -> None:
    """It goes to /chat/completions, where llama.cpp reports prompt progress when asked."""
    streams: list[Any] = []
    events: list[Any] = []
    defaults = simulator.Scenario(dialect="llamacpp", output_tokens=3)
    with (
        simulator.serve(profile="test-fast", defaults=defaults) as server,
        SyncLMStudioClient(server.base_url) as client,
    ):
        chat = Conversation("progress", store=store, client=client)
        chat.send("First.")
        chat.send("Second.", options={"on_stream": streams.append, "on_event": events.append})
    [stream] = streams
    assert stream.api == "openai"
    assert stream.reports_progress is True
    assert any(isinstance(e, PromptProgress) for e in events)


def test_a_turn_under_way_in_another_process_refuses_the_next(tmp_path: Path) -> None:
    """The store, not only this process, knows a turn is being answered: a turn sent meanwhile
    (a notebook beside ``lmstream serve``, say) would not carry that answer, so it is refused.
    Once that process is gone (killed: its run is left unfinished), the next turn goes."""
    stall = simulator.Scenario(stall_at=2, stall_s=60)
    env = {**os.environ, "LMSTREAM_HOME": str(tmp_path)}
    with simulator.serve(profile="test-fast", defaults=stall) as stalling:
        command = ["run", "--chat", "shared", "Hello", "--model", MODEL]
        child = subprocess.Popen(
            [sys.executable, "-m", "lmstream_nb", *command, "--base-url", stalling.base_url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with PromptStore(tmp_path / "lmstream.db") as store:
                wait_until(
                    lambda: store.history(status="unfinished"),
                    timeout=30,
                    what="the other process recorded its turn",
                )
                with SyncLMStudioClient(stalling.base_url) as client:
                    chat = Conversation("shared", model=MODEL, store=store, client=client)
                    chats = len(stalling.chats())
                    with pytest.raises(ConversationBusy) as busy:
                        chat.send("Are you there?")
                    assert "still waiting for its previous answer" in str(busy.value)
                    assert len(stalling.chats()) == chats, "nothing was sent"
                    child.kill()
                    child.wait(timeout=10)
                    after = chat.send("Are you there?", options=reply("Yes."))
                assert after.text == "Yes."
                assert [t.status for t in chat.turns] == ["unfinished", "ok"]
                last = stalling.chats()[-1]
                assert last.messages == (("user", "Are you there?"),), "the lost turn is left out"
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)


def test_a_blank_name_is_refused_and_a_blank_fork_writes_nothing(store: PromptStore) -> None:
    with pytest.raises(ValueError, match="needs a name with some text besides spaces"):
        Conversation("  ", store=store)
    chat = Conversation("kept", store=store)
    with pytest.raises(ValueError, match="needs a name"):
        chat.fork("\t")
    assert [c.name for c in store.conversations()] == ["kept"]
