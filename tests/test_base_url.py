"""A bad base URL is one sentence everywhere one is accepted, and credentials in it stay secret.

Python API, CLI subprocesses, the magic in a real kernel, the widget and ``lmstream serve``:
each gets the same sentence from the one validating function (``_config.parse_base_url``).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from notebook_kernel import Kernel, running_kernel

from lmstream_nb import (
    InvalidBaseURL,
    LMStudioClient,
    Prompt,
    PromptRunner,
    PromptStore,
    SyncLMStudioClient,
    arun,
    run,
    run_many,
    serve,
    simulator,
)
from lmstream_nb._config import parse_base_url, redact_url

# (url, what the sentence must say)
BAD_URLS = [
    ("http://localhost:abc/v1", "has the port 'abc', which is not a number from 1 to 65535"),
    ("http://localhost:99999/v1", "has the port '99999'"),
    ("http://[::1/v1", "has a broken IPv6 address ('[::1')"),
    ("http://[::1]x/v1", "has a broken IPv6 address"),
    ("http://[nope]:1234/v1", "has a broken IPv6 address"),
    ("ftp://localhost:1234/v1", "uses the scheme 'ftp', and only http and https are supported"),
    ("localhost:1234/v1", "does not start with http:// or https://"),
    ("//localhost:1234/v1", "does not start with http:// or https://"),
    ("http:///v1", "names no host"),
    ("http://:1234/v1", "names no host"),
    ("http://local host:1234/v1", "contains a space or a control character"),
]
# Refused by httpx's stricter host rules (IDNA), caught by the client with the same kind of
# sentence.
HTTPX_BAD = [("http://xn--zz:1234/v1", "cannot be used")]
IDS = [url for url, _ in BAD_URLS]


def one_sentence(text: str) -> None:
    assert text.count("\n") == 0, text
    assert text.endswith("."), text
    assert "Traceback" not in text


@pytest.mark.parametrize(("url", "what"), BAD_URLS, ids=IDS)
def test_the_validating_function_says_what_is_wrong(url: str, what: str) -> None:
    with pytest.raises(InvalidBaseURL) as info:
        parse_base_url(url)
    message = str(info.value)
    assert what in message
    assert "like http://" in message or "fix the port" in message or "remove it" in message
    one_sentence(message)


def test_credentials_in_a_bad_url_are_not_repeated() -> None:
    with pytest.raises(InvalidBaseURL) as info:
        parse_base_url("http://admin:hunter2@localhost:abc/v1?key=sekret")
    assert "hunter2" not in str(info.value)
    assert "sekret" not in str(info.value)
    assert info.value.url == "http://localhost:abc/v1?key=***"


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("http://localhost:1234/v1/", ("http://localhost:1234/v1", "", None, None)),
        ("HTTPS://Example.test/api/v1", ("https://Example.test/api/v1", "", None, None)),
        ("http://[::1]:1234/v1", ("http://[::1]:1234/v1", "", None, None)),
        ("http://u%40x:p%3Aw@h:1/v1?a=1", ("http://h:1/v1", "a=1", "u@x", "p:w")),
        ("http://token@h/v1", ("http://h/v1", "", "token", None)),
    ],
)
def test_good_urls_are_taken_apart(url: str, parts: tuple[object, ...]) -> None:
    parsed = parse_base_url(url)
    assert (parsed.url, parsed.query, parsed.username, parsed.password) == parts


def test_redaction_removes_userinfo_and_masks_every_query_value() -> None:
    assert redact_url("http://u:p@[::1]:8/v1?key=k1&api-version=2&x=&bare") == (
        "http://[::1]:8/v1?key=***&api-version=***&x=&***"
    )
    assert redact_url("not a url at all") == "not a url at all"
    assert redact_url("http://u:p@h:abc/v1") == "http://h:abc/v1", "works on unparsable URLs"


# -- the Python API --------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PromptStore]:
    with PromptStore(tmp_path / "runs.db") as s:
        s.save("hello", "Hello {{name}}")
        yield s


@pytest.mark.parametrize(("url", "what"), BAD_URLS[::2], ids=IDS[::2])
def test_clients_refuse_a_bad_url_at_once(url: str, what: str) -> None:
    with pytest.raises(InvalidBaseURL, match=re.escape(what)):
        LMStudioClient(url)
    with pytest.raises(InvalidBaseURL, match=re.escape(what)):
        SyncLMStudioClient(url)


@pytest.mark.parametrize(("url", "what"), HTTPX_BAD)
def test_a_host_only_httpx_refuses_is_one_sentence_too(url: str, what: str) -> None:
    with pytest.raises(InvalidBaseURL, match=what) as info:
        LMStudioClient(url)
    one_sentence(str(info.value))


def test_a_bad_url_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSTREAM_BASE_URL", "http://[::1/v1")
    with pytest.raises(InvalidBaseURL, match="broken IPv6"):
        LMStudioClient()


def test_run_refuses_a_bad_url_and_records_nothing(store: PromptStore) -> None:
    with pytest.raises(InvalidBaseURL):
        run("hello", {"name": "x"}, store=store, base_url="http://h:abc/v1")
    with pytest.raises(InvalidBaseURL):
        run_many("hello", [{"name": "x"}], store=store, base_url="ftp://h/v1", progress=False)
    assert store.history() == []


@pytest.mark.anyio
async def test_arun_refuses_a_bad_url(store: PromptStore) -> None:
    with pytest.raises(InvalidBaseURL):
        await arun(Prompt("Hi"), store=store, base_url="http:///v1")
    assert store.history() == []


def test_the_widget_refuses_a_bad_url(store: PromptStore) -> None:
    with pytest.raises(InvalidBaseURL, match="has the port 'abc'"):
        PromptRunner(store=store, base_url="http://h:abc/v1")


def test_the_service_refuses_a_bad_url(store: PromptStore) -> None:
    with pytest.raises(InvalidBaseURL, match="broken IPv6"):
        serve.create_app(store=store, base_url="http://[::1/v1")


# -- the command line ------------------------------------------------------------------------


def lmstream(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMSTREAM_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "lmstream_nb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def refused_in_one_line(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode in (1, 2), (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert what in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("url", "what"), BAD_URLS[:3] + BAD_URLS[5:8], ids=IDS[:3] + IDS[5:8])
def test_lmstream_run_with_a_bad_url(tmp_path: Path, url: str, what: str) -> None:
    refused_in_one_line(lmstream("run", "Hi", "--base-url", url, home=tmp_path), what)


def test_lmstream_models_batch_and_serve_with_a_bad_url(tmp_path: Path) -> None:
    bad, what = BAD_URLS[2]
    refused_in_one_line(lmstream("models", "--base-url", bad, home=tmp_path), what)
    assert lmstream("prompts", "add", "hello", "Hello {{name}}", home=tmp_path).returncode == 0
    rows = tmp_path / "rows.csv"
    rows.write_text("name\nAda\n", encoding="utf-8")
    refused_in_one_line(
        lmstream("batch", "hello", str(rows), "--base-url", bad, home=tmp_path), what
    )
    refused_in_one_line(lmstream("serve", "--port", "0", "--base-url", bad, home=tmp_path), what)


def test_lmstream_serve_prints_the_redacted_base_url(tmp_path: Path) -> None:
    url = "http://alice:pa55-word@127.0.0.1:9/v1?key=k-secret-1"
    with subprocess.Popen(
        [sys.executable, "-m", "lmstream_nb", "serve", "--port", "0", "--base-url", url],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LMSTREAM_HOME": str(tmp_path)},
    ) as proc:
        try:
            assert proc.stderr is not None
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stderr, selectors.EVENT_READ)
                assert selector.select(30), "no start-up line within 30 s"
            line = proc.stderr.readline()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert "listening on http://127.0.0.1:" in line
    assert "(models at http://127.0.0.1:9/v1?key=***)" in line
    for secret in ("pa55-word", "alice", "k-secret-1"):
        assert secret not in line


# -- the magic, in a real kernel -------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    home = tmp_path_factory.mktemp("kernel-home")
    with simulator.serve(profile="test-fast") as sim:
        env = {**os.environ, "LMSTREAM_HOME": str(home), "LMSTREAM_BASE_URL": sim.base_url}
        with running_kernel(env) as k:
            cell = k.execute("%load_ext lmstream_nb")
            assert cell.status == "ok", cell.error()
            yield k


def refused_in_the_kernel(kernel: Kernel, code: str, what: str) -> None:
    cell = kernel.execute(code)
    assert cell.status == "error"
    err = cell.error()
    assert err is not None
    assert err["ename"] == "InvalidBaseURL", err
    line = " ".join(err["traceback"])  # one sentence, cut into lines at spaces
    assert line.count(". ") == 0, "one sentence"
    assert what in line


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("url", "what"), [BAD_URLS[0], BAD_URLS[2], BAD_URLS[5]], ids=[IDS[0], IDS[2], IDS[5]]
)
def test_the_magic_with_a_bad_url(kernel: Kernel, url: str, what: str) -> None:
    refused_in_the_kernel(kernel, f"%%lmstream --base-url {url} --model m\nHi", what)


@pytest.mark.timeout(120)
def test_the_magic_line_forms_and_the_widget_in_the_kernel(kernel: Kernel) -> None:
    bad, what = BAD_URLS[0]
    refused_in_the_kernel(kernel, f"%lmstream models --base-url {bad}", what)
    refused_in_the_kernel(
        kernel, f"import lmstream_nb\nlmstream_nb.PromptRunner(base_url={bad!r})", what
    )
