"""Fixtures for the simulator tests.

Every test talks to a real simulator over loopback HTTP with plain httpx. Most tests share one
server per module (``sim``) and choose their scenario per request with the ``"sim"`` body key;
tests that need a different server configuration start their own with ``simulator.serve``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sim_helpers import TIMEOUT

from lmstream_nb import simulator


@pytest.fixture(scope="module")
def sim() -> Iterator[simulator.SimServer]:
    with simulator.serve(profile="test-fast") as server:
        yield server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as c:
        yield c
