"""The sans-IO decoders against the WHATWG event-stream rules and the chat-chunk variants."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstream_nb._events import ReasoningDelta, TextDelta
from lmstream_nb._sse import (
    BadChunk,
    ChatStreamDecoder,
    NativeChatDecoder,
    NotJSON,
    Reading,
    ServerReported,
    ServerSentEvent,
    SSEDecoder,
    StreamViolation,
    TooLarge,
    error_message_of,
    parse_json,
)


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def datas(*chunks: bytes) -> list[str]:
    return [e.data for e in decode(*chunks)]


# -- line endings ---------------------------------------------------------------------------


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"])
def test_each_line_ending_splits_lines(nl: bytes) -> None:
    body = b"data: a" + nl + nl + b"data: b" + nl + nl
    assert datas(body) == ["a", "b"]


def test_crlf_split_across_reads_is_one_line_ending() -> None:
    assert datas(b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n") == ["a", "b"]


def test_cr_then_cr_is_two_line_endings() -> None:
    assert datas(b"data: a\r", b"\r") == ["a"]


def test_unicode_line_separators_do_not_split_lines() -> None:
    # U+2028, U+0085 and U+000B are ordinary characters in an event stream.
    value = "a\u2028b\u0085c\x0bd"
    assert datas(f"data: {value}\n\n".encode()) == [value]


# -- BOM and UTF-8 --------------------------------------------------------------------------


def test_leading_bom_is_dropped() -> None:
    assert datas(b"\xef\xbb\xbfdata: a\n\n") == ["a"]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_leading_bom_split_across_reads_is_dropped(split: int) -> None:
    body = b"\xef\xbb\xbfdata: a\n\n"
    assert datas(body[:split], body[split:]) == ["a"]


def test_only_one_bom_is_dropped() -> None:
    events = decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n")
    # The second BOM makes the field name "\ufeffdata", which is not a known field.
    assert events == []


def test_multibyte_character_split_inside() -> None:
    body = "data: café → 🙂\n\n".encode()
    cut = body.index("🙂".encode()) + 2
    assert datas(body[:cut], body[cut:]) == ["café → 🙂"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert datas(b"data: a\xffb\n\n") == ["a\ufffdb"]


# -- fields ---------------------------------------------------------------------------------


def test_comments_and_keepalives_are_ignored() -> None:
    assert datas(b": ping\n\n:\n\ndata: a\n\n: ping\n\n") == ["a"]


def test_data_with_and_without_space() -> None:
    assert datas(b"data:a\n\ndata: b\n\ndata:  c\n\n") == ["a", "b", " c"]


def test_multiline_data_joins_with_lf() -> None:
    assert datas(b"data: a\ndata:\ndata: b\n\n") == ["a\n\nb"]


def test_field_without_colon() -> None:
    assert datas(b"data\n\n") == [""]


def test_event_id_retry_fields() -> None:
    events = decode(b"event: error\nid: 7\nretry: 1500\ndata: x\n\ndata: y\n\n")
    assert events[0] == ServerSentEvent("error", "x", "7", 1500)
    # The event type resets per event; the last event id and retry persist.
    assert events[1] == ServerSentEvent("message", "y", "7", 1500)


def test_id_with_nul_and_non_numeric_retry_are_ignored() -> None:
    events = decode(b"id: a\0b\nretry: 1x\ndata: x\n\n")
    assert events == [ServerSentEvent("message", "x", "", None)]


def test_blank_event_without_data_is_not_dispatched() -> None:
    assert decode(b"event: ping\n\n\n\nid: 3\n\n") == []


def test_unfinished_event_at_end_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [ServerSentEvent("message", "a", "", None)]
    assert decoder.has_partial_event


def test_one_mebibyte_data_line_in_small_reads() -> None:
    value = "x" * (1 << 20)
    body = f"data: {value}\n\n".encode()
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    assert datas(*chunks) == [value]


# -- re-chunking property -------------------------------------------------------------------

_lines = st.lists(
    st.one_of(
        st.builds(lambda s: "data: " + s, st.text(max_size=12)),
        st.builds(lambda s: "data:" + s, st.text(max_size=5)),
        st.sampled_from(["", "", ": ping", "event: error", "id: 4", "retry: 10", "data"]),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(
    lines=_lines,
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30),
)
def test_any_rechunking_yields_the_same_events(
    lines: list[str], newline: str, bom: bool, cuts: list[int]
) -> None:
    # Text may hold CR/LF itself: keep generated values on one line each.
    body = newline.join(line.replace("\r", "").replace("\n", "") for line in lines) + newline
    raw = (b"\xef\xbb\xbf" if bom else b"") + body.encode()
    whole = decode(raw)
    points = sorted({c for c in cuts if c < len(raw)})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert decode(*pieces) == whole
    byte_by_byte = [raw[i : i + 1] for i in range(len(raw))]
    assert decode(*byte_by_byte) == whole


def _chunk(content: str | None = None, **delta_extra: object) -> bytes:
    delta: dict[str, object] = {"role": "assistant"}
    if content is not None:
        delta["content"] = content
    delta.update(delta_extra)
    obj = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=15),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40),
)
def test_chat_decoder_rechunking_yields_same_text(pieces: list[str], cuts: list[int]) -> None:
    raw = b"".join(_chunk(p) for p in pieces) + b"data: [DONE]\n\n"
    points = sorted({c for c in cuts if c < len(raw)})
    decoder = ChatStreamDecoder()
    seen: list[str] = []
    for a, b in zip([0, *points], [*points, len(raw)], strict=True):
        seen.extend(e.content for e in decoder.feed(raw[a:b]))
    assert seen == pieces
    assert decoder.text == "".join(pieces)
    assert decoder.done
    assert decoder.text_chars == len("".join(pieces))


# -- chat chunks ----------------------------------------------------------------------------


def test_chat_variants_role_only_null_content_usage_and_reasoning() -> None:
    dec = ChatStreamDecoder()
    events = dec.feed(
        _chunk(None)  # openai / llama.cpp opener without text
        + _chunk(content=None, reasoning_content="think ")
        + _chunk(content=None, reasoning="more ")
        + _chunk("Hel")
        + _chunk("lo")
        + b'data: {"id":"chatcmpl-x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        + b'data: {"id":"chatcmpl-x","choices":[],"usage":{"prompt_tokens":3,'
        b'"completion_tokens":2},"timings":{"predicted_per_second":9.5},"unknown":1}\n\n'
        + b"data:[DONE]\n\n"
    )
    assert events == [
        ReasoningDelta("think "),
        ReasoningDelta("more "),
        TextDelta("Hel"),
        TextDelta("lo"),
    ]
    assert (dec.text, dec.reasoning, dec.finish_reason) == ("Hello", "think more ", "stop")
    assert dec.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert dec.timings == {"predicted_per_second": 9.5}
    assert dec.done
    assert dec.complete
    assert dec.model == "m"
    assert dec.response_id == "chatcmpl-x"


def test_not_json_names_the_line() -> None:
    dec = ChatStreamDecoder()
    dec.feed(_chunk("ok"))
    with pytest.raises(NotJSON) as info:
        dec.feed(b'data: {"id": broken\n\n')
    assert info.value.line == '{"id": broken'
    assert dec.text == "ok"


def test_json_that_is_not_an_object_is_a_protocol_violation() -> None:
    with pytest.raises(NotJSON):
        ChatStreamDecoder().feed(b"data: [1, 2]\n\n")


def test_blank_data_events_are_skipped() -> None:
    dec = ChatStreamDecoder()
    assert dec.feed(b"data:\n\ndata:  \n\n" + _chunk("a")) == [TextDelta("a")]


@pytest.mark.parametrize(
    "frame",
    [
        b'event: error\ndata: {"error":{"message":"Compute error."},'
        b'"message":"Compute error."}\n\n',
        b'data: {"error":{"message":"Compute error.","type":"server_error"}}\n\n',
        b'data: {"error":"Compute error."}\n\n',
        b"event: error\ndata: Compute error.\n\n",
    ],
)
def test_error_objects_inside_the_stream(frame: bytes) -> None:
    dec = ChatStreamDecoder()
    dec.feed(_chunk("partial"))
    with pytest.raises(ServerReported) as info:
        dec.feed(frame)
    assert info.value.message == "Compute error."
    assert dec.text == "partial"


def test_nothing_after_done_counts() -> None:
    dec = ChatStreamDecoder()
    dec.feed(_chunk("a") + b"data: [DONE]\n\n" + _chunk("b"))
    assert dec.text == "a"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error": "plain"}, "plain"),
        ({"error": {"message": "nested", "type": "x"}}, "nested"),
        ({"message": "top"}, "top"),
        ({"detail": "fastapi"}, "fastapi"),
        ({"error": {}}, None),
        ([1], None),
    ],
)
def test_error_message_shapes(body: object, message: str | None) -> None:
    assert error_message_of(body) == message


def test_whole_completion_object() -> None:
    dec = ChatStreamDecoder()
    events = dec.feed_completion(
        {
            "id": "chatcmpl-y",
            "model": "m",
            "choices": [
                {
                    "message": {"role": "assistant", "content": "Hi!", "reasoning_content": "r"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        }
    )
    assert events == [ReasoningDelta("r"), TextDelta("Hi!")]
    assert dec.complete
    assert dec.text == "Hi!"
    assert dec.usage == {"prompt_tokens": 1, "completion_tokens": 2}


# -- limits: what a server sends is bounded before it is held ---------------------------------


def test_a_line_of_exactly_the_limit_passes_one_byte_more_does_not() -> None:
    decoder = SSEDecoder(max_bytes=100)
    assert decoder.feed(b"data: " + b"x" * 94 + b"\n\n")[0].data == "x" * 94
    assert decoder.overflow is None
    assert decoder.feed(b"data: " + b"x" * 95 + b"\n\n") == []
    assert decoder.overflow == "line"


def test_an_endless_line_in_one_byte_reads_stops_at_the_limit() -> None:
    decoder = SSEDecoder(max_bytes=4096)
    fed = 0
    for _ in range(10_000):
        decoder.feed(b"d" if fed < 4 else b"x")
        fed += 1
        if decoder.overflow:
            break
    assert decoder.overflow == "line"
    assert fed == 4097
    assert decoder.feed(b"\n\n") == [], "nothing more is taken after the limit"
    assert decoder.head().startswith("ddddxxx")


def test_endless_data_lines_without_a_blank_line_stop_at_the_event_limit() -> None:
    decoder = SSEDecoder(max_bytes=10_000)
    for _ in range(5_000):
        decoder.feed(b"data: 0123456789\n")
        if decoder.overflow:
            break
    assert decoder.overflow == "event"
    assert decoder.head().startswith("0123456789\n0123456789")


def test_empty_data_lines_count_too() -> None:
    """``data`` without a value adds a line feed each: an endless run of them is bounded."""
    decoder = SSEDecoder(max_bytes=1000)
    decoder.feed(b"data\n" * 2000)
    assert decoder.overflow == "event"


def test_an_absurd_retry_field_is_ignored_not_fatal() -> None:
    [event] = decode(b"retry: " + b"9" * 10_000 + b"\ndata: a\n\n")
    assert event.retry is None


@pytest.mark.parametrize("split", [False, True])
def test_the_chat_decoder_names_the_limit(split: bool) -> None:
    decoder = ChatStreamDecoder(max_event_bytes=200)
    body = _chunk("a") + b"data: " + b"y" * 300 + b"\n\n"
    cut = len(_chunk("a")) + 10 if split else 0  # the long line starts in the first read
    if split:
        assert [e.content for e in decoder.feed(body[:cut])] == ["a"]
    with pytest.raises(TooLarge) as info:
        decoder.feed(body[cut:])
    assert info.value.kind == "line"
    assert info.value.limit == 200
    assert info.value.before == ([] if split else [TextDelta("a")])


def test_the_fast_path_respects_a_small_limit() -> None:
    decoder = ChatStreamDecoder(max_event_bytes=64)
    decoder.feed(_chunk("a")[:0] + b": hello\n\n")  # settle the BOM question: fast path on
    with pytest.raises(TooLarge):
        decoder.feed(b"data: " + json.dumps({"choices": []}).encode() + b" " * 80 + b"\n\n")


# -- a violation keeps the deltas decoded before it in the same read --------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"data: {broken\n\n",
        b'event: error\ndata: {"message": "boom"}\n\n',
        b'data: {"error": "boom"}\n\n',
        b'data: {"choices": [{"delta": {"content": 1}}]}\n\n',
    ],
)
def test_a_violation_carries_the_deltas_before_it(bad: bytes) -> None:
    decoder = ChatStreamDecoder()
    with pytest.raises(StreamViolation) as info:
        decoder.feed(_chunk("one ") + _chunk("two") + bad + _chunk("never"))
    assert [e.content for e in info.value.before] == ["one ", "two"]
    assert decoder.text == "one two"


# -- every shape a chunk can take decodes or is a violation -----------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_delta = st.one_of(
    _json,
    st.fixed_dictionaries(
        {},
        optional={
            k: st.one_of(_json, st.text(max_size=4))
            for k in ("role", "content", "reasoning_content", "reasoning", "tool_calls")
        },
    ),
)
_choice = st.one_of(
    _json,
    st.fixed_dictionaries(
        {}, optional={"delta": _delta, "message": _delta, "finish_reason": _json, "index": _json}
    ),
)
_usage = st.one_of(
    _json,
    st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(("prompt_tokens", "completion_tokens", "total_tokens"), _json),
    ),
)
_chunk_shapes = st.fixed_dictionaries(
    {},
    optional={
        "id": _json,
        "model": _json,
        "choices": st.one_of(_json, st.lists(_choice, max_size=2)),
        "usage": _usage,
        "timings": _json,
    },
)


def _well_typed(decoder: ChatStreamDecoder) -> None:
    assert decoder.finish_reason is None or isinstance(decoder.finish_reason, str)
    assert decoder.model is None or isinstance(decoder.model, str)
    assert decoder.response_id is None or isinstance(decoder.response_id, str)
    assert decoder.timings is None or isinstance(decoder.timings, dict)
    if decoder.usage is not None:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert decoder.usage.get(key) is None or type(decoder.usage[key]) is int
    assert isinstance(decoder.text, str)
    assert isinstance(decoder.reasoning, str)


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(_chunk_shapes, min_size=1, max_size=4), together=st.booleans())
def test_any_chunk_shape_decodes_or_is_a_violation(
    chunks: list[dict[str, object]], together: bool
) -> None:
    decoder = ChatStreamDecoder()
    lines = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    try:
        for piece in [b"".join(lines)] if together else lines:
            for delta in decoder.feed(piece):
                assert isinstance(delta, TextDelta | ReasoningDelta)
                assert isinstance(delta.content, str)
    except StreamViolation:
        pass  # BadChunk or NotJSON (NaN is not JSON); never AttributeError or TypeError
    _well_typed(decoder)


@settings(max_examples=300, deadline=None)
@given(completion=_chunk_shapes)
def test_any_completion_shape_decodes_or_is_a_violation(completion: dict[str, object]) -> None:
    decoder = ChatStreamDecoder()
    with contextlib.suppress(BadChunk, ServerReported):
        decoder.feed_completion(completion, json.dumps(completion))
    _well_typed(decoder)


def test_deep_nesting_is_a_violation_not_a_recursion_error() -> None:
    decoder = ChatStreamDecoder()
    with pytest.raises(BadChunk, match="nested deeper"):
        decoder.feed(b"data: " + b"[" * 200_000 + b"]" * 200_000 + b"\n\n")
    assert parse_json("[" * 200_000 + "]" * 200_000) is None
    assert parse_json(b'{"ok": 1}') == {"ok": 1}


# -- LM Studio's native events and llama.cpp's prompt progress ------------------------------


def _native(kind: str, **fields: object) -> bytes:
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _native_stream(pieces: list[str]) -> bytes:
    return b"".join(
        [
            _native("chat.start", model_instance_id="m"),
            _native("prompt_processing.start"),
            _native("prompt_processing.progress", progress=0.5),
            _native("prompt_processing.end"),
            _native("message.start"),
            *(_native("message.delta", content=p) for p in pieces),
            _native("message.end"),
            _native(
                "chat.end",
                result={
                    "model_instance_id": "m",
                    "output": [{"type": "message", "content": "".join(pieces)}],
                    "stats": {"input_tokens": 7, "total_output_tokens": len(pieces)},
                    "response_id": "resp_x",
                },
            ),
        ]
    )


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=15),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=40),
)
def test_native_decoder_rechunking_yields_same_text(pieces: list[str], cuts: list[int]) -> None:
    raw = _native_stream(pieces)
    points = sorted({c for c in cuts if c < len(raw)})
    decoder = NativeChatDecoder()
    seen: list[str] = []
    for a, b in zip([0, *points], [*points, len(raw)], strict=True):
        seen.extend(e.content for e in decoder.feed(raw[a:b]))
    assert seen == pieces  # the text of chat.end's output is not added again
    assert decoder.text == "".join(pieces)
    assert decoder.done
    assert (decoder.model, decoder.response_id) == ("m", "resp_x")
    assert decoder.usage == {"prompt_tokens": 7, "completion_tokens": len(pieces)}


def test_native_progress_readings_keep_only_the_latest() -> None:
    dec = NativeChatDecoder()
    dec.feed(_native("model_load.start") + _native("model_load.progress", progress=0.3))
    assert dec.progress == Reading("loading", 0.3)
    dec.feed(_native("model_load.end", load_time_seconds=1.5))
    assert (dec.progress, dec.load_s) == (Reading("loading", 1.0), 1.5)
    dec.progress = None
    dec.feed(_native("prompt_processing.start"))
    assert dec.progress == Reading("prompt", 0.0)
    assert not dec.saw_output  # progress is a sign of life, not the first token


def test_native_reasoning_unknown_events_and_events_named_by_their_type() -> None:
    dec = NativeChatDecoder()
    events = dec.feed(
        _native("reasoning.delta", content="hmm")
        + _native("tool_call.start", tool="search")
        + _native("something.new", value=[1, {"x": 2}])
        + b'data: {"type":"message.delta","content":"Hi"}\n\n'
    )
    assert events == [ReasoningDelta("hmm"), TextDelta("Hi")]
    assert (dec.reasoning, dec.text) == ("hmm", "Hi")


def test_native_error_event_raises_after_the_text_before_it() -> None:
    error = {"type": "model_not_found", "message": "Model x not found", "code": "model_not_found"}
    dec = NativeChatDecoder()
    with pytest.raises(ServerReported) as info:
        dec.feed(_native("message.delta", content="part") + _native("error", error=error))
    assert info.value.message == "Model x not found"
    assert info.value.before == [TextDelta("part")]


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        (_native("message.delta", content=5), "message.delta.content"),
        (_native("reasoning.delta", content=["x"]), "reasoning.delta.content"),
        (_native("prompt_processing.progress", progress=1.5), "prompt_processing.progress"),
        (_native("model_load.progress", progress="half"), "model_load.progress.progress"),
        (_native("chat.end", result=[]), "chat.end.result"),
        (_native("chat.end", result={"stats": {"input_tokens": -1}}), "input_tokens"),
        (_native("chat.end", result={"output": "x"}), "chat.end.result.output"),
    ],
)
def test_native_events_of_the_wrong_shape_name_the_field(frame: bytes, field: str) -> None:
    with pytest.raises(BadChunk) as info:
        NativeChatDecoder().feed(frame)
    assert field in info.value.what


def test_native_finish_reason_is_inferred_from_the_token_limit() -> None:
    end = _native("chat.end", result={"stats": {"total_output_tokens": 5}})
    limited = NativeChatDecoder(max_output_tokens=5)
    limited.feed(end)
    free = NativeChatDecoder()
    free.feed(end)
    assert (limited.finish_reason, free.finish_reason) == ("length", "stop")


def _progress_chunk(processed: int, total: int, cache: int = 0) -> bytes:
    chunk = {
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}],
        "prompt_progress": {
            "total": total,
            "cache": cache,
            "processed": processed,
            "time_ms": 10,
        },
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def test_llamacpp_prompt_progress_is_a_reading_not_the_first_token() -> None:
    dec = ChatStreamDecoder()
    assert dec.feed(_progress_chunk(2048, 3635, cache=100)) == []
    assert dec.progress == Reading("prompt", 2048 / 3635, 2048, 3635, 100)
    assert not dec.saw_output
    dec.progress = None
    dec.feed(_chunk("Hi"))
    dec.feed(_progress_chunk(3635, 3635))  # after the first token: not progress any more
    assert dec.progress is None


@pytest.mark.parametrize(
    ("progress", "field"),
    [
        ("[1]", "prompt_progress"),
        ('{"total": "x", "processed": 1}', "prompt_progress.total"),
        ('{"total": 10, "processed": -1}', "prompt_progress.processed"),
        ('{"total": 10, "processed": 1, "time_ms": "soon"}', "prompt_progress.time_ms"),
    ],
)
def test_llamacpp_prompt_progress_of_the_wrong_shape_names_the_field(
    progress: str, field: str
) -> None:
    frame = b'data: {"choices": [], "prompt_progress": ' + progress.encode() + b"}\n\n"
    with pytest.raises(BadChunk) as info:
        ChatStreamDecoder().feed(frame)
    assert field in info.value.what
