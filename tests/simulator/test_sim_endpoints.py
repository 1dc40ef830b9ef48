"""Endpoint shapes, headers and request errors, checked against LM Studio's wire format."""

from __future__ import annotations

import re

import pytest
from sim_helpers import EMBED_MODEL, MODEL, chat_body

from lmstream_nb import simulator

ID = re.compile(r"^chatcmpl-[a-z0-9]{20}$")


def test_v1_models_lists_every_downloaded_model(sim, client):
    response = client.get(sim.base_url + "/models")

    assert response.status_code == 200
    assert response.json() == {
        "data": [
            {"id": MODEL, "object": "model", "owned_by": "organization_owner"},
            {"id": EMBED_MODEL, "object": "model", "owned_by": "organization_owner"},
        ],
        "object": "list",
    }


def test_every_response_has_express_headers(sim, client):
    response = client.get(sim.base_url + "/models")

    assert response.headers["x-powered-by"] == "Express"
    assert response.headers["connection"] == "keep-alive"
    assert response.headers["keep-alive"] == "timeout=5"
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert "server" not in response.headers


def test_v0_models_show_type_and_state(sim, client):
    data = client.get(sim.root_url + "/api/v0/models").json()

    assert data["object"] == "list"
    llm, embed = data["data"]
    assert llm["id"] == MODEL
    assert llm["type"] == "llm"
    assert llm["state"] == "loaded"
    assert llm["max_context_length"] == 131072
    for key in ("publisher", "arch", "compatibility_type", "quantization"):
        assert isinstance(llm[key], str)
    assert embed["type"] == "embeddings"
    assert embed["state"] == "not-loaded"


