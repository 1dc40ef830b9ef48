"""The official openai SDK, pointed at the simulator, streams the same text our client gets.

The SDK was written by people who never saw the simulator, so agreement means the simulator
speaks the real wire format and not only our reading of it.
"""

from __future__ import annotations

import openai
import pytest

from lmstream_nb import LMStudioClient, simulator

pytestmark = pytest.mark.anyio

MODEL = "lmstream-sim-8b"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Describe a café in Paris → briefly."},
]


@pytest.mark.parametrize("dialect", ["lmstudio", "openai", "llamacpp"])
async def test_openai_sdk_streams_the_same_text(sim: simulator.SimServer, dialect: str) -> None:
    scenario = {"output_tokens": 80, "dialect": dialect}
    sdk = openai.AsyncOpenAI(base_url=sim.base_url, api_key="lm-studio", max_retries=0)
    try:
        chunks = await sdk.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            seed=7,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
            extra_body={"sim": scenario},
        )
        sdk_text = ""
        usage = None
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                sdk_text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
    finally:
        await sdk.close()
    async with LMStudioClient(sim.base_url) as client:
        ours = await client.stream_chat(MESSAGES, model=MODEL, seed=7, sim=scenario).collect()
    assert sdk_text == ours.text
    assert len(sdk_text) > 100
    assert usage is not None
    assert usage.completion_tokens == ours.stats.completion_tokens == 80
    assert any(ord(c) > 127 for c in sdk_text), "multi-byte text went through both"


async def test_openai_sdk_sees_in_stream_error_as_api_error(sim: simulator.SimServer) -> None:
    sdk = openai.AsyncOpenAI(base_url=sim.base_url, api_key="lm-studio", max_retries=0)

    async def consume() -> None:
        chunks = await sdk.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,  # type: ignore[arg-type]
            extra_body={"sim": {"error_at": 3}},
        )
        async for _ in chunks:
            pass

    try:
        with pytest.raises(openai.APIError, match="Compute error"):
            await consume()
    finally:
        await sdk.close()


async def test_openai_sdk_non_streaming_matches(sim: simulator.SimServer) -> None:
    sdk = openai.AsyncOpenAI(base_url=sim.base_url, api_key="lm-studio", max_retries=0)
    try:
        reply = await sdk.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            seed=3,  # type: ignore[arg-type]
            extra_body={"sim": {"output_tokens": 30}},
        )
    finally:
        await sdk.close()
    async with LMStudioClient(sim.base_url) as client:
        ours = await client.complete(MESSAGES, model=MODEL, seed=3, sim={"output_tokens": 30})
    assert reply.choices[0].message.content == ours.text
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 30
