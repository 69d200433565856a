"""Tool-call parsing (Hermes tags, bare JSON), the checks on tools and tool_choice, and prompt rendering."""

from __future__ import annotations

import json

import pytest

from pagedllm.errors import InvalidArgumentError
from pagedllm.serving.tool_parsers import HermesToolParser, JsonToolParser, ParsedCall
from pagedllm.serving.tool_parsers.partial_call import BracketScan, BracketScans, json_value_end
from pagedllm.serving.tools import closed_objects, template_messages, tool_call_constraint, tool_setup

NAMES = {"f", "g"}


def tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def test_hermes_reads_calls_and_the_content_around_them() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "g", "arguments": "{}"}</tool_call>'
    )
    parsed = HermesToolParser().parse(text, NAMES)
    assert parsed.content == "Let me check."
    assert parsed.calls == [ParsedCall("f", '{"x": 1}'), ParsedCall("g", "{}")]


def test_hermes_drops_a_last_call_cut_short_but_keeps_whole_ones() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", "argu'
    assert HermesToolParser().parse(text, NAMES).calls == [ParsedCall("f", "{}")]


@pytest.mark.parametrize(
    "text",
    ['<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', "<tool_call>not json</tool_call>", "plain text"],
)
def test_anything_but_valid_calls_stays_content(text: str) -> None:
    parsed = HermesToolParser().parse(text, NAMES)
    assert parsed.calls == [] and parsed.content == text


def test_bare_json_calls_are_read_by_the_fallback() -> None:
    text = '[{"name": "f", "arguments": {"a": "b"}}, {"name": "g", "parameters": {}}]'
    assert JsonToolParser().parse(text, NAMES).calls == [ParsedCall("f", '{"a": "b"}'), ParsedCall("g", "{}")]
    assert HermesToolParser().parse(text, NAMES).calls == JsonToolParser().parse(text, NAMES).calls


def test_streaming_holds_back_what_may_start_a_call() -> None:
    parser = HermesToolParser()
    assert parser.may_start_call("Hello") == 5
    assert parser.may_start_call("Hello <tool") == 6
    assert parser.may_start_call("Hi <tool_call>{") == 3
    assert parser.may_start_call('  {"name"') == 2


VALUES = ['{"a": [1, {"b": "}]"}], "c": "\\"{"}', '[{"x": "\\\\"}, [[]]]', '{"s": "a \\" ] still a string"}']


class CountingText(str):
    """A text that counts the characters read from it one at a time, in a counter shared with its extensions."""

    def __new__(cls, text: str, reads: list[int]) -> CountingText:
        counted = super().__new__(cls, text)
        counted.reads = reads
        return counted

    def __getitem__(self, index: int | slice) -> str:  # type: ignore[override]
        if isinstance(index, int):
            self.reads[0] += 1
        return super().__getitem__(index)


@pytest.mark.parametrize("value", VALUES)
def test_bracket_scans_of_a_growing_text_agree_with_fresh_scans(value: str) -> None:
    text = "<tool_call>\n" + value + " after"
    start = text.index(value)
    scans = BracketScans()
    for end in range(len(text) + 1):
        assert scans.value_end(text[:end], start) == json_value_end(text[:end], start)
    assert json_value_end(text, start) == start + len(value)
    # A text that does not extend the last one (a stop string cut it) is scanned afresh.
    cut = text[: start + 3] + "]"
    assert scans.value_end(cut, start) == json_value_end(cut, start)


@pytest.mark.parametrize("value", VALUES)
def test_a_resumed_scan_reads_each_character_once(value: str) -> None:
    reads = [0]
    scan = BracketScan(0)
    for end in range(1, len(value) + 1):
        scan.advance(CountingText(value[:end], reads))
    assert scan.end == len(value)
    assert reads[0] == len(value)


def test_streamed_partial_calls_match_those_of_the_whole_text() -> None:
    text = (
        '<tool_call>\n{"name": "f", "arguments": {"a": "}"}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {'
    )
    for parser in (HermesToolParser(), JsonToolParser()):
        body = text if isinstance(parser, HermesToolParser) else '[{"name": "f", "arguments": {"a": "]"}}, {"name": "g"'
        scans = BracketScans()
        for end in range(len(body) + 1):
            assert parser.partial_calls(body[:end], NAMES, scans) == parser.partial_calls(body[:end], NAMES)


@pytest.mark.parametrize(
    ("tools", "choice", "says"),
    [
        ([tool("f")] * 2, None, "unique"),
        ([tool(f"t{i}") for i in range(129)], None, "at most 128"),
        ([{"type": "function", "function": {"name": ""}}], None, "name"),
        ([tool("f")], {"type": "function", "function": {"name": "zzz"}}, "'zzz'"),
        ([tool("f")], "sometimes", "tool_choice"),
        (None, "required", "needs tools"),
    ],
)
def test_bad_tools_and_choices_are_refused(tools, choice, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        tool_setup(tools, choice, True)


def test_named_choice_constrains_to_that_function_only() -> None:
    setup = tool_setup([tool("f"), tool("g")], {"type": "function", "function": {"name": "g"}}, True)
    grammar = tool_call_constraint(setup).grammar
    assert grammar is not None and '"const": "g"' in grammar and '"const": "f"' not in grammar
    assert grammar.startswith("start: call\n")  # one call: parallel applies to `required` only


def test_closed_objects_closes_only_objects_with_properties() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}, "b": {"type": "object"}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["b"]


def test_templates_without_tools_get_them_in_a_system_prompt() -> None:
    setup = tool_setup([tool("f")], "auto", True)
    history = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]
    messages, tools = template_messages(history, setup, template_takes_tools=False)
    assert tools is None
    assert messages[0]["role"] == "system" and json.dumps(setup.tools[0]["function"]) in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert messages[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    templated, offered = template_messages(history, setup, template_takes_tools=True)
    assert offered == setup.tools and templated[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
