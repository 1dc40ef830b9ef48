"""LM Studio 0.4's native REST API on the simulator: ``/api/v1/chat`` (named events and the
non-streaming body), ``/api/v1/models``, load and unload, JIT-load and prompt progress."""

from __future__ import annotations

import argparse
import itertools
import math

import httpx
import pytest
from sim_helpers import EMBED_MODEL, MODEL, Event, chat_body, native_body, parse_sse, stream

from lmstream_nb import simulator
from lmstream_nb.simulator._pace import LOAD_STEPS, MAX_PROMPT_EVENTS

_BLOCK = ("reasoning", "message")


def native_stream(client: httpx.Client, url: str, body: dict) -> tuple[int, list[Event]]:
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        raw = response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    events, _ = parse_sse(raw)
    return response.status_code, events


def names(events: list[Event]) -> list[str]:
    return [e.event or "" for e in events]


def squeeze(kinds: list[str]) -> list[str]:
    """The event names with runs of the same name folded into one."""
    out: list[str] = []
    for kind in kinds:
        if not out or out[-1] != kind:
            out.append(kind)
    return out


def test_every_event_names_its_type_and_they_come_in_order(sim, client):
    body = native_body("Think first.", sim={"reasoning": "separate", "reasoning_tokens": 4})
    status, events = native_stream(client, sim.root_url + "/api/v1/chat", body)

    assert status == 200
    assert all(e.json()["type"] == e.event for e in events)
    assert squeeze(names(events)) == [
        "chat.start",
        "prompt_processing.start",
        "prompt_processing.progress",
        "prompt_processing.end",
        "reasoning.start",
        "reasoning.delta",
        "reasoning.end",
        "message.start",
        "message.delta",
        "message.end",
        "chat.end",
    ]
    assert events[0].json()["model_instance_id"] == MODEL
    deltas = {k: [e.json()["content"] for e in events if e.event == f"{k}.delta"] for k in _BLOCK}
    assert len(deltas["reasoning"]) == 4
    result = events[-1].json()["result"]
    assert result["model_instance_id"] == MODEL
    assert result["output"] == [
        {"type": "reasoning", "content": "".join(deltas["reasoning"])},
        {"type": "message", "content": "".join(deltas["message"])},
    ]
    stats = result["stats"]
    assert set(stats) == {
        "input_tokens",
        "total_output_tokens",
        "reasoning_output_tokens",
        "tokens_per_second",
        "time_to_first_token_seconds",
    }  # no model_load_time_seconds: the model was loaded already
    assert stats["total_output_tokens"] == 4 + len(deltas["message"])
    assert stats["reasoning_output_tokens"] == 4
    assert result["response_id"].startswith("resp_")
    record = sim.wait_for(lambda r: r.id == result["response_id"] and r.outcome != "running")
    assert (record.path, record.outcome, record.stage) == ("/api/v1/chat", "completed", "done")
    assert record.sent_tokens == stats["total_output_tokens"]


def test_the_same_prompt_gets_the_same_text_as_on_v1(sim, client):
    native = client.post(
        sim.root_url + "/api/v1/chat",
        json=native_body("Same words.", system_prompt="Be brief.", sim={"output_tokens": 12}),
    ).json()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Same words."},
    ]
    v1 = client.post(
        sim.base_url + "/chat/completions",
        json={"model": MODEL, "messages": messages, "sim": {"output_tokens": 12}},
    ).json()

    assert native["output"] == [
        {"type": "message", "content": v1["choices"][0]["message"]["content"]}
    ]
    assert native["stats"]["input_tokens"] == v1["usage"]["prompt_tokens"]


def test_non_streaming_body_and_its_fields(sim, client):
    body = native_body(
        [{"type": "message", "content": "Hello there."}],
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repeat_penalty=1.1,
        max_output_tokens=5,
        reasoning="off",
        store=False,
        sim={"reasoning": "separate"},
    )
    response = client.post(sim.root_url + "/api/v1/chat", json=body)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    result = response.json()
    assert set(result) == {"model_instance_id", "output", "stats", "response_id"}
    assert [item["type"] for item in result["output"]] == ["message"]  # reasoning "off"
    assert result["stats"]["total_output_tokens"] == 5  # max_output_tokens
    assert result["stats"]["reasoning_output_tokens"] == 0


