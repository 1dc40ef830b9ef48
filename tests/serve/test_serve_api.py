"""``lmstream serve``'s JSON API over real HTTP: every route, every refusal, token, CORS, limits.

The service runs in a thread on a free loopback port against the session simulator; the tests
are plain httpx clients. Refused run requests must leave no run behind.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import TIMEOUT, read_events, service, text_of

from lmstream_nb import Budgets, PromptStore, run, simulator
from lmstream_nb._errors import MissingVariables, UnknownVariables, render
from lmstream_nb._prompt_fields import RULES
from lmstream_nb.cli import main
from lmstream_nb.serve import ServeHandle, create_app, serve

MODEL = "lmstream-sim-8b"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    store = PromptStore(tmp_path / "lmstream.db")
    store.save("greet", "Say hello to {{who}} in {{lang}}.", system="You are {{role}}.")
    store.save(
        "greet",
        "Say hello to {{who}} in {{lang}}, briefly.",
        system="You are {{role}}.",
        model=MODEL,
        description="v2",
    )
    store.save("plain", "Tell me about rivers.")
    store.close()
    return tmp_path / "lmstream.db"


@pytest.fixture
def server(store_path: Path, sim: simulator.SimServer) -> Iterator[ServeHandle]:
    with service(store_path, sim.base_url, max_body=2048) as handle:
        yield handle


@pytest.fixture
def client(server: ServeHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def test_prompts_list_and_one_prompt_with_versions_and_variables(client: httpx.Client) -> None:
    prompts = {p["name"]: p for p in client.get("/api/prompts").json()["prompts"]}
    assert set(prompts) == {"greet", "plain"}
    assert prompts["greet"]["version"] == 2
    assert prompts["greet"]["variables"] == ["role", "who", "lang"]
    one = client.get("/api/prompts/greet").json()
    assert one["versions"] == [1, 2]
    assert one["template"] == "Say hello to {{who}} in {{lang}}, briefly."
    assert one["system"] == "You are {{role}}."
    assert one["model"] == MODEL
    assert one["variables"] == ["role", "who", "lang"]


def test_unknown_prompt_is_404_without_the_server_path(
    client: httpx.Client, store_path: Path
) -> None:
    response = client.get("/api/prompts/nope")
    assert response.status_code == 404
    assert response.json() == {
        "error": "No prompt is named 'nope': see GET /api/prompts for the names there are."
    }
    assert str(store_path) not in response.text
    close = client.get("/api/prompts/plane").json()["error"]
    assert close == "No prompt is named 'plane': did you mean 'plain'?"


def test_models(client: httpx.Client) -> None:
    """The page offers chat models only: the simulator's embedding model is not one."""
    assert client.get("/api/models").json()["models"] == [MODEL]


def test_run_answers_at_once_streams_and_is_recorded(
    client: httpx.Client, store_path: Path
) -> None:
    response = client.post(
        "/api/prompts/greet/runs",
        json={"variables": {"who": "Ada", "lang": "Welsh", "role": "kind"}},
    )
    assert response.status_code == 201
    body = response.json()
    run_id = body["run_id"]
    assert body == {
        "run_id": run_id,
        "events_url": f"/api/runs/{run_id}/events",
        "url": f"/api/runs/{run_id}",
    }
    events, _ = read_events(client, body["events_url"])
    assert events[0].event == "start"
    assert events[0].retry is not None
    assert events[0].json() == {"run_id": run_id, "prompt": "greet", "version": 2, "model": MODEL}
    assert events[-1].event == "done"
    assert all(e.id for e in events)
    text = text_of(events)
    done = events[-1].json()
    assert done["status"] == "ok"
    assert done["finish_reason"] == "stop"
    assert done["text_length"] == len(text) > 0
    assert done["stats"]["chunks"] > 0

    one = client.get(body["url"]).json()
    assert one["status"] == "ok"
    assert one["text"] == text
    assert one["variables"] == {"who": "Ada", "lang": "Welsh", "role": "kind"}
    history = client.get("/api/runs", params={"prompt": "greet"}).json()["runs"]
    assert [r["id"] for r in history] == [run_id]
    assert history[0]["text_chars"] == len(text)
    assert client.get("/api/runs", params={"prompt": "plain"}).json()["runs"] == []
    assert PromptStore(store_path).get_run(run_id).text == text


