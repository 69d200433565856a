"""Reading a tool call while the model is still writing it: its name once it is whole, and as much of its
arguments object as has been written, so a stream can send the arguments as they come."""

from __future__ import annotations

import re

from pagedllm.serving.tool_parsers.base import PartialCall

# The shape constrained decoding writes and models follow: the name first, then the arguments. A call written in
# another order streams whole once it is finished.
CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
OPENERS, CLOSERS = "{[", "}]"
WHITESPACE = re.compile(r"\s*")


def skip_whitespace(text: str, position: int) -> int:
    match = WHITESPACE.match(text, position)
    assert match is not None  # \s* matches everywhere
    return match.end()


def json_value_end(text: str, start: int) -> int | None:
    """Where the object or array opening at text[start] ends (one past its closing bracket); None while open.
    Brackets are only counted outside strings, so the text need not be valid JSON yet."""
    depth, in_string, escaped = 0, False, False
    for position in range(start, len(text)):
        char = text[position]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in OPENERS:
            depth += 1
        elif char in CLOSERS:
            depth -= 1
            if depth == 0:
                return position + 1
    return None


def partial_call(text: str, start: int, tool_names: set[str]) -> PartialCall | None:
    """The call whose object opens at text[start], once its known tool name is written and its arguments object
    has begun; None before that, and for calls of another shape."""
    head = CALL_HEAD.match(text, start)
    if head is None or head.group(1) not in tool_names:
        return None
    arguments_start = head.end()
    if text[arguments_start : arguments_start + 1] != "{":
        return None
    arguments_end = json_value_end(text, arguments_start)
    if arguments_end is None:
        return PartialCall(head.group(1), text[arguments_start:], complete=False)
    return PartialCall(head.group(1), text[arguments_start:arguments_end], complete=True)