def test_models_list_loaded_instances_with_their_config(client):
    models = ("lmstream-sim-8b", "other-3b", "lmstream-sim-embed", "tiny-mlx")
    with simulator.serve(profile="test-fast", models=models, context_length=8192) as sim:
        listing = client.get(sim.root_url + "/api/v1/models").json()

    entries = {m["key"]: m for m in listing["models"]}
    assert list(entries) == list(models)
    first = entries["lmstream-sim-8b"]
    assert first["type"] == "llm"
    assert first["format"] == "gguf"
    assert first["max_context_length"] >= 8192
    assert set(first["quantization"]) == {"name", "bits_per_weight"}
    assert set(first["capabilities"]) == {"vision", "trained_for_tool_use", "reasoning"}
    [instance] = first["loaded_instances"]
    assert instance["id"] == "lmstream-sim-8b"
    assert instance["config"]["context_length"] == 8192
    assert instance["config"]["parallel"] == 4
    assert entries["other-3b"]["loaded_instances"] == []
    assert entries["lmstream-sim-embed"]["type"] == "embedding"
    assert entries["tiny-mlx"]["format"] == "mlx"


def test_load_and_unload(client):
    with simulator.serve(profile="test-fast", models=(MODEL, "tiny-mlx")) as sim:
        root = sim.root_url + "/api/v1/models"
        unloaded = client.post(root + "/unload", json={"instance_id": MODEL})
        after_unload = client.get(root).json()["models"][0]["loaded_instances"]
        again = client.post(root + "/unload", json={"instance_id": MODEL})
        loaded = client.post(root + "/load", json={"model": MODEL, "context_length": 4096})
        after_load = client.get(root).json()["models"][0]["loaded_instances"]
        reloaded = client.post(root + "/load", json={"model": MODEL})
        kept = client.get(root).json()["models"][0]["loaded_instances"][0]["config"]
        mlx = client.post(root + "/load", json={"model": "tiny-mlx"})
        mlx_config = client.get(root).json()["models"][1]["loaded_instances"][0]["config"]
        unknown = client.post(root + "/load", json={"model": "nope-1b"})
        missing = client.post(root + "/unload", json={})

    assert (unloaded.status_code, unloaded.json()) == (200, {"instance_id": MODEL})
    assert after_unload == []
    assert again.status_code == 404
    assert again.json()["error"]["type"] == "model_not_found"
    assert loaded.status_code == 200
    body = loaded.json()
    assert (body["type"], body["instance_id"], body["status"]) == ("llm", MODEL, "loaded")
    assert body["load_time_seconds"] >= 0
    assert after_load[0]["config"]["context_length"] == 4096
    assert reloaded.status_code == 200
    assert kept["context_length"] == 4096  # a reload without one keeps the context
    assert mlx.status_code == 200
    assert mlx_config["parallel"] == 1  # MLX models answer one request at a time
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert missing.status_code == 400
    assert missing.json()["error"] == {
        "type": "invalid_request",
        "message": '"instance_id" is required',
        "code": "missing_required_parameter",
        "param": "instance_id",
    }


def test_a_jit_load_reports_its_progress_once(client):
    models = (MODEL, "other-3b")
    with simulator.serve(profile="test-fast", models=models) as sim:
        url = sim.root_url + "/api/v1/chat"
        body = native_body("Load me.", model="other-3b", context_length=16384)
        body["sim"] = {"load_s": 0.2, "output_tokens": 3}
        _, first = native_stream(client, url, body)
        _, second = native_stream(client, url, body)
        listing = client.get(sim.root_url + "/api/v1/models").json()

    kinds = names(first)
    assert kinds[:2] == ["chat.start", "model_load.start"]
    loads = [e.json() for e in first if e.event == "model_load.progress"]
    fractions = [p["progress"] for p in loads]
    assert len(fractions) == LOAD_STEPS
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert all(p["model_instance_id"] == "other-3b" for p in loads)
    end = kinds.index("model_load.end")
    assert end == kinds.index("prompt_processing.start") - 1
    load_time = first[end].json()["load_time_seconds"]
    assert load_time >= 0.2
    stats = first[-1].json()["result"]["stats"]
    assert stats["model_load_time_seconds"] == load_time
    assert not [k for k in names(second) if k.startswith("model_load")]
    assert "model_load_time_seconds" not in second[-1].json()["result"]["stats"]
    other = listing["models"][1]["loaded_instances"][0]
    assert other["config"]["context_length"] == 16384  # the request's context_length


