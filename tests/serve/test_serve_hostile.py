"""``lmstream serve`` against hostile and careless clients, over real HTTP on loopback.

Malformed requests of every kind (ids and numbers out of range, lone surrogates, JSON nested
absurdly deep, wrong types, bytes that are not UTF-8) must each get a JSON ``{"error": ...}``
4xx with one sentence, and start nothing. Web pages on other sites must not be able to use a
tokenless server on this machine: foreign Host headers (DNS rebinding), foreign Origins and
POST/DELETE without a JSON Content-Type are refused. Tokens that no client can send back, or
that are weak on an open address, are refused at start-up.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import TIMEOUT, read_events, service

from lmstream_nb import PromptStore, simulator
from lmstream_nb.cli import main
from lmstream_nb.serve import ServeHandle, check_host, serve

JSON = {"content-type": "application/json"}
BIG = "99999999999999999999"  # beyond SQLite's integers


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    store = PromptStore(tmp_path / "lmstream.db")
    store.save("plain", "Tell me about {{topic}}.")
    store.close()
    return tmp_path / "lmstream.db"


@pytest.fixture
def server(store_path: Path, sim: simulator.SimServer) -> Iterator[ServeHandle]:
    with service(store_path, sim.base_url) as handle:
        yield handle


@pytest.fixture
def client(server: ServeHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def assert_refused(response: httpx.Response, status: int | None = None) -> str:
    """A 4xx whose body is exactly ``{"error": "<one sentence>"}``; returns the sentence."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    message: str = body["error"]
    assert message.endswith((".", "?")), message
    assert not re.search(r"[.!?] [A-Z]", message), message  # one sentence
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", f"/api/runs/{BIG}"),
        ("DELETE", f"/api/runs/{BIG}"),
        ("GET", f"/api/runs/{BIG}/events"),
        ("GET", "/api/runs/0"),
        ("GET", "/api/runs/-1"),
        ("GET", "/api/runs/abc"),
        ("GET", "/api/runs/1e3"),
        ("GET", "/api/runs/%C2%B2"),  # a superscript two: a digit to str.isdigit, not to int()
        ("GET", f"/api/runs?limit={BIG}"),
        ("GET", "/api/runs?limit=-1"),
        ("GET", "/api/runs?limit=0"),
        ("GET", "/api/runs?limit=1.5"),
        ("GET", "/api/runs?limit=%C2%B2"),
        ("GET", "/api/runs?limit=" + "9" * 5000),
        ("GET", "/api/runs?status=weird"),
        ("GET", "/api/runs?prompt=" + "x" * 500),
        ("GET", "/api/runs?prompt=%ED%A0%80"),  # the UTF-8 form of a lone surrogate
        ("GET", "/api/runs?model=%FF"),
        ("GET", "/api/prompts/%ED%A0%80"),
        ("GET", "/api/prompts/" + "x" * 300),
        ("GET", "/api/runs/1/events?last_event_id=d:1:1:1"),
        ("GET", "/api/runs/1/events?last_event_id=d:9999999999999:0"),
        ("GET", "/api/runs/1/events?last_event_id=%ED%A0%80"),
    ],
)
def test_bad_addresses_are_400s(client: httpx.Client, method: str, url: str) -> None:
    response = client.request(method, url, json={} if method == "DELETE" else None)
    assert_refused(response, 400)


@pytest.mark.parametrize("value", ["d:1", "x", "d:\u0661:0", "s:1:1 extra", "e:" + "9" * 20 + ":0"])
def test_bad_last_event_id_headers_are_400s(client: httpx.Client, value: str) -> None:
    run = client.post("/api/prompts/plain/runs", json={"variables": {"topic": "x"}}).json()
    response = client.get(run["events_url"], headers={"Last-Event-ID": value.encode("utf-8")})
    assert "Last-Event-ID" in assert_refused(response, 400)


