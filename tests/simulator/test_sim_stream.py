"""Stream framing, dialects, reasoning modes, raw byte quirks and deterministic text."""

from __future__ import annotations

import json

import pytest
from sim_helpers import MODEL, chat_body, parse_sse, stream

BOM = b"\xef\xbb\xbf"


def test_lmstudio_stream_framing(sim, client):
    result = stream(client, sim.base_url + "/chat/completions", chat_body(sim={"output_tokens": 6}))

    assert result.status == 200
    assert result.headers["content-type"] == "text/event-stream"
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["transfer-encoding"] == "chunked"
    assert result.headers["x-powered-by"] == "Express"
    assert result.events[-1].data == "[DONE]"
    chunks = result.chunks
    assert len(chunks) == 7  # six tokens, then the finish chunk; no usage unless asked
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    for chunk in chunks[:-1]:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == MODEL
        assert chunk["system_fingerprint"] == MODEL
        (choice,) = chunk["choices"]
        assert choice["delta"]["role"] == "assistant"
        assert choice["delta"]["content"]
        assert choice["finish_reason"] is None
        assert choice["logprobs"] is None
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not result.comments
    assert b"event:" not in result.raw
    assert b"\r" not in result.raw


def test_usage_chunk_only_when_asked(sim, client):
    url = sim.base_url + "/chat/completions"
    asked = stream(
        client, url, chat_body(sim={"output_tokens": 4}, stream_options={"include_usage": True})
    )
    v0 = stream(
        client,
        sim.root_url + "/api/v0/chat/completions",
        chat_body(sim={"output_tokens": 4}, stream_options={"include_usage": True}),
    )

    usage_chunk = asked.chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 4
    assert asked.chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in v0.chunks)  # v0 streams carry no usage
    assert "stats" not in v0.raw.decode()


def test_length_finish_reason_in_stream(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(max_tokens=3, sim={"output_tokens": 10}),
    )

    assert len(result.chunks) == 4
    assert result.chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_dialect_role_only_in_opening_chunk(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 3, "dialect": "openai"}),
    )

    deltas = [c["choices"][0]["delta"] for c in result.chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(set(d) == {"content"} for d in deltas[1:4])
    assert deltas[4] == {}
    assert result.chunks[0]["system_fingerprint"] != MODEL


def test_llamacpp_dialect_null_opener_and_timings(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(
            sim={"output_tokens": 3, "dialect": "llamacpp"}, stream_options={"include_usage": True}
        ),
    )

    first = result.chunks[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None}
    assert b'"content":null' in result.raw
    last = result.chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3
    assert last["timings"]["predicted_n"] == 3
    assert last["timings"]["prompt_n"] == last["usage"]["prompt_tokens"]


def test_reasoning_separate(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 5, "reasoning": "separate", "reasoning_tokens": 4}),
    )

    deltas = [c["choices"][0]["delta"] for c in result.chunks[:-1]]
    assert len(deltas) == 9
    for delta in deltas[:4]:
        assert set(delta) == {"role", "reasoning_content"}
    for delta in deltas[4:]:
        assert set(delta) == {"role", "content"}


def test_reasoning_gpt_oss_style(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 2, "reasoning": "reasoning", "reasoning_tokens": 3}),
    )

    keys = [set(c["choices"][0]["delta"]) - {"role"} for c in result.chunks[:-1]]
    assert keys == [{"reasoning"}] * 3 + [{"content"}] * 2


def test_reasoning_inline_think_tags(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 3, "reasoning": "inline", "reasoning_tokens": 5}),
    )

    assert result.text.startswith("<think>")
    thinking, answer = result.text.split("</think>")
    assert len(thinking) > len("<think>")
    assert answer.strip()
    assert all(set(c["choices"][0]["delta"]) <= {"role", "content"} for c in result.chunks)