def test_run_options_and_an_older_version(client: httpx.Client) -> None:
    response = client.post(
        "/api/prompts/greet/runs",
        json={
            "variables": {"who": "Ada", "lang": "Welsh", "role": "kind"},
            "version": 1,
            "model": MODEL,
            "max_tokens": 5,
            "temperature": 0.5,
        },
    )
    assert response.status_code == 201, response.text
    events, _ = read_events(client, response.json()["events_url"])
    assert events[0].json()["version"] == 1
    assert events[-1].json()["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("setting", "value"),
    [("temperature", 5), ("temperature", -0.5), ("max_tokens", 0), ("max_tokens", -2)],
)
def test_settings_out_of_range_are_refused_with_the_rule_every_front_end_uses(
    client: httpx.Client, setting: str, value: float
) -> None:
    body = {"variables": {"who": "Ada", "lang": "Welsh", "role": "kind"}, setting: value}
    response = client.post("/api/prompts/greet/runs", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == (
        f'"{setting}": {value!r} is not {RULES[setting]}: send "{setting}" as such a value, '
        "or leave it out for the prompt's own."
    )
    assert client.get("/api/runs").json()["runs"] == []


def test_an_empty_value_and_no_token_limit_are_accepted_as_everywhere(
    client: httpx.Client,
) -> None:
    body = {"variables": {"who": "", "lang": "Welsh", "role": "kind"}, "max_tokens": -1}
    response = client.post("/api/prompts/greet/runs", json=body)
    assert response.status_code == 201, response.text
    read_events(client, response.json()["events_url"])
    run = client.get(response.json()["url"]).json()
    assert run["messages"][-1]["content"] == "Say hello to  in Welsh, briefly."


def test_a_failed_run_says_what_to_do_in_the_relay_s_words(store_path: Path) -> None:
    stall = simulator.Scenario(stall_at=3, stall_s=30)
    with (
        simulator.serve(profile="test-fast", defaults=stall) as stalling,
        service(store_path, stalling.base_url, budgets=Budgets(idle=0.5)) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        response = client.post("/api/prompts/plain/runs", json={})
        assert response.status_code == 201, response.text
        events, _ = read_events(client, response.json()["events_url"])
        run = client.get(response.json()["url"]).json()
    [error] = [e.json() for e in events if e.event == "error"]
    assert error["status"] == "stalled"
    assert (
        "are kept in the run (GET /api/runs/ID); start the relay with a larger"
        in (error["message"])
    )
    assert "partial_text" not in error["message"]
    assert run["error"] == error["message"], "recorded in the words it was sent in"


def test_numbers_and_booleans_become_the_same_text_as_in_python(
    client: httpx.Client, store_path: Path, sim: simulator.SimServer
) -> None:
    """One rule for a value that is not a string, whichever front end it came through."""
    values = {"who": 3, "lang": True, "role": 2.5}
    response = client.post("/api/prompts/greet/runs", json={"variables": values})
    assert response.status_code == 201, response.text
    read_events(client, response.json()["events_url"])
    with PromptStore(store_path) as store:
        served = store.get_run(response.json()["run_id"])
        direct = run("greet", values, store=store, base_url=sim.base_url, model=MODEL)
        in_python = store.get_run(direct.run_id)
    assert served.variables == in_python.variables == {"who": "3", "lang": "True", "role": "2.5"}
    assert served.messages == in_python.messages


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"variables": {"who": "Ada"}}, 422, render(MissingVariables(["lang", "role"]), "relay")),
        (
            {"variables": {"who": "A", "lang": "B", "role": "C", "whom": "D"}},
            422,
            render(UnknownVariables(["whom"], ["role", "who", "lang"]), "relay"),
        ),
        (
            {"variables": ["who"]},
            400,
            '"variables" is ["who"]: it must be a JSON object of names to values (at most 256).',
        ),
        ({"variables": {"who": {"a": 1}, "lang": "B", "role": "C"}}, 400, None),
        ({"variables": {}, "surprise": 1}, 400, None),
        ({"variables": {}, "version": 0}, 400, None),
        ({"variables": {}, "max_tokens": "many"}, 400, None),
        (
            {"chat": " "},
            422,
            "A conversation needs a name with some text besides spaces, not ' ': give it one, "
            "such as 'lesson'.",
        ),
        ([1, 2], 400, None),
    ],
)
def test_bad_run_requests_are_refused_with_one_sentence_and_start_nothing(
    client: httpx.Client, body: object, status: int, expected: str | None
) -> None:
    response = client.post("/api/prompts/greet/runs", json=body)
    assert response.status_code == status
    message = response.json()["error"]
    if expected is not None:
        assert message == expected
    assert not re.search(r"[.!?] [A-Z]", message)  # one sentence
    assert message.endswith((".", "?"))
    assert client.get("/api/runs").json()["runs"] == []


