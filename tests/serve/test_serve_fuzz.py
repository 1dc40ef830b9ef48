"""``lmstream serve`` fuzzed against its own OpenAPI description (schemathesis, property-based).

The description is read from the running server (``/api/openapi.json``), as any client would,
and schemathesis generates requests for every operation from it, valid ones and ones that
break its rules on purpose (wrong types, out-of-range numbers, missing bodies, odd strings).
Every answer must be a non-5xx whose status, content type and body the description declares,
valid requests must be accepted and invalid ones refused. The example count is bounded, so the
run takes seconds; a failure is shrunk to the smallest request that shows it.

The database holds a prompt without variables (so generated run requests can succeed and start
short runs on the simulator) and finished runs with ids 1 and 2 (so generated small ids reach
the history, the event streams and cancellation, not only the 404s).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serve_helpers import TIMEOUT, read_events, service

from lmstream_nb import PromptStore, simulator
from lmstream_nb.serve import ServeHandle
from lmstream_nb.serve._openapi import openapi

pytestmark = pytest.mark.timeout(120)

MODEL = "lmstream-sim-8b"
# Schemathesis' smallest names are "0"-like; a prompt named so gets real runs (5 tokens each).
SHORT = '[[sim {"output_tokens": 5}]] '


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, sim: simulator.SimServer
) -> Iterator[ServeHandle]:
    path = tmp_path_factory.mktemp("fuzz") / "lmstream.db"
    store = PromptStore(path)
    for name in ("0", "plain"):
        store.save(name, SHORT + "Say something.", model=MODEL)
    store.close()
    with service(path, sim.base_url, grace=1.0) as handle:
        with httpx.Client(base_url=handle.url, timeout=TIMEOUT) as client:
            for _ in range(2):
                run = client.post("/api/prompts/plain/runs", json={}).json()
                read_events(client, run["events_url"])
        yield handle


# 422 is the one refusal a schema cannot foresee: which variables a prompt needs depends on the
# stored prompt (the description declares it for exactly that), so a schema-valid request may get
# it. Every other check keeps its default.
CONFIG = {
    "checks": {
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "401", "403", "404", "409", "422"],
        }
    },
}


@pytest.fixture(scope="module")
def described(server: ServeHandle) -> schemathesis.BaseSchema:
    # Fetched like any client would, then handed over as a document: schemathesis' own loader
    # (from_url) leaves out the operation that serves the description, which is fuzzed too.
    response = httpx.get(server.url + "/api/openapi.json", timeout=TIMEOUT)
    assert response.status_code == 200
    return schemathesis.openapi.from_dict(
        response.json(), config=schemathesis.Config.from_dict(CONFIG)
    )


#: Every operation the served description has, as (method, path): the same document, built here.
OPERATIONS = [
    (method.upper(), path) for path, item in openapi()["paths"].items() for method in item
]
#: Operation label -> the statuses it answered during the fuzz.
CALLED: dict[str, set[int]] = {}


# Each operation is its own test, driven by Hypothesis with schemathesis' strategies (requests
# that keep the description and requests that break it). The strategies are used directly, not
# through schemathesis' pytest plugin, which depends on pytest internals that change between
# pytest releases.
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_keeps_its_description(
    method: str, path: str, described: schemathesis.BaseSchema, server: ServeHandle
) -> None:
    operation = described[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def keeps_description(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=server.url, timeout=10)
        CALLED.setdefault(case.operation.label, set()).add(response.status_code)

    keeps_description()


def test_every_operation_was_fuzzed(server: ServeHandle) -> None:
    """Runs after the fuzz (pytest keeps the file's order): no operation was left out, and the
    fuzz got past the checks of each, not only refusals."""
    described = {
        f"{method.upper()} {path}"
        for path, item in server.app.state.openapi["paths"].items()
        for method in item
    }
    assert set(CALLED) == described
    refusals = {400, 413, 415}  # what the request checks answer
    for label, statuses in CALLED.items():
        assert statuses - refusals, (label, statuses)
