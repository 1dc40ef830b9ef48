"""The client and the CLI against a server nobody here wrote: llama.cpp's own ``llama-server``.

``tools/llama_server.py`` (the project's launcher) builds it once (about 6 minutes on 2 cores,
then cached) and serves SmolLM2-135M as ``smollm2`` on 127.0.0.1. Its wire format differs from
LM Studio's (``content: null`` openers, ``timings``, plain-JSON 400s on stream requests), which
is the point. These tests are skipped, with the reason shown, only when the build is impossible
here (no compiler or cmake); a build that fails is a test failure.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from real_llama import Server, launcher
from waiting import wait_until

from lmstream_nb import Budgets, LMStudioClient, PromptTooLong, TextDelta

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


@pytest.fixture(scope="module")
def real_server() -> Iterator[Server]:
    reason = launcher.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    try:
        server = launcher.start()
    except launcher.Unavailable as exc:
        pytest.fail(f"llama.cpp's server did not start: {exc}")
    with server:
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


async def test_prompt_longer_than_context_is_one_clear_sentence(real_server: Server) -> None:
    async with LMStudioClient(real_server.base_url, budgets=BUDGETS) as client:
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