@pytest.mark.parametrize(("tokens", "batch"), [(1000, 256), (1000, 1000), (3000, 1)])
def test_prompt_progress_cadence(sim, client, tokens, batch):
    body = native_body("x" * (4 * tokens), sim={"batch_size": batch, "output_tokens": 2})
    _, events = native_stream(client, sim.root_url + "/api/v1/chat", body)

    progress = [e.json()["progress"] for e in events if e.event == "prompt_processing.progress"]
    step = max(batch, math.ceil(tokens / MAX_PROMPT_EVENTS))  # a batch, but bounded
    assert len(progress) == 1 + math.ceil(tokens / step) <= 1 + MAX_PROMPT_EVENTS
    assert progress[0] == 0.0
    assert progress[-1] == 1.0
    assert all(a < b for a, b in itertools.pairwise(progress))
    assert math.isclose(progress[1], min(1.0, step / tokens), abs_tol=1e-4)  # 4 decimals


def test_prompt_progress_comes_while_the_prompt_is_processed(client):
    """The events arrive during processing, not all at its end: the client reads the first one,
    and the simulator's record still says the prompt is being processed."""
    with simulator.serve(profile="test-fast") as sim:
        body = native_body(
            "y" * 4000, stream=True, sim={"prefill_tps": 100, "batch_size": 100}
        )  # 10 s of prompt processing
        with client.stream("POST", sim.root_url + "/api/v1/chat", json=body) as response:
            seen = ""
            pieces = response.iter_text()  # kept: closing it would close the response
            while "prompt_processing.progress" not in seen:
                seen += next(pieces)
            record = sim.wait_for(lambda r: r.path == "/api/v1/chat")
            assert (record.stage, record.outcome) == ("prefill", "running")
        gone = sim.wait_for(lambda r: r.outcome != "running" and r.path == "/api/v1/chat")

    assert (gone.outcome, gone.disconnect_phase) == ("client_disconnected", "prefill")


def test_cancelling_during_generation_is_recorded(client):
    with simulator.serve(profile="test-fast") as sim:
        body = native_body("Slow.", stream=True, sim={"gen_tps": 20, "output_tokens": 200})
        with client.stream("POST", sim.root_url + "/api/v1/chat", json=body) as response:
            for line in response.iter_lines():
                if line == "event: message.delta":
                    break
        record = sim.wait_for(lambda r: r.outcome != "running" and r.path == "/api/v1/chat")

    assert (record.outcome, record.disconnect_phase) == ("client_disconnected", "generation")
    assert record.sent_tokens < 200


def test_an_error_mid_stream_is_followed_by_chat_end_with_the_partial_text(sim, client):
    body = native_body("Fail soon.", sim={"error_at": 3, "error_message": "Compute error."})
    status, events = native_stream(client, sim.root_url + "/api/v1/chat", body)

    assert status == 200
    kinds = names(events)
    assert kinds[-2:] == ["error", "chat.end"]
    assert "message.end" not in kinds
    assert events[-2].json()["error"] == {
        "type": "internal_error",
        "message": "Compute error.",
        "code": None,
        "param": None,
    }
    text = "".join(e.json()["content"] for e in events if e.event == "message.delta")
    result = events[-1].json()["result"]
    assert result["output"] == [{"type": "message", "content": text}]
    assert result["stats"]["total_output_tokens"] == 3
    record = sim.wait_for(lambda r: r.id == result["response_id"] and r.outcome != "running")
    assert record.outcome == "stream_error"


def test_malformed_and_truncated_native_streams(sim, client):
    url = sim.root_url + "/api/v1/chat"
    _, broken = native_stream(client, url, native_body("a", sim={"malformed_at": 1}))
    _, cut = native_stream(client, url, native_body("b", sim={"end_at": 2}))

    bad = [e for e in broken if e.event == "message.delta" and "broken" in e.data]
    assert [e.data for e in bad] == ['{"id": broken']
    assert names(broken)[-1] == "chat.end"
    assert names(cut)[-1] == "message.delta"  # the body ended without chat.end
    assert names(cut).count("message.delta") == 2


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (
            {"input": "hi"},
            400,
            {
                "type": "invalid_request",
                "message": '"model" is required',
                "code": "missing_required_parameter",
                "param": "model",
            },
        ),
        (
            {"model": MODEL},
            400,
            {
                "type": "invalid_request",
                "message": '"input" is required',
                "code": "missing_required_parameter",
                "param": "input",
            },
        ),
        ({"model": MODEL, "input": 3}, 400, {"type": "invalid_request", "param": "input"}),
        ({"model": MODEL, "input": "x", "temperature": "hot"}, 400, {"param": "temperature"}),
        ({"model": MODEL, "input": "x", "reasoning": "max"}, 400, {"param": "reasoning"}),
        (
            {"model": "o4-mini", "input": "x"},
            404,
            {"type": "model_not_found", "code": "model_not_found", "param": "model"},
        ),
        ({"model": EMBED_MODEL, "input": "x"}, 400, {"type": "invalid_request"}),
        ({"model": MODEL, "input": "x", "sim": {"nope": 1}}, 400, {"param": "sim"}),
        (
            {"model": MODEL, "input": "x", "sim": {"no_model": True}},
            400,
            {"type": "invalid_request", "param": "model"},
        ),
    ],
)
def test_errors_before_the_stream(sim, client, body, status, error):
    response = client.post(sim.root_url + "/api/v1/chat", json={**body, "stream": True})

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    got = response.json()["error"]
    assert set(got) == {"type", "message", "code", "param"}
    assert {k: got[k] for k in error} == error


