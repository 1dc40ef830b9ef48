"""Server life cycle, configuration, CLI flags, the foreground runner and package hygiene."""

from __future__ import annotations

import argparse
import ast
import asyncio
import collections
import dataclasses
import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sim_helpers import MODEL, chat_body

from lmstream_nb import simulator
from lmstream_nb.simulator._scenario import ScenarioError, apply_overrides
from lmstream_nb.simulator._text import TextSource

PACKAGE = pathlib.Path(simulator.__file__).parent
REPO = PACKAGE.parent.parent


def test_serve_from_inside_a_running_event_loop():
    async def main() -> tuple[int, str]:
        with simulator.serve(profile="test-fast") as sim:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(
                    sim.base_url + "/chat/completions", json=chat_body(sim={"output_tokens": 3})
                )
                return response.status_code, response.json()["model"]

    assert asyncio.run(main()) == (200, MODEL)


def test_serve_binds_loopback_free_port_and_stops(client):
    sim = simulator.serve(simulator.SimConfig(profile="test-fast"), seed=5)
    try:
        assert sim.host == "127.0.0.1"
        assert sim.port > 0
        assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
        assert sim.config.seed == 5
        assert client.get(sim.base_url + "/models").status_code == 200
    finally:
        sim.stop()
    sim.stop()  # idempotent

    with pytest.raises(httpx.ConnectError):
        client.get(sim.base_url + "/models")
    assert "stopped" in repr(sim)


