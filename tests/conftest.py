"""Shared fixtures: one simulator per session on a free loopback port, and isolation from env."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmstream_nb import simulator


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