def test_a_prompt_over_the_loaded_context_is_refused_before_the_stream(client):
    with simulator.serve(profile="test-fast", context_length=100) as sim:
        body = {**native_body("z" * 800), "stream": True}
        response = client.post(sim.root_url + "/api/v1/chat", json=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request", "input")
    assert "context length" in error["message"]


def test_invalid_json_body(sim, client):
    response = client.post(sim.root_url + "/api/v1/chat", content=b"{not json")

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"


def test_whole_response_faults_apply_to_the_native_api(sim, client):
    response = client.post(
        sim.root_url + "/api/v1/chat",
        json=native_body("x", sim={"http_status": 503, "error_message": "Busy."}),
    )

    assert response.status_code == 503
    assert response.json()["error"]["message"] == "Busy."


def test_a_llamacpp_server_has_no_native_api(client):
    with simulator.serve(
        profile="test-fast", defaults=simulator.Scenario(dialect="llamacpp")
    ) as sim:
        response = client.get(sim.root_url + "/api/v1/models")

    assert response.status_code == 404
    assert response.json() == {
        "error": {"message": "File Not Found", "type": "not_found_error", "code": 404}
    }


@pytest.mark.parametrize("path", ["/api/v1/chat", "/v1/chat/completions"])
def test_prompt_processing_can_stop_for_a_while(sim, client, path):
    """``prompt_stall_at`` pauses processing where it says, after reporting exactly there."""
    scenario = {
        "batch_size": 100,
        "prompt_stall_at": 430,
        "stall_s": 0.3,
        "output_tokens": 2,
        "dialect": "llamacpp",
    }
    if path == "/api/v1/chat":
        body = native_body("w" * 4000, sim=scenario)
        _, events = native_stream(client, sim.root_url + path, body)
        progress = [e.json()["progress"] for e in events if e.event == "prompt_processing.progress"]
        ttft = events[-1].json()["result"]["stats"]["time_to_first_token_seconds"]
    else:
        body = chat_body(
            "w" * 4000,
            sim=scenario,
            return_progress=True,
            stream_options={"include_usage": True},
        )
        chunks = stream(client, sim.root_url + path, body).chunks
        progress = [
            c["prompt_progress"]["processed"] / 1000 for c in chunks if "prompt_progress" in c
        ]
        ttft = chunks[-1]["timings"]["prompt_ms"] / 1000  # the usage chunk

    assert progress == [0.0, 0.1, 0.2, 0.3, 0.4, 0.43, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert ttft >= 0.3  # the pause happened before the first token


def test_lm_studio_0_3_has_no_native_api(client):
    with simulator.serve(profile="test-fast", native_api=False) as sim:
        listing = client.get(sim.root_url + "/api/v1/models")
        chat = client.post(sim.root_url + "/api/v1/chat", json=native_body("Hi"))
        v1 = client.post(sim.base_url + "/chat/completions", json=chat_body("Hi"))
    assert listing.status_code == chat.status_code == 200  # LM Studio's answer to a wrong path
    assert "Unexpected endpoint" in listing.json()["error"]
    assert "Unexpected endpoint" in chat.json()["error"]
    assert v1.status_code == 200
    assert v1.json()["choices"][0]["message"]["content"]


def test_lm_studio_0_3_from_the_command_line():
    parser = argparse.ArgumentParser()
    simulator.add_cli_arguments(parser)
    assert simulator.config_from_cli(parser.parse_args([])).native_api is True
    assert simulator.config_from_cli(parser.parse_args(["--no-native-api"])).native_api is False