DEEP = b"[" * 20000 + b"]" * 20000


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (rb'{"variables": {"topic": "\ud800"}}', 400, "not Unicode text"),
        (rb'{"variables": {"\udfff": "x"}}', 400, "not Unicode text"),
        (rb'{"variables": {"topic": "x"}, "model": "\ud83d"}', 400, "not Unicode text"),
        (rb'{"variables": {"topic": "x"}, "\ud800": 1}', 400, "not Unicode text"),
        (b'{"variables": {"topic": ' + DEEP + b"}}", 400, "levels deep"),
        (b'{"variables": {"topic": ' + b"[" * 200 + b"]" * 200 + b"}}", 400, "levels deep"),
        (DEEP, 400, "levels deep"),
        (b"{" + b'"a":{' * 5000 + b"}" * 5001, 400, "levels deep"),
        (b'{"variables": {"topic": NaN}}', 400, "NaN"),
        (b'{"variables": {"topic": "x"}, "temperature": Infinity}', 400, "Infinity"),
        (b'{"variables": {"topic": 1e400}}', 400, "finite"),
        (b'{"variables": {"topic": "x"}, "temperature": -1e400}', 400, "finite"),
        (b'{"variables": {"topic": ' + b"9" * 5000 + b"}}", 400, "number too long"),
        (b'{"variables": {"topic": "x"}, "version": ' + BIG.encode() + b"}", 400, "whole number"),
        (b'{"variables": {"topic": "x"}, "version": 1.5}', 400, "whole number"),
        (b'{"variables": {"topic": "x"}, "version": true}', 400, "whole number"),
        (b'{"variables": {"topic": "x"}, "version": 0}', 400, "whole number"),
        (b'{"variables": {"topic": "x"}, "max_tokens": 2147483648}', 400, "whole number"),
        (b'{"variables": {"topic": "x"}, "max_tokens": "many"}', 400, "whole number"),
        (b'{"variables": {"topic": "x"}, "temperature": 3}', 400, "from 0 to 2"),
        (b'{"variables": {"topic": "x"}, "temperature": "hot"}', 400, "from 0 to 2"),
        (b'{"variables": {"topic": "x"}, "model": ""}', 400, "characters"),
        (b'{"variables": {"topic": "x"}, "model": 123}', 400, "characters"),
        (b'{"variables": {"topic": null}}', 400, "not an object"),
        (b'{"variables": {"topic": {"a": 1}}}', 400, "not an object"),
        (b'{"variables": {"": "x"}}', 400, "variable name"),
        (b'{"variables": {"' + b"v" * 300 + b'": "x"}}', 400, "variable name"),
        (
            b'{"variables": {' + b",".join(b'"v%d": 1' % i for i in range(300)) + b"}}",
            400,
            "at most 256",
        ),
        (b'{"variables": "topic"}', 400, "JSON object of names"),
        (b"null", 400, "JSON object"),
        (b"[]", 400, "JSON object"),
        (b'"text"', 400, "JSON object"),
        (b"\xff\xfe{}", 400, "not UTF-8"),
        ('{"variables": {"topic": "x"}}'.encode("utf-16"), 400, "not UTF-8"),
        (b'\xef\xbb\xbf{"variables": {"topic": "x"}}', 400, "not valid JSON"),
        (b"{not json", 400, "not valid JSON"),
        (b'{"variables": {"topic": "x"}}' * 3000, 413, "bytes"),
    ],
)
def test_bad_bodies_are_4xx_with_one_sentence_and_start_nothing(
    client: httpx.Client, body: bytes, status: int, says: str
) -> None:
    response = client.post("/api/prompts/plain/runs", content=body, headers=JSON)
    assert says in assert_refused(response, status)
    assert client.get("/api/runs").json()["runs"] == []


def test_large_but_valid_values_are_accepted(client: httpx.Client, store_path: Path) -> None:
    body: dict[str, Any] = {
        "variables": {"topic": 10**4000},  # a 4001-digit number is still a number
        "model": "lmstream-sim-8b",
        "version": 1,
        "max_tokens": 2**31 - 1,
        "temperature": 2,
    }
    response = client.post("/api/prompts/plain/runs", json=body)
    assert response.status_code == 201, response.text
    events, _ = read_events(client, response.json()["events_url"])
    assert events[-1].event == "done"
    assert PromptStore(store_path).get_run(response.json()["run_id"]).variables == {
        "topic": str(10**4000)
    }


def test_a_valid_id_beyond_the_database_is_a_404_without_its_path(
    client: httpx.Client, store_path: Path
) -> None:
    for method, url in [
        ("GET", f"/api/runs/{2**63 - 1}"),
        ("GET", f"/api/runs/{2**63 - 1}/events"),
        ("DELETE", f"/api/runs/{2**63 - 1}"),
    ]:
        response = client.request(method, url, json={} if method == "DELETE" else None)
        message = assert_refused(response, 404)
        assert str(store_path) not in message
        assert message == (
            f"No run with id {2**63 - 1} is recorded: see GET /api/runs for the runs there are."
        )


