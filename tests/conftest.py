"""Shared fixtures: one simulator per session on a free loopback port, and isolation from env.

A session that will need llama.cpp's server starts building it (when it is not cached) as soon
as the tests are collected, so the build overlaps the tests that need no server.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from lmstream_nb import simulator

_background_build: subprocess.Popen[bytes] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _background_build
    if not any(item.get_closest_marker("real_server") for item in session.items):
        return
    from real_llama import launcher

    _background_build = launcher.build_in_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A build still running when the session ends (a failure with -x) is stopped, whole."""
    build = _background_build
    if build is None or build.poll() is not None:
        return
    os.killpg(build.pid, signal.SIGTERM)
    try:
        build.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait(timeout=30)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's LM Studio settings."""
    for name in (
        "LMSTREAM_BASE_URL",
        "LMSTREAM_API_KEY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test gets its own LMSTREAM_HOME, so no test reads or writes the user's database."""
    monkeypatch.setenv("LMSTREAM_HOME", str(tmp_path_factory.mktemp("lmstream_home")))


@pytest.fixture(scope="session")
def sim() -> Iterator[simulator.SimServer]:
    """A fast simulator shared by the session (scenarios are chosen per request)."""
    with simulator.serve(profile="test-fast", seed=1) as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
