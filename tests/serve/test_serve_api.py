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
