"""Streaming tool calls from a reply's growing text: content before a call, each call's header once its name is
written, then its arguments in fragments whose concatenation is the non-streamed call's arguments."""

from __future__ import annotations

import json

import pytest

from pagedllm.serving.protocol import ChatDelta
from pagedllm.serving.tool_call_stream import ToolCallStream
from pagedllm.serving.tool_parsers import HermesToolParser, JsonToolParser, ToolParser
from pagedllm.serving.tools import ToolSetup, parse_reply, tool_setup

TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    for name in ("get_weather", "get_time")
]
WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": {"c": [1, "}"]}}}'
TIME_CALL = '{"name": "get_time", "arguments": {"zone": "CET"}}'


def hermes(call: str) -> str:
    return f"<tool_call>\n{call}\n</tool_call>"


def streamed(text: str, setup: ToolSetup, parser: ToolParser, step: int = 3) -> list[ChatDelta]:
    """The deltas of `text` arriving `step` characters at a time, the last from finish()."""
    stream = ToolCallStream(setup, parser)
    deltas = [stream.delta(text[:end]) for end in range(step, len(text), step)]
    return [*deltas, stream.finish(text)]


def content_of(deltas: list[ChatDelta]) -> str:
    return "".join(delta.content or "" for delta in deltas)


def calls_of(deltas: list[ChatDelta]) -> list[dict]:
    """The calls as a client accumulates them: header fields once, arguments concatenated."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        for piece in delta.tool_calls or []:
            fields = piece.model_dump()
            if piece.index not in calls:
                assert fields.keys() == {"index", "id", "type", "function"} and "name" in fields["function"]
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert fields == {"index": piece.index, "function": {"arguments": piece.function.arguments}}
            calls[piece.index]["arguments"] += piece.function.arguments
    return [calls[index] for index in sorted(calls)]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_constrained_call_streams_its_name_then_argument_fragments(choice) -> None:
    setup = tool_setup(TOOLS, choice, True)
    text = hermes(WEATHER_CALL)
    deltas = streamed(text, setup, HermesToolParser())
    fragments = [piece.function.arguments for d in deltas for piece in d.tool_calls or []]
    assert len(fragments) >= 10  # three characters a time: the arguments arrive as they are written
    (call,) = calls_of(deltas)
    (whole,) = parse_reply(text, setup, HermesToolParser()).calls
    assert call["name"] == whole.name and json.loads(call["arguments"]) == json.loads(whole.arguments)
    assert call["id"].startswith("call_") and content_of(deltas) == ""


def test_content_streams_before_a_call_and_is_held_where_one_may_begin() -> None:
    setup = tool_setup(TOOLS, "auto", True)
    text = "Let me check.\n" + hermes(WEATHER_CALL) + "\nDone."
    stream = ToolCallStream(setup, HermesToolParser())
    assert stream.delta("Let me ch").content == "Let me ch"
    assert stream.delta("Let me check.\n<tool_").content == "eck."  # the newline and the tag's start wait
    deltas = streamed(text, setup, HermesToolParser())
    assert content_of(deltas) == parse_reply(text, setup, HermesToolParser()).content == "Let me check.\n\nDone."
    assert [call["name"] for call in calls_of(deltas)] == ["get_weather"]


def test_plain_text_streams_whole_as_content() -> None:
    text = "The weather is fine <b>today</b>, {really}.  "
    deltas = streamed(text, tool_setup(TOOLS, "auto", True), HermesToolParser())
    assert content_of(deltas) == text and calls_of(deltas) == []


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_calls_stream_under_their_indices(parallel: bool) -> None:
    setup = tool_setup(TOOLS, "required", parallel)
    text = hermes(WEATHER_CALL) + "\n" + hermes(TIME_CALL)
    calls = calls_of(streamed(text, setup, HermesToolParser()))
    parsed = parse_reply(text, setup, HermesToolParser()).calls
    names = ["get_weather", "get_time"] if parallel else ["get_weather"]
    assert [call["name"] for call in calls] == [call.name for call in parsed] == names
    assert [json.loads(c["arguments"]) for c in calls] == [json.loads(c.arguments) for c in parsed]


def test_a_call_in_another_shape_comes_whole_when_the_reply_ends() -> None:
    setup = tool_setup(TOOLS, "auto", True)
    text = hermes('{"arguments": {"zone": "CET"}, "name": "get_time"}')
    deltas = streamed(text, setup, HermesToolParser())
    assert all(d.tool_calls is None for d in deltas[:-1])
    assert calls_of(deltas)[0]["name"] == "get_time" and json.loads(calls_of(deltas)[0]["arguments"]) == {"zone": "CET"}


def test_bare_json_calls_stream_too() -> None:
    setup = tool_setup(TOOLS, "auto", True)
    text = f"[{WEATHER_CALL}, {TIME_CALL}]"
    deltas = streamed(text, setup, JsonToolParser())
    assert [call["name"] for call in calls_of(deltas)] == ["get_weather", "get_time"]
    assert sum(len(d.tool_calls or []) for d in deltas[:-1]) > 4 and content_of(deltas) == ""


def test_a_call_to_an_unknown_function_stays_content() -> None:
    text = hermes('{"name": "launch", "arguments": {}}')
    deltas = streamed(text, tool_setup(TOOLS, "auto", True), HermesToolParser())
    assert calls_of(deltas) == [] and content_of(deltas) == text


def test_a_reply_cut_short_inside_a_call_finishes_with_length() -> None:
    setup = tool_setup(TOOLS, "required", True)
    stream = ToolCallStream(setup, HermesToolParser())
    whole = hermes(TIME_CALL)
    stream.finish(whole + "\n" + whole[: whole.index("CET")])
    assert len(stream.calls) == 2 and stream.finish_reason("length") == "length"
    finished = ToolCallStream(setup, HermesToolParser())
    finished.finish(whole)
    assert finished.finish_reason("stop") == finished.finish_reason("length") == "tool_calls"