def test_stop_drops_a_running_stream(client):
    sim = simulator.serve(profile="test-fast")
    body = chat_body(stream=True, sim={"output_tokens": 5000, "gen_tps": 100})
    with client.stream("POST", sim.base_url + "/chat/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        stopper = threading.Thread(target=sim.stop)
        stopper.start()
        with pytest.raises(httpx.RemoteProtocolError):
            collections.deque(lines, maxlen=0)
    stopper.join(10)
    assert not stopper.is_alive()


def test_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            simulator.serve(port=port)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"profile": "gpu"}, "unknown profile 'gpu'"),
        ({"time_scale": -1}, "time_scale must be"),
        ({"models": ()}, "at least one model"),
        ({"models": "abc"}, "tuple of non-empty model ids"),
        ({"parallel": 0}, "parallel must be an integer >= 1"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        simulator.SimConfig(**fields)


def test_config_defaults():
    config = simulator.SimConfig()

    assert (config.host, config.port, config.profile) == ("127.0.0.1", 0, "laptop-gpu")
    assert config.models == (MODEL, "lmstream-sim-embed")
    assert config.defaults == simulator.Scenario()
    assert simulator.PROFILES["laptop-gpu"] == (150, 30, 7)
    assert simulator.PROFILES["cpu"] == (15, 5, 15)
    assert simulator.PROFILES["test-fast"] == (5000, 500, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_scenario_overrides_merge_over_defaults():
    base = simulator.Scenario(output_tokens=10, reasoning="separate")

    merged = apply_overrides(base, {"output_tokens": 3, "stall_at": 1})

    assert (merged.output_tokens, merged.reasoning, merged.stall_at) == (3, "separate", 1)
    with pytest.raises(ScenarioError, match="output_tokens must be an integer"):
        apply_overrides(base, {"output_tokens": True})
    with pytest.raises(ScenarioError, match='"sim" must be a JSON object'):
        apply_overrides(base, [1])


def test_cli_arguments_build_a_config():
    parser = argparse.ArgumentParser()
    simulator.add_cli_arguments(parser)

    defaults = simulator.config_from_cli(parser.parse_args([]))
    ns = parser.parse_args(
        [
            "--port", "0", "--profile", "cpu", "--time-scale", "0.5", "--seed", "3",
            "--model", "a-7b", "--model", "b-embed", "--any-model", "--api-key", "k",
            "--max-parallel", "2", "--reasoning", "inline", "--output-tokens", "20",
            "--stall-at", "4", "--stall-s", "1.5", "--disconnect-at", "9", "--error-at", "12",
        ]
    )  # fmt: skip
    config = simulator.config_from_cli(ns)

    assert defaults.port == 1234
    assert defaults.profile == "laptop-gpu"
    assert defaults.defaults == simulator.Scenario()
    assert config.models == ("a-7b", "b-embed")
    assert (config.profile, config.time_scale, config.seed) == ("cpu", 0.5, 3)
    assert (config.any_model, config.api_key, config.parallel) == (True, "k", 2)
    scenario = config.defaults
    assert (scenario.reasoning, scenario.output_tokens) == ("inline", 20)
    assert (scenario.stall_at, scenario.stall_s) == (4, 1.5)
    assert (scenario.disconnect_at, scenario.error_at) == (9, 12)
    for action in parser._actions:
        assert action.help, action.dest


def test_run_serves_in_foreground_logs_requests_and_stops_on_ctrl_c():
    script = (
        "from lmstream_nb import simulator\n"
        "simulator.run(simulator.SimConfig(profile='test-fast'),\n"
        "    log=lambda line: print('LOG', line, flush=True),\n"
        "    on_ready=lambda url: print('READY', url, flush=True))\n"
        "print('RETURNED', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in process.stdout], daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        ready = lines.get(timeout=20)
        assert ready.startswith("READY http://127.0.0.1:")
        base_url = ready.split()[1]
        with httpx.Client(timeout=10) as client:
            ok = client.post(
                base_url + "/chat/completions", json=chat_body(sim={"output_tokens": 4})
            )
            with pytest.raises(httpx.RemoteProtocolError):
                client.post(
                    base_url + "/chat/completions", json=chat_body(sim={"disconnect_at": 1})
                )
        first, second = lines.get(timeout=10), lines.get(timeout=10)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
        stderr = process.stderr.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stderr.close()  # type: ignore[union-attr]
        reader.join(10)
        process.stdout.close()  # type: ignore[union-attr]

    assert ok.status_code == 200
    assert first.startswith(f"LOG POST /v1/chat/completions {MODEL} prompt=3 → completed")
    assert "tokens=4/4" in first
    assert "→ fault_disconnect" in second
    assert lines.get(timeout=5).strip() == "RETURNED"
    assert process.returncode == 0
    assert stderr == ""  # no traceback for the deliberate disconnect, no server chatter


def test_public_names():
    assert simulator.__all__ == sorted(simulator.__all__)
    assert set(simulator.__all__) == {
        "PROFILES", "RequestRecord", "Scenario", "SimConfig", "SimServer", "add_cli_arguments",
        "config_from_cli", "run", "serve",
    }  # fmt: skip


def test_simulator_imports_nothing_from_the_client_side():
    """Only its own modules, and the uvicorn thread runner, which itself imports nothing of
    the package (so no client-side reading of the wire format can reach the simulator)."""
    allowed = {"starlette", "uvicorn", "anyio"} | set(sys.stdlib_module_names)
    runner = PACKAGE.parent / "_uvicorn.py"
    for path in [*PACKAGE.glob("*.py"), runner]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1 and path != runner:
                    continue  # the simulator's own modules
                if node.level == 2 and node.module == "_uvicorn" and path != runner:
                    continue  # the thread runner, checked here too
                assert node.level == 0, f"{path.name} imports from outside the simulator"
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=40), max_size=20), seed=st.integers(0, 9))
def test_text_chars_are_a_cut_of_the_token_stream(sizes, seed):
    cut = TextSource(seed=seed, model="m", messages=[])
    whole = TextSource(seed=seed, model="m", messages=[])

    pieces = [cut.chars(n) for n in sizes]
    text = "".join(whole.tokens(sum(sizes) + 1))

    assert [len(p) for p in pieces] == sizes
    assert text.startswith("".join(pieces))


def test_cli_slots_and_batch_size():
    parser = argparse.ArgumentParser()
    simulator.add_cli_arguments(parser)

    def config(*argv: str) -> simulator.SimConfig:
        return simulator.config_from_cli(parser.parse_args(list(argv)))

    assert config().parallel == 4  # LM Studio 0.4's default
    assert config("--parallel", "1").parallel == 1
    assert config("--max-parallel", "2").parallel == 2  # the former name still works
    assert config("--parallel", "unlimited").parallel is None
    assert config("--batch-size", "256").defaults.batch_size == 256
    with pytest.raises(SystemExit):
        parser.parse_args(["--parallel", "many"])