def raw_request(server: ServeHandle, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_requests_that_are_not_http_get_a_json_400(server: ServeHandle) -> None:
    for data in (
        b"GET /api/r\xffns HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # not ASCII in the target
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000,  # headers past 16 KiB, still unfinished
    ):
        answer = raw_request(server, data)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"application/json" in head
        assert b"not valid HTTP/1.1" in body


# -- cross-site requests ---------------------------------------------------------------------


def test_post_and_delete_need_a_json_content_type(client: httpx.Client) -> None:
    body = b'{"variables": {"topic": "x"}}'
    for headers in (
        {},
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
    ):
        message = assert_refused(
            client.post("/api/prompts/plain/runs", content=body, headers=headers), 415
        )
        assert "Content-Type: application/json" in message
    assert client.get("/api/runs").json()["runs"] == []
    created = client.post(
        "/api/prompts/plain/runs",
        content=body,
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert created.status_code == 201
    url = created.json()["url"]
    assert_refused(client.delete(url), 415)
    assert_refused(client.request("DELETE", url, content=b"[]", headers=JSON), 400)
    # An empty body with the type is fine too (nothing to say).
    assert client.request("DELETE", url, headers=JSON).status_code in (200, 409)


def test_foreign_origins_are_refused_own_and_listed_ones_are_not(
    store_path: Path, sim: simulator.SimServer
) -> None:
    listed = "http://tools.example.test"
    with (
        service(store_path, sim.base_url, cors_origins=[listed]) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        for origin in ("http://evil.test", "null", f"http://localhost:{server.port + 1}"):
            for method, url in [
                ("GET", "/api/runs"),
                ("GET", "/api/prompts"),
                ("POST", "/api/prompts/plain/runs"),
            ]:
                response = client.request(
                    method,
                    url,
                    headers={"Origin": origin},
                    json={"variables": {"topic": "x"}} if method == "POST" else None,
                )
                message = assert_refused(response, 403)
                assert origin in message
            preflight = client.options(
                "/api/prompts/plain/runs",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            )
            assert_refused(preflight, 403)
        assert client.get("/api/runs").json()["runs"] == []
        own = server.url  # the page at / sends its own origin with every POST
        response = client.post(
            "/api/prompts/plain/runs", headers={"Origin": own}, json={"variables": {"topic": "x"}}
        )
        assert response.status_code == 201
        assert client.get("/api/runs", headers={"Origin": listed}).status_code == 200
        localhost = f"http://localhost:{server.port}"
        assert (
            client.get(
                "/api/runs", headers={"Origin": localhost, "Host": f"localhost:{server.port}"}
            ).status_code
            == 200
        )


def test_the_host_header_must_name_the_server(server: ServeHandle, client: httpx.Client) -> None:
    port = server.port
    for host in (
        f"evil.test:{port}",
        "evil.test",
        f"127.0.0.1:{port + 1}",
        f"localhost.evil.test:{port}",
        "127.0.0.1",
    ):
        response = client.get("/api/runs", headers={"Host": host})
        assert "does not name this server" in assert_refused(response, 421)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        assert client.get("/api/runs", headers={"Host": host}).status_code == 200
    # HTTP/1.0 may leave the Host out: refused as well.
    answer = raw_request(server, b"GET /api/runs HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 421"), answer[:100]
    assert b"no Host header" in answer


def test_ipv6_loopback_is_a_name_of_the_server(store_path: Path, sim: simulator.SimServer) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        handle = serve(host="::1", store=PromptStore(store_path), base_url=sim.base_url)
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1 here ({exc})")
    with handle as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        assert client.get("/api/runs").status_code == 200  # Host: [::1]:port
        assert_refused(client.get("/api/runs", headers={"Host": "evil.test"}), 421)


@pytest.mark.parametrize(
    ("host", "token", "says"),
    [
        ("0.0.0.0", "short-token", "at least 16"),
        ("0.0.0.0", "a" * 40, "not all the same"),
        ("0.0.0.0", " " + "0123456789abcdef" * 2, "whitespace"),
        ("127.0.0.1", "secret-value\n", "whitespace"),
        ("127.0.0.1", "tökén-with-ümlauts", "printable ASCII"),
        ("127.0.0.1", "tab\tinside", "printable ASCII"),
    ],
)
def test_weak_or_unsendable_tokens_are_refused_at_start_up(
    host: str, token: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=says):
        check_host(host, token)
    with pytest.raises(ValueError, match=says):
        serve(host=host, token=token, base_url="http://127.0.0.1:9/v1")
    assert main(["serve", "--host", host, "--port", "0", "--token", token]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstream serve: ")
    assert says in err
    assert token.strip() not in err  # the token itself is never printed
    assert not re.search(r"[.!?] [A-Z]", err.removeprefix("lmstream serve: "))


def test_tokens_that_pass() -> None:
    check_host("0.0.0.0", "0123456789abcdef")
    check_host("127.0.0.1", "short")  # on loopback only the reachable machine can guess
    check_host("127.0.0.1", None)