def test_reasoning_in_non_streaming_message(sim, client):
    url = sim.base_url + "/chat/completions"
    separate = client.post(
        url, json=chat_body(sim={"output_tokens": 2, "reasoning": "separate"})
    ).json()
    gpt_oss = client.post(
        url, json=chat_body(sim={"output_tokens": 2, "reasoning": "reasoning"})
    ).json()

    assert separate["choices"][0]["message"]["reasoning_content"]
    assert separate["usage"]["completion_tokens"] == 42
    assert gpt_oss["choices"][0]["message"]["reasoning"]
    assert "reasoning_content" not in gpt_oss["choices"][0]["message"]


@pytest.mark.parametrize(("ending", "separator"), [("crlf", b"\r\n"), ("cr", b"\r")])
def test_line_endings_in_raw_bytes(sim, client, ending, separator):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 2, "line_ending": ending}),
    )

    assert result.raw.endswith(b"data: [DONE]" + separator * 2)
    assert result.raw.count(separator * 2) == 4  # two tokens, finish, [DONE]
    normalized = result.raw.replace(separator, b"\n")
    assert b"\r" not in normalized
    events, _ = parse_sse(normalized)
    assert [e.data for e in events][-1] == "[DONE]"


def test_bom_prefixes_the_body_once(sim, client):
    result = stream(
        client, sim.base_url + "/chat/completions", chat_body(sim={"output_tokens": 2, "bom": True})
    )

    assert result.raw.startswith(BOM + b"data: {")
    assert result.raw.count(BOM) == 1


def test_ping_comments_during_prompt_processing(sim, client):
    # 2000 prompt tokens at 10000 tok/s: 0.2 s of prompt processing, a ping every 0.05 s
    body = chat_body("x" * 8000, sim={"output_tokens": 2, "prefill_tps": 10000, "ping_s": 0.05})

    result = stream(client, sim.base_url + "/chat/completions", body)

    assert 2 <= len(result.comments) <= 4
    assert set(result.comments) == {": ping"}
    assert result.raw.startswith(b": ping\n\n")


def test_chunk_chars_makes_exact_size_deltas(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 3, "chunk_chars": 1000}),
    )

    contents = [c["choices"][0]["delta"]["content"] for c in result.chunks[:-1]]
    assert [len(c) for c in contents] == [1000, 1000, 1000]


def test_one_mebibyte_data_line(sim, client):
    result = stream(
        client,
        sim.base_url + "/chat/completions",
        chat_body(sim={"output_tokens": 1, "chunk_chars": 1 << 20}),
    )

    longest = max(result.raw.split(b"\n"), key=len)
    assert len(longest) > 1 << 20
    assert len(result.chunks[0]["choices"][0]["delta"]["content"]) == 1 << 20


def test_same_seed_and_prompt_give_same_text(sim, client):
    url = sim.base_url + "/chat/completions"
    body = chat_body("Tell me about rivers.", seed=7, sim={"output_tokens": 40})

    first = stream(client, url, body).text
    second = stream(client, url, body).text
    non_streamed = client.post(url, json=body).json()["choices"][0]["message"]["content"]
    other_seed = stream(client, url, {**body, "seed": 8}).text
    other_prompt = stream(
        client, url, chat_body("Tell me about lakes.", seed=7, sim={"output_tokens": 40})
    ).text

    assert first == second == non_streamed
    assert other_seed != first
    assert other_prompt != first


def test_text_is_readable_and_has_multibyte_words(sim, client):
    body = chat_body(seed=3, sim={"output_tokens": 2000, "time_scale": 0})
    text = client.post(sim.base_url + "/chat/completions", json=body).json()["choices"][0][
        "message"
    ]["content"]

    assert text[0].isupper()
    assert text.count(".") > 50
    assert any(ord(ch) > 0xFFFF for ch in text)  # a four-byte character (emoji)
    assert any(0x7F < ord(ch) < 0x800 for ch in text)  # two-byte characters (é, ï)
    average = len(text) / 2000
    assert 3 <= average <= 7


def test_stream_text_is_valid_json_per_line(sim, client):
    result = stream(
        client, sim.base_url + "/chat/completions", chat_body(sim={"output_tokens": 300})
    )

    for line in result.raw.split(b"\n"):
        if line.startswith(b"data: {"):
            json.loads(line[6:])
    assert len(result.chunks) == 301