def test_unknown_prompt_bad_json_and_big_bodies_start_nothing(
    client: httpx.Client, store_path: Path
) -> None:
    response = client.post("/api/prompts/nope/runs", json={"variables": {}})
    assert response.status_code == 404
    assert response.json()["error"].startswith("No prompt is named 'nope'")
    response = client.post(
        "/api/prompts/plain/runs",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("The request body is not valid JSON")
    response = client.post("/api/prompts/plain/runs", json={"variables": {"x": "y" * 5000}})
    assert response.status_code == 413
    # Without a Content-Length (chunked upload) the limit holds while reading.
    response = client.post(
        "/api/prompts/plain/runs",
        content=iter([b'{"variables": {"x": "', b"y" * 4096, b'"}}']),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert client.get("/api/runs").json()["runs"] == []


def test_unknown_runs_and_routes_are_json_404s(client: httpx.Client) -> None:
    for method, url in [
        ("GET", "/api/runs/999"),
        ("GET", "/api/runs/999/events"),
        ("DELETE", "/api/runs/999"),
        ("GET", "/api/nothing"),
    ]:
        response = client.request(method, url, json={} if method == "DELETE" else None)
        assert response.status_code == 404, url
        assert response.json()["error"].endswith(".")
    assert client.put("/api/runs").status_code == 405
    assert client.get("/api/runs", params={"status": "weird"}).status_code == 400
    assert client.get("/api/runs", params={"limit": "lots"}).status_code == 400


def test_delete_of_a_finished_run_is_409(client: httpx.Client) -> None:
    run = client.post("/api/prompts/plain/runs", json={}).json()
    read_events(client, run["events_url"])
    response = client.request("DELETE", run["url"], json={})
    assert response.status_code == 409
    assert "already ended (status ok)" in response.json()["error"]


def test_openapi_lists_every_route(server: ServeHandle, client: httpx.Client) -> None:
    described = client.get("/api/openapi.json").json()
    assert described["openapi"].startswith("3.1")
    paths = described["paths"]
    for route in server.app.routes:
        path = route.path.replace("{run_id:int}", "{run_id}")  # type: ignore[attr-defined]
        methods = route.methods - {"HEAD"}  # type: ignore[attr-defined]
        assert path in paths, path
        assert {m.lower() for m in methods} <= set(paths[path]), path


def test_page_is_served(client: httpx.Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    # The page declares its icon inline, so a browser asks for no /favicon.ico (a 404).
    assert '<link rel="icon" href="data:,">' in response.text


def test_token_is_required_on_every_request(store_path: Path, sim: simulator.SimServer) -> None:
    with (
        service(store_path, sim.base_url, token="s3cret") as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = client.get("/api/prompts", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token" in response.json()["error"]
        assert client.get("/", params={"token": "nope"}).status_code == 401
        assert (
            client.get("/api/prompts", headers={"Authorization": "Bearer s3cret"}).status_code
            == 200
        )
        run = client.post("/api/prompts/plain/runs", params={"token": "s3cret"}, json={})
        assert run.status_code == 201
        events_url = run.json()["events_url"]
        assert client.get(events_url).status_code == 401
        events, _ = read_events(client, events_url + "?token=s3cret")
        assert events[-1].event == "done"


def test_other_addresses_need_a_token() -> None:
    with pytest.raises(ValueError, match="needs a token"):
        serve(host="0.0.0.0", base_url="http://127.0.0.1:9/v1")
    assert main(["serve", "--host", "0.0.0.0"]) == 2


def test_cors_is_off_unless_origins_are_listed(
    store_path: Path, sim: simulator.SimServer, client: httpx.Client
) -> None:
    origin = {"Origin": "http://example.test"}
    assert "access-control-allow-origin" not in client.get("/api/prompts", headers=origin).headers
    with (
        service(
            store_path, sim.base_url, token="t", cors_origins=["http://example.test"]
        ) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as other,
    ):
        preflight = other.options(
            "/api/prompts/plain/runs",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://example.test"
        response = other.get("/api/prompts", headers={**origin, "Authorization": "Bearer t"})
        assert response.headers["access-control-allow-origin"] == "http://example.test"
        elsewhere = other.get(
            "/api/prompts", headers={"Origin": "http://evil.test", "Authorization": "Bearer t"}
        )
        assert "access-control-allow-origin" not in elsewhere.headers


def test_create_app_refuses_nonsense_settings(store_path: Path) -> None:
    with pytest.raises(ValueError, match="keepalive"):
        create_app(store=PromptStore(store_path), keepalive=0)


FLAG = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "why": {"type": "string"}},
    "required": ["ok", "why"],
}


def test_a_schema_asks_for_json_and_the_final_event_carries_the_parsed_value(
    client: httpx.Client, store_path: Path, sim: simulator.SimServer
) -> None:
    before = len(sim.records())
    response = client.post(
        "/api/prompts/plain/runs", json={"schema": FLAG, "model": MODEL, "max_tokens": 200}
    )
    assert response.status_code == 201, response.text
    events, _ = read_events(client, response.json()["events_url"])
    [request] = [r for r in sim.records()[before:] if r.method == "POST"]
    assert request.path == "/v1/chat/completions"  # the native chat takes no response_format
    done = events[-1].json()
    assert events[-1].event == "done"
    assert isinstance(done["parsed"]["ok"], bool)
    assert isinstance(done["parsed"]["why"], str)
    # It still streamed (the relay may merge the deltas of a client that reads late).
    assert done["stats"]["chunks"] > 1
    run_id = response.json()["run_id"]
    assert PromptStore(store_path).get_run(run_id).schema == (
        '{"properties":{"ok":{"type":"boolean"},"why":{"type":"string"}},'
        '"required":["ok","why"],"type":"object"}'
    )
    # Read again after the end, from the store: the same final event.
    again, _ = read_events(client, response.json()["events_url"])
    assert again[-1].json() == done
    plain = client.post("/api/prompts/plain/runs", json={"max_tokens": 4})
    ended, _ = read_events(client, plain.json()["events_url"])
    assert "parsed" not in ended[-1].json(), "only a run that asked for a schema has one"


def test_an_answer_that_does_not_match_ends_invalid_output_naming_the_place(
    client: httpx.Client,
) -> None:
    fault = 'a city [[sim {"schema_fault": "wrong_type"}]]'
    response = client.post(
        "/api/prompts/greet/runs",
        json={"variables": {"who": fault, "lang": "French", "role": "kind"}, "schema": FLAG},
    )
    assert response.status_code == 201, response.text
    events, _ = read_events(client, response.json()["events_url"])
    error = events[-1].json()
    assert (events[-1].event, error["status"]) == ("error", "invalid_output")
    assert "does not match the schema at $." in error["message"]
    run = client.get(response.json()["url"]).json()
    assert run["text"] == text_of(events) != "", "the text is kept"
    assert run["status"] == "invalid_output"


@pytest.mark.parametrize(
    ("schema", "said"),
    [({"type": "no-such-type"}, "The schema "), ("not an object", '"schema" is ')],
)
def test_a_schema_that_is_not_one_starts_nothing(
    client: httpx.Client, schema: object, said: str
) -> None:
    response = client.post("/api/prompts/plain/runs", json={"schema": schema})
    assert response.status_code in (400, 422)
    message = response.json()["error"]
    assert message.startswith(said), message
    assert "Traceback" not in message
    assert client.get("/api/runs").json()["runs"] == []


def test_chat_runs_are_the_turns_of_one_conversation(
    client: httpx.Client, store_path: Path, sim: simulator.SimServer
) -> None:
    """The second turn carries the first; both are runs of the conversation in the store."""
    base = {"chat": "relay-lesson", "model": MODEL, "max_tokens": 6}
    first = client.post(
        "/api/prompts/greet/runs",
        json={**base, "variables": {"who": "Ada", "lang": "Welsh", "role": "kind"}},
    )
    assert first.status_code == 201, first.text
    first_events, _ = read_events(client, first.json()["events_url"])
    before = len(sim.records())
    second = client.post(
        "/api/prompts/greet/runs",
        # A later turn sends no system prompt: its variable is not needed, nor refused.
        json={**base, "variables": {"who": "Bo", "lang": "Irish", "role": "stern"}},
    )
    assert second.status_code == 201, second.text
    second_events, _ = read_events(client, second.json()["events_url"])
    assert second_events[-1].event == "done"
    [request] = [r for r in sim.records()[before:] if r.method == "POST"]
    assert request.path == "/v1/chat/completions"
    assert request.messages == (
        ("system", "You are kind."),  # the first turn's: a later turn's system prompt is not sent
        ("user", "Say hello to Ada in Welsh, briefly."),
        ("assistant", text_of(first_events)),
        ("user", "Say hello to Bo in Irish, briefly."),
    )
    with PromptStore(store_path) as store:
        from lmstream_nb import Conversation

        turns = Conversation("relay-lesson", store=store).turns
        assert [t.run_id for t in turns] == [first.json()["run_id"], second.json()["run_id"]]
        assert store.get_run(second.json()["run_id"]).context_messages == 3
    missing = client.post("/api/prompts/greet/runs", json={**base, "variables": {"who": "Cy"}})
    assert missing.status_code == 422
    assert missing.json()["error"] == render(MissingVariables(["lang"]), "relay")
    assert len(client.get("/api/runs").json()["runs"]) == 2, "a refused turn starts nothing"


def test_a_turn_while_the_last_one_answers_is_409_and_starts_nothing(store_path: Path) -> None:
    stall = simulator.Scenario(stall_at=2, stall_s=30)
    with (
        simulator.serve(profile="test-fast", defaults=stall) as stalling,
        service(store_path, stalling.base_url) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        body = {"chat": "busy", "model": MODEL}
        first = client.post("/api/prompts/plain/runs", json=body)
        assert first.status_code == 201, first.text
        read_events(
            client, first.json()["events_url"], stop=lambda ev: any(e.event == "delta" for e in ev)
        )
        second = client.post("/api/prompts/plain/runs", json=body)
        assert second.status_code == 409
        assert "still waiting for its previous answer" in second.json()["error"]
        assert client.request("DELETE", first.json()["url"], json={}).status_code == 200
        assert [r["id"] for r in client.get("/api/runs").json()["runs"]] == [first.json()["run_id"]]


def test_a_conversation_over_the_context_is_422_until_drop_oldest(store_path: Path) -> None:
    defaults = simulator.Scenario(dialect="llamacpp", output_tokens=4)
    with (
        simulator.serve(profile="test-fast", defaults=defaults, context_length=300) as small,
        service(store_path, small.base_url) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        with PromptStore(store_path) as store:
            store.save("say", "{{text}}")
        body = {"chat": "long", "variables": {"text": "a" * 600}}
        first = client.post("/api/prompts/say/runs", json=body)
        read_events(client, first.json()["events_url"])

        def chats() -> int:
            return len([r for r in small.records() if r.path.endswith("/chat/completions")])

        sent = chats()
        refused = client.post(
            "/api/prompts/say/runs", json={**body, "variables": {"text": "b" * 600}}
        )
        assert refused.status_code == 422
        message = refused.json()["error"]
        assert "300-token context" in message
        assert 'send "drop_oldest": true' in message
        assert str(store_path) not in message
        assert chats() == sent, "nothing was sent"
        kept = client.post(
            "/api/prompts/say/runs",
            json={**body, "variables": {"text": "b" * 600}, "drop_oldest": True},
        )
        assert kept.status_code == 201, kept.text
        events, _ = read_events(client, kept.json()["events_url"])
        assert events[-1].event == "done"


def test_diff_lists_what_changed_between_versions(client: httpx.Client) -> None:
    diff = client.get("/api/prompts/greet/diff", params={"a": 1}).json()
    assert (diff["old"], diff["new"]) == ("greet@1", "greet@2")
    assert [c["field"] for c in diff["changes"]] == ["template", "model", "description"]
    assert diff["changes"][1] == {"field": "model", "old": None, "new": MODEL}
    assert (
        "-Say hello to {{who}} in {{lang}}.\n+Say hello to {{who}} in {{lang}}, briefly."
        in (diff["unified"])
    )
    same = client.get("/api/prompts/greet/diff", params={"a": 2, "b": 2}).json()
    assert same["changes"] == []
    assert same["unified"] == "No differences between greet@2 and greet@2.\n"
    missing = client.get("/api/prompts/greet/diff", params={"a": 7})
    assert missing.status_code == 404
    assert "GET /api/prompts/greet for the versions it has" in missing.json()["error"]
    assert client.get("/api/prompts/greet/diff").status_code == 400
