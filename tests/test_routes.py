"""Where a request goes (LM Studio's native chat or /chat/completions), and what a probe of the
server's model list or llama.cpp's /props tells: pure decisions, no server needed."""

from __future__ import annotations

from typing import Any

import pytest

from lmstream_nb._routes import (
    UNKNOWN,
    Route,
    ServerInfo,
    choose,
    native_root,
    read_llamacpp_props,
    read_native_models,
    reports_progress,
)

LMSTUDIO = ServerInfo("lmstudio", {"m": 4096}, {"m": 4})
SYSTEM_AND_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": SYSTEM_AND_USER, "stream": True, **extra}


def test_a_system_prompt_and_one_message_go_native_with_store_false() -> None:
    route = choose("auto", LMSTUDIO, body(temperature=0.2, max_tokens=50, top_p=0.9))
    assert route.api == "native"
    assert route.native_body == {
        "model": "m",
        "input": "Hi",
        "system_prompt": "Be brief.",
        "stream": True,
        "store": False,
        "temperature": 0.2,
        "max_output_tokens": 50,
        "top_p": 0.9,
    }


def test_store_can_be_asked_for() -> None:
    route = choose("auto", LMSTUDIO, body(store=True))
    assert route.native_body is not None
    assert route.native_body["store"] is True


@pytest.mark.parametrize(
    ("request_body", "reason"),
    [
        (
            {"messages": [*SYSTEM_AND_USER, {"role": "assistant", "content": "Hello"}]},
            "assistant turns",
        ),
        ({"tools": [{"type": "function"}]}, "'tools'"),
        ({"response_format": {"type": "json_schema"}}, "'response_format'"),
        ({"seed": 3}, "'seed'"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "one user"),
        ({"messages": [{"role": "system", "content": "only"}]}, "needs one user message"),
    ],
)
def test_what_the_native_chat_cannot_carry_stays_on_chat_completions(
    request_body: dict[str, Any], reason: str
) -> None:
    route = choose("auto", LMSTUDIO, body(**request_body))
    assert (route.api, route.native_body) == ("openai", None)
    assert reason in route.reason


def test_api_native_passes_unknown_settings_but_never_tools() -> None:
    assert choose("native", LMSTUDIO, body(seed=3)).native_body["seed"] == 3  # type: ignore[index]
    refused = choose("native", LMSTUDIO, body(tools=[]))
    assert refused.api == "openai"
    assert "'tools'" in refused.reason


def test_other_servers_and_api_openai_keep_chat_completions() -> None:
    assert choose("auto", UNKNOWN, body()).api == "openai"
    assert "no LM Studio native chat" in choose("auto", UNKNOWN, body()).reason
    assert choose("openai", LMSTUDIO, body()).api == "openai"


@pytest.mark.parametrize(
    ("path", "root"),
    [("/v1", "/api/v1"), ("/v1/", "/api/v1"), ("/lmstudio/v1", "/lmstudio/api/v1"), ("", None)],
)
def test_the_native_root_sits_beside_v1(path: str, root: str | None) -> None:
    assert native_root(path) == root


def test_the_native_model_list_gives_each_loaded_context_and_its_slots() -> None:
    listing = {
        "models": [
            {
                "key": "qwen",
                "loaded_instances": [{"id": "qwen:2", "config": {"context_length": 8192}}],
            },
            {"key": "gemma", "loaded_instances": []},
            {"key": "llama", "loaded_instances": [{"config": {"parallel": 4}}]},
            "junk",
            {"loaded_instances": [{"config": {"context_length": 5}}]},
        ]
    }
    info = read_native_models(listing)
    assert info is not None
    assert info.native
    assert (info.context_of("qwen"), info.context_of("qwen:2"), info.context_of("gemma")) == (
        8192,
        8192,
        None,
    )
    assert info.slots == {"llama": 4}
    assert read_native_models({"data": []}) is None
    assert read_native_models({"error": "Unexpected endpoint or method."}) is None


def test_a_model_loaded_twice_gets_the_smaller_figures_under_its_key() -> None:
    """A request names the key, and either instance may take it: what fits and how many at
    once hold for both; each instance's id keeps its own figures."""
    listing = {
        "models": [
            {
                "key": "qwen",
                "loaded_instances": [
                    {"id": "qwen", "config": {"context_length": 32768, "parallel": 4}},
                    {"id": "qwen:2", "config": {"context_length": 8192, "parallel": 2}},
                ],
            }
        ]
    }
    info = read_native_models(listing)
    assert info is not None
    assert (info.context_of("qwen"), info.context_of("qwen:2")) == (8192, 8192)
    assert (info.slots_of("qwen"), info.slots_of("qwen:2")) == (2, 2)
    smaller_first = [
        {"id": "qwen:2", "config": {"parallel": 1}},
        {"id": "qwen", "config": {"parallel": 4}},
    ]
    info = read_native_models({"models": [{"key": "qwen", "loaded_instances": smaller_first}]})
    assert info is not None
    assert (info.slots_of("qwen"), info.slots_of("qwen:2")) == (1, 1)


def test_llamacpp_props_give_the_context_of_one_slot() -> None:
    props = {"default_generation_settings": {"n_ctx": 2048}, "n_ctx": 8192, "total_slots": 4}
    info = read_llamacpp_props(props)
    assert (info.kind, info.context_of("anything"), info.slots) == ("llamacpp", 2048, {"*": 4})
    assert read_llamacpp_props({"n_ctx": 8192}).context_of("x") == 8192
    assert read_llamacpp_props({"n_ctx": "big", "total_slots": True}).contexts == {}


def test_only_the_native_chat_and_llamacpp_asked_for_it_report_progress() -> None:
    native = Route("native", "", {"input": "hi"})
    openai = Route("openai", "")
    llamacpp = ServerInfo("llamacpp")
    assert reports_progress(native, ServerInfo("lmstudio"), {})
    assert reports_progress(openai, llamacpp, {"return_progress": True})
    assert not reports_progress(openai, llamacpp, {"return_progress": False})
    assert not reports_progress(openai, ServerInfo("lmstudio"), {"return_progress": True})
    assert not reports_progress(openai, UNKNOWN, {})


def test_the_slots_for_a_model_or_for_none_named() -> None:
    lmstudio = ServerInfo("lmstudio", slots={"qwen": 4, "qwen:2": 4, "gemma": 2})
    assert (lmstudio.slots_of("qwen"), lmstudio.slots_of("gemma")) == (4, 2)
    assert lmstudio.slots_of("not-loaded") is None
    assert lmstudio.slots_of(None) is None, "two figures: which model is not known"
    assert ServerInfo("lmstudio", slots={"qwen": 4, "qwen:2": 4}).slots_of(None) == 4
    llamacpp = ServerInfo("llamacpp", slots={"*": 3})
    assert (llamacpp.slots_of("any"), llamacpp.slots_of(None)) == (3, 3)
    assert ServerInfo("openai").slots_of("m") is None
