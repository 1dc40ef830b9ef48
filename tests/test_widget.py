"""PromptRunner driven through its widgets' state and clicks, against the simulator."""

from __future__ import annotations

import asyncio
import html
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import await_until

from lmstream_nb import PromptRunner, PromptStore, simulator
from lmstream_nb._outcome import CANCELLED_MESSAGE
from lmstream_nb._prompt_fields import RULES
from lmstream_nb._view import StreamView

pytestmark = pytest.mark.anyio

MODEL = "lmstream-sim-8b"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PromptStore]:
    with PromptStore(tmp_path / "w.db") as s:
        s.save("summary", "Summarise {{text}} for {{audience}}.")
        s.save("haiku", "A haiku about {{topic}}.")
        yield s


async def ready(sim_url: str, store: PromptStore) -> PromptRunner:
    runner = PromptRunner(store, sim_url)
    await asyncio.wait_for(runner.models_task, 10)
    return runner


async def test_picker_variables_and_values_survive_switching(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    runner = await ready(sim.base_url, store)
    assert list(runner.prompt_picker.options) == ["haiku", "summary"]
    assert list(runner._var_inputs) == ["topic"]
    runner.set_variable("topic", "autumn\nleaves")
    runner.prompt_picker.value = "summary"
    assert list(runner._var_inputs) == ["text", "audience"]
    assert "Summarise {{text}}" in runner.preview.value
    runner.prompt_picker.value = "haiku"
    assert runner._var_inputs["topic"].value == "autumn\nleaves"
    assert runner.model_picker.options == (MODEL,)
    assert runner.model_picker.value == MODEL


async def test_run_streams_and_records_then_history_shows_it(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    runner = await ready(sim.base_url, store)
    runner.set_variable("topic", "rivers")
    runner.max_tokens.value = "12"
    runner.run_button.click()
    task = runner.task
    assert task is not None
    assert runner.run_button.disabled
    assert not runner.stop_button.disabled
    result = await asyncio.wait_for(task, 10)
    assert result is not None
    assert result.ok
    assert not runner.run_button.disabled
    assert runner.stop_button.disabled
    [view] = runner.view_box.children
    assert view.status["state"] == "done"
    assert view.show_text
    assert store.get_run(result.run_id).text == result.text
    assert runner.history_select.options[0][1] == result.run_id
    assert f" {result.prompt} " in runner.history_select.options[0][0]
    assert result.prompt == "haiku@1"
    runner.history_select.value = result.run_id
    assert result.text.split()[0] in runner.history_text.value
    assert "</b> haiku@1 ok" in runner.history_text.value


async def test_stop_cancels_within_a_second_and_keeps_partial_text(store: PromptStore) -> None:
    defaults = simulator.Scenario(output_tokens=100_000, gen_tps=200, jitter=0)
    with simulator.serve(profile="test-fast", defaults=defaults) as slow:
        runner = await ready(slow.base_url, store)
        runner.set_variable("topic", "the sea")
        task = runner.run()
        assert task is not None
        [view] = runner.view_box.children
        await await_until(
            lambda: (
                view.status.get("state") == "processing"
                and any(r.sent_tokens > 20 for r in slow.records())
            ),
            timeout=10,
            what="the runner's run is streaming text",
        )
        runner.stop_button.click()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)  # bounded: a busy CPU delays, never prevents it
        record = await asyncio.to_thread(
            slow.wait_for, lambda r: r.outcome == "client_disconnected", 5.0
        )
    assert record.sent_tokens < record.planned_tokens
    assert view.status["state"] == "cancelled"
    [summary] = store.history()
    assert summary.status == "cancelled"
    assert view.status["message"] == summary.error == CANCELLED_MESSAGE, "said as recorded"
    assert store.get_run(summary.id).text
    assert not runner.run_button.disabled


async def test_bad_values_are_reported_next_to_the_field_and_nothing_is_sent(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    runner = await ready(sim.base_url, store)
    before = len(sim.records())
    runner.max_tokens.value = "lots"
    assert runner.run() is None
    assert "not a whole number" in runner.max_tokens_error.value
    runner.max_tokens.value = "5"
    runner.first_token_timeout.value = "-3"
    runner.set_variable("topic", "x")
    assert runner.run() is None
    assert "positive number of seconds" in runner.budget_error.value
    assert len(sim.records()) == before
    assert len(store.history()) == 0


async def test_settings_follow_the_rules_every_front_end_keeps(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    runner = await ready(sim.base_url, store)
    runner.temperature.value = "5"
    runner.max_tokens.value = "0"
    assert runner.run() is None
    shown = html.unescape(runner.temperature_error.value)
    assert f"Temperature 5 is not {RULES['temperature']}: type such a value in Temperature" in shown
    shown = html.unescape(runner.max_tokens_error.value)
    assert f"Max tokens 0 is not {RULES['max_tokens']}" in shown
    assert len(store.history()) == 0, "nothing was sent"
    # An empty value is a value, as on the command line, in the magic and in the relay.
    runner.temperature.value, runner.max_tokens.value = "", "-1"
    runner.set_variable("topic", "")
    task = runner.run()
    assert task is not None
    result = await asyncio.wait_for(task, 10)
    assert result is not None
    assert result.ok
    [run] = store.history()
    assert store.get_run(run.id).messages[-1]["content"] == "A haiku about ."


async def test_unreachable_server_is_said_in_the_widget_and_runner_recovers(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    runner = PromptRunner(store, dead)
    await asyncio.wait_for(runner.models_task, 10)
    assert "Cannot connect" in runner.model_message.value
    assert "%lmstream config base_url=... with where it listens" in runner.model_message.value
    runner.set_variable("topic", "x")
    runner.model_picker.options = [MODEL]
    failed = runner.run()
    assert failed is not None
    assert await asyncio.wait_for(failed, 10) is None
    [view] = runner.view_box.children
    assert view.status["state"] == "failed"
    assert "Cannot connect" in view.status["message"]
    runner.base_url = sim.base_url
    await asyncio.wait_for(runner.refresh_models(), 10)
    assert runner.model_message.value == ""
    retry = runner.run()
    assert retry is not None
    result = await asyncio.wait_for(retry, 10)
    assert result is not None
    assert result.ok


async def test_save_as_new_version(sim: simulator.SimServer, store: PromptStore) -> None:
    runner = await ready(sim.base_url, store)
    runner.editor.value = "A limerick about {{topic}} and {{place}}."
    saved = runner.save_version()
    assert saved is not None
    assert saved.version == 2
    assert [p.version for p in store.versions("haiku")] == [1, 2]
    assert runner.version_picker.value == 2
    assert list(runner._var_inputs) == ["topic", "place"]


async def test_save_keeps_the_settings_of_the_version_edited(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    store.save("haiku", "A haiku about {{topic}}.", system="Be terse.", temperature=0.4)
    runner = await ready(sim.base_url, store)
    runner.prompt_picker.value = "haiku"
    runner.editor.value = "Two haiku about {{topic}}."
    saved = runner.save_version()
    assert saved is not None
    assert (saved.version, saved.system, saved.temperature) == (3, "Be terse.", 0.4)
    assert "kept the system prompt, temperature 0.4" in runner.save_message.value
    again = runner.save_version()
    assert again is not None
    assert again.version == 3
    assert runner.save_message.value.startswith("Unchanged: haiku@3 already holds")
    assert [p.version for p in store.versions("haiku")] == [1, 2, 3]


async def test_two_runners_are_independent(sim: simulator.SimServer, store: PromptStore) -> None:
    first, second = await ready(sim.base_url, store), await ready(sim.base_url, store)
    second.prompt_picker.value = "summary"
    first.set_variable("topic", "owls")
    second.set_variable("text", "notes")
    second.set_variable("audience", "kids")
    tasks = [first.run(), second.run()]
    assert all(t is not None for t in tasks)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)  # type: ignore[arg-type]
    assert all(r is not None and r.ok for r in results)
    assert results[0].text != results[1].text  # type: ignore[union-attr]
    assert first.view_box.children[0] is not second.view_box.children[0]


async def test_budget_fields_follow_the_one_rule(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    """``0`` is refused with the same sentence as everywhere; ``none`` lifts the budget."""
    runner = await ready(sim.base_url, store)
    runner.set_variable("topic", "x")
    for field in (runner.first_token_timeout, runner.idle_timeout):
        for bad in ("0", "-1", "soon"):
            field.value = bad
            assert runner.run() is None
            shown = html.unescape(runner.budget_error.value)
            assert f"{field.description}: {bad!r} is not a time budget: use a positive" in shown
            assert "or none for no limit." in runner.budget_error.value
        field.value = "none"
    assert len(store.history()) == 0, "nothing was sent"

    slow_prefill = simulator.Scenario(prefill_tps=20, output_tokens=3)  # ~2 s for this prompt
    # LM Studio 0.3: no progress while the prompt is processed, so the first-token budget ends it
    with simulator.serve(profile="test-fast", defaults=slow_prefill, native_api=False) as slow:
        runner.base_url = slow.base_url
        runner.set_variable("topic", "z" * 160)
        runner.first_token_timeout.value = "0.2"
        timed_out = runner.run()
        assert timed_out is not None
        assert await asyncio.wait_for(timed_out, 10) is None
        [view] = runner.view_box.children
        assert view.status["state"] == "failed"
        assert "within the first-token budget of 0.2 s" in view.status["message"]
        runner.first_token_timeout.value = "None"
        lifted = runner.run()
        assert lifted is not None
        result = await asyncio.wait_for(lifted, 10)
    assert runner.budget_error.value == ""
    assert result is not None
    assert result.ok


async def test_the_view_and_the_history_show_the_same_figures_and_the_text_is_kept(
    store: PromptStore,
) -> None:
    """The view's final line and the history row are the recorded run's; the finished text
    is widget state, so a reloaded page shows it again."""
    slow_prefill = simulator.Scenario(prefill_tps=400, output_tokens=8)
    with simulator.serve(profile="test-fast", defaults=slow_prefill) as slow:
        runner = await ready(slow.base_url, store)
        runner.set_variable("topic", "w " * 40)
        task = runner.run()
        assert task is not None
        result = await asyncio.wait_for(task, 10)
    assert result is not None
    [view] = runner.view_box.children
    record = store.get_run(result.run_id)
    assert record.ttft_s is not None
    assert view.status["ttft"] == record.ttft_s
    assert f"first token {record.ttft_s:.2f} s" in view.status["line"]
    assert f"ttft {record.ttft_s:.2f}s" in runner.history_select.options[0][0]
    assert view.text == result.text
    snapshot = runner.snapshot_bundle()
    assert snapshot["text/plain"].startswith("lmstream: " + view.status["line"])
    assert snapshot["text/plain"].endswith(result.text)
    assert html.escape(result.text) in snapshot["text/html"]


async def test_history_rows_line_up_and_a_stop_is_not_an_error(store: PromptStore) -> None:
    defaults = simulator.Scenario(output_tokens=100_000, gen_tps=200, jitter=0)
    with simulator.serve(profile="test-fast", defaults=defaults) as slow:
        runner = await ready(slow.base_url, store)
        runner.set_variable("topic", "the sea")
        task = runner.run()
        assert task is not None
        [view] = runner.view_box.children
        await await_until(
            lambda: (
                bool(view.status.get("state") == "processing" and runner.run_button.disabled)
                and any(r.sent_tokens > 5 for r in slow.records())
            ),
            timeout=10,
            what="the run is streaming",
        )
        runner.stop()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        runner.max_tokens.value = "3"
        done = runner.run()
        assert done is not None
        await asyncio.wait_for(done, 10)
    labels = [label for label, _ in runner.history_select.options]
    assert len(labels) == 2
    assert labels[0].index("ttft") == labels[1].index("ttft"), labels
    assert labels[0].index("total") == labels[1].index("total"), labels
    runner.history_select.value = runner.history_select.options[1][1]
    assert "cancelled" in runner.history_text.value
    assert "lmstream-field-error" not in runner.history_text.value, "shown as a note"
    assert "lmstream-note" in runner.history_text.value
    assert "<pre" not in runner.history_text.value
    assert "lmstream-wide-button" in runner.save_button._dom_classes  # checked in a browser too


async def test_the_runner_shows_a_snapshot_a_saved_notebook_keeps(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    runner = await ready(sim.base_url, store)
    snapshot = runner.snapshot_bundle()
    assert snapshot["text/plain"].startswith("lmstream: ")
    assert "has not run a prompt yet" in snapshot["text/html"]
    assert "lmstream-snapshot" in snapshot["text/html"]


async def test_the_snapshot_and_the_stand_in_name_their_runner(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    """The runner's front-end helper hides the snapshot named after its runner while the runner
    is shown, and saves a note (an ordinary HTML widget's state) in the runner's place; the
    browser test checks both in JupyterLab."""
    runner = await ready(sim.base_url, store)
    keeper = runner.children[-1]
    assert keeper.runner_id == runner.model_id
    assert keeper.layout.display == "none", "it shows nothing itself"
    assert f'data-lmstream-runner="{runner.model_id}"' in runner.snapshot_bundle()["text/html"]
    stand_in = keeper.stand_in
    assert (stand_in["model_module"], stand_in["model_name"]) == (
        "@jupyter-widgets/controls",
        "HTMLModel",
    )
    assert "needs its kernel" in stand_in["state"]["value"]
    assert "lmstream-wide-button" in keeper._css, "the runner's styles come with it"
    assert ".jp-" not in keeper._esm + keeper._css, "no front end's own class names"


async def test_the_runner_shows_the_progress_bar_and_its_history_the_first_sign_of_life(
    store: PromptStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's view is the magic's: progress reaches it before the text, and the history
    row shows the time to the first progress beside the time to the first token."""
    sent: list[dict[str, object]] = []
    original = StreamView.send

    def keep(view: StreamView, content: dict[str, object], buffers: object = None) -> None:
        sent.append(content)
        original(view, content, buffers)

    monkeypatch.setattr(StreamView, "send", keep)
    slow_prefill = simulator.Scenario(prefill_tps=2000, batch_size=100, output_tokens=6)
    with simulator.serve(profile="test-fast", defaults=slow_prefill) as slow:
        runner = await ready(slow.base_url, store)
        runner.set_variable("topic", "w " * 1500)
        task = runner.run()
        assert task is not None
        result = await asyncio.wait_for(task, 20)
    assert result is not None
    assert result.ok
    kinds = ["p" if "p" in m else "t" if "t" in m else "-" for m in sent]
    assert "p" in kinds, kinds
    assert "t" in kinds, kinds
    assert kinds.index("t") > max(i for i, k in enumerate(kinds) if k == "p"), kinds
    record = store.get_run(result.run_id)
    assert record.first_progress_s is not None
    assert record.ttft_s is not None
    assert record.first_progress_s < record.ttft_s
    row = runner.history_select.options[0][0]
    assert f"progress {record.first_progress_s:.2f}s" in row
    assert row.index("progress ") < row.index("ttft ")


async def test_a_prompt_with_a_schema_shows_its_parsed_value(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    store.save("place", "A city for {{who}}.", schema=schema)
    runner = await ready(sim.base_url, store)
    runner.prompt_picker.value = "place"
    runner.set_variable("who", "<b>owls</b>")
    task = runner.run()
    assert task is not None
    result = await asyncio.wait_for(task, 10)
    assert result is not None
    assert result.ok, result.error
    assert isinstance(result.parsed["city"], str)
    assert '<pre class="lmstream-json"><code>{' in runner.parsed_view.value
    assert html.escape(result.parsed["city"]) in runner.parsed_view.value
    snapshot = runner.snapshot_bundle()
    city = json.dumps(result.parsed["city"], ensure_ascii=False)
    assert snapshot["text/plain"].endswith(f'"city": {city}\n}}')
    runner.prompt_picker.value = "haiku"
    runner.set_variable("topic", "rain")
    again = runner.run()
    assert again is not None
    assert (await asyncio.wait_for(again, 10)) is not None
    assert runner.parsed_view.value == "", "a prompt without a schema shows none"


async def test_a_conversation_name_makes_each_run_its_next_turn(
    sim: simulator.SimServer, store: PromptStore
) -> None:
    runner = await ready(sim.base_url, store)
    runner.conversation.value = "poems"
    runner.max_tokens.value = "4"
    results = []
    for topic in ("rain", "snow"):
        runner.set_variable("topic", topic)
        task = runner.run()
        assert task is not None
        result = await asyncio.wait_for(task, 10)
        assert result is not None
        assert result.ok, result.error
        results.append(result)
    last = sim.chats()[-1]
    assert last.messages == (
        ("user", "A haiku about rain."),
        ("assistant", results[0].text),
        ("user", "A haiku about snow."),
    )
    turns = [r.id for r in store.conversation_runs("poems")]
    assert turns == [r.run_id for r in results]
    assert "haiku@1 (chat poems)" in runner.history_select.options[0][0]
    runner.conversation.value = ""
    task = runner.run()
    assert task is not None
    alone = await asyncio.wait_for(task, 10)
    assert alone is not None
    assert sim.chats()[-1].messages == (("user", "A haiku about snow."),), "a run on its own"