def test_v0_single_model_and_unknown_one(sim, client):
    one = client.get(sim.root_url + f"/api/v0/models/{MODEL}")
    missing = client.get(sim.root_url + "/api/v0/models/nope")

    assert one.json()["id"] == MODEL
    assert one.json()["type"] == "llm"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_non_streaming_completion_shape(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions", json=chat_body(sim={"output_tokens": 12})
    )

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "system_fingerprint",
    }
    assert ID.match(body["id"])
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["system_fingerprint"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["reasoning_content"] == ""
    assert len(choice["message"]["content"]) > 12
    usage = body["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


def test_json_is_compact_raw_utf8(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions",
        json=chat_body(sim={"output_tokens": 400, "time_scale": 0}),
    )

    assert b'"object":"chat.completion"' in response.content
    assert b"\\u" not in response.content
    assert not response.content.isascii()  # the vocabulary's café, naïve, → come through raw


def test_max_tokens_caps_output_with_length_reason(sim, client):
    capped = client.post(
        sim.base_url + "/chat/completions", json=chat_body(max_tokens=7, sim={"output_tokens": 50})
    ).json()
    unlimited = client.post(
        sim.base_url + "/chat/completions", json=chat_body(max_tokens=-1, sim={"output_tokens": 9})
    ).json()

    assert capped["usage"]["completion_tokens"] == 7
    assert capped["choices"][0]["finish_reason"] == "length"
    assert unlimited["usage"]["completion_tokens"] == 9
    assert unlimited["choices"][0]["finish_reason"] == "stop"


def test_default_output_is_150_tokens(sim, client):
    body = client.post(sim.base_url + "/chat/completions", json=chat_body()).json()

    assert body["usage"]["completion_tokens"] == 150


def test_v0_completion_adds_stats_model_info_runtime(sim, client):
    body = client.post(
        sim.root_url + "/api/v0/chat/completions",
        json=chat_body(max_tokens=5, sim={"output_tokens": 20}),
    ).json()

    assert body["usage"]["completion_tokens"] == 5
    assert body["stats"]["stop_reason"] == "maxPredictedTokensReached"
    assert body["stats"]["tokens_per_second"] > 0
    assert body["stats"]["time_to_first_token"] >= 0
    assert body["model_info"] == {
        "arch": "llama",
        "quant": "Q4_K_M",
        "format": "gguf",
        "context_length": 131072,
    }
    assert body["runtime"]["supported_formats"] == ["gguf"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/chat/completions"), ("GET", "/v1/chat/completions"), ("DELETE", "/v1/models")],
)
def test_unknown_endpoint_or_method_is_200_with_string_error(sim, client, method, path):
    response = client.request(method, sim.root_url + path)

    assert response.status_code == 200
    assert response.json() == {"error": f"Unexpected endpoint or method. ({method} {path})"}


def test_invalid_json_is_400_object_error(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "Invalid JSON" in error["message"]


def test_missing_messages_is_400(sim, client):
    response = client.post(sim.base_url + "/chat/completions", json={"model": MODEL})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert "messages" in response.json()["error"]["message"]


def test_unknown_model_is_400_model_not_found(sim, client):
    response = client.post(sim.base_url + "/chat/completions", json=chat_body(model="o4-mini"))

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": f'Invalid model identifier "o4-mini". Please specify a valid downloaded '
            f"model (e.g., {MODEL}, {EMBED_MODEL}).",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_embedding_model_cannot_chat(sim, client):
    response = client.post(sim.base_url + "/chat/completions", json=chat_body(model=EMBED_MODEL))

    assert response.status_code == 400
    assert "embedding" in response.json()["error"]["message"]


def test_missing_model_uses_the_loaded_one(sim, client):
    body = chat_body(sim={"output_tokens": 3})
    del body["model"]

    response = client.post(sim.base_url + "/chat/completions", json=body)

    assert response.json()["model"] == MODEL


def test_context_overflow_is_400_string_error(client):
    with simulator.serve(profile="test-fast", context_length=100) as small:
        fits = client.post(
            small.base_url + "/chat/completions",
            json=chat_body("x" * 400, sim={"output_tokens": 1}),
        )
        too_long = client.post(
            small.base_url + "/chat/completions", json=chat_body("x" * 404, stream=True)
        )

    assert fits.status_code == 200
    assert too_long.status_code == 400
    assert too_long.json() == {
        "error": "The number of tokens to keep from the initial prompt is greater than the "
        "context length. Try to load the model with a larger context length, or provide a "
        "shorter input"
    }


def test_unknown_sim_field_is_400_naming_it(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions", json=chat_body(sim={"stal_at": 3, "output_tokens": 1})
    )

    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "stal_at" in message
    assert "stall_at" in message  # the known fields are listed


def test_invalid_sim_value_is_400(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions", json=chat_body(sim={"reasoning": "loud"})
    )

    assert response.status_code == 400
    assert "reasoning must be one of" in response.json()["error"]["message"]


def test_no_model_scenario_gives_lm_studio_string_error(sim, client):
    response = client.post(
        sim.base_url + "/chat/completions", json=chat_body(stream=True, sim={"no_model": True})
    )

    assert response.status_code == 400
    assert response.json() == {
        "error": "No models loaded. Please load a model in the developer page or use the "
        "'lms load' command."
    }


def test_no_model_server_lists_nothing_loaded(client):
    config = simulator.SimConfig(profile="test-fast", defaults=simulator.Scenario(no_model=True))
    with simulator.serve(config) as empty:
        states = [m["state"] for m in client.get(empty.root_url + "/api/v0/models").json()["data"]]
        response = client.post(empty.base_url + "/chat/completions", json=chat_body())

    assert states == ["not-loaded", "not-loaded"]
    assert response.status_code == 400
    assert response.json()["error"].startswith("No models loaded.")


def test_any_model_quirk_serves_unknown_names(client):
    with simulator.serve(profile="test-fast", any_model=True) as quirky:
        response = client.post(
            quirky.base_url + "/chat/completions",
            json=chat_body(model="gpt-4o", sim={"output_tokens": 2}),
        )

    assert response.status_code == 200
    assert response.json()["model"] == MODEL


def test_api_key_required_when_configured(client):
    with simulator.serve(profile="test-fast", api_key="s3cret") as locked:
        missing = client.get(locked.base_url + "/models")
        wrong = client.get(locked.base_url + "/models", headers={"Authorization": "Bearer nope"})
        right = client.get(locked.base_url + "/models", headers={"Authorization": "Bearer s3cret"})
        locked.wait_for(lambda r: r.outcome == "completed", timeout=5)
        records = locked.records()

    assert missing.status_code == 401
    error = missing.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["code"] == "invalid_api_key"
    assert error["message"].startswith("An LM Studio API token is required")
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert [r.outcome for r in records] == ["http_error", "http_error", "completed"]
